import json

import torch

import fedtune
from conftest import tiny_cfg
from fedtune.context import build_context
from fedtune.messages import encoded_size
from fedtune.models import trainable_state
from fedtune.runtime import simulate


def test_bytes_per_round_equal_the_exchanged_tensors(synth_dir, tmp_path):
    cfg = tiny_cfg(synth_dir)
    summary = simulate(cfg, tmp_path / "run", log=None)
    ctx = build_context(cfg)
    state = ctx.init_state
    n = sum(t.numel() for t in state.values())
    # exactly the LoRA A/B of every c_attn plus the head, nothing else
    assert n == 4 * (4 * 32 + 96 * 4) + 4 * 32  # 4 blocks x (A[4,32] + B[96,4]) + head[4,32]
    assert summary["trainable_params_exchanged"] == n
    down = encoded_size(state, kind="parameters", round=1)
    header = down - 4 * n
    assert 0 < header < 20000  # the safetensors JSON header
    assert summary["bytes_down_per_client_per_round"] == down
    # uploads carry the same tensors; only the metadata (loss, sample count) differs
    up_header = summary["bytes_up_per_client_per_round"] - 4 * n
    assert 0 < up_header < 20000
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["bytes_by_kind"]["down"] for r in lines] == [{"parameters": down}] * 2
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in (
        "framework",
        "model",
        "dataset",
        "num_clients",
        "rounds",
        "seed",
        "final_accuracy",
        "best_accuracy",
        "trainable_params_exchanged",
        "bytes_up_per_client_per_round",
        "bytes_down_per_client_per_round",
        "total_bytes",
        "client_flops_per_round",
        "client_seconds_per_round",
        "client_peak_memory_bytes",
        "wall_seconds",
    ):
        assert key in saved
    assert saved["total_bytes"] == 2 * 3 * (down + summary["bytes_up_per_client_per_round"])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert fedtune.config.load(tmp_path / "run" / "config.toml") == cfg


def test_same_seed_same_metrics(synth_dir):
    cfg = tiny_cfg(synth_dir, model="tiny-llama")
    a = simulate(cfg, log=None)
    b = simulate(cfg, log=None)
    keys = (
        "final_accuracy",
        "bytes_up_per_client_per_round",
        "client_flops_per_round",
        "total_bytes",
    )
    assert [a[k] for k in keys] == [b[k] for k in keys]
    c = simulate(fedtune.config.with_overrides(cfg, seed=1), log=None)
    assert c["final_accuracy"] != a["final_accuracy"] or c["total_bytes"] != a["total_bytes"]


def test_fedllm_learns_and_flops_are_exact(synth_dir):
    cfg = tiny_cfg(synth_dir, fed={"rounds": 6}, train={"lr": 1e-2})
    s = simulate(cfg, log=None)
    assert s["final_accuracy"] > 0.6  # 4 classes: chance is 0.25
    s_all = simulate(fedtune.config.with_overrides(cfg, flops="all", fed={"rounds": 1}), log=None)
    s_shape = simulate(fedtune.config.with_overrides(cfg, fed={"rounds": 1}), log=None)
    assert s_all["client_flops_per_round"] == s_shape["client_flops_per_round"] > 0


def test_client_is_not_a_model_copy(synth_dir):
    from fedtune.execution.executors import Sequential, drive
    from fedtune.frameworks import fedllm

    cfg = tiny_cfg(synth_dir)
    ctx = build_context(cfg)
    client = fedllm.Client(ctx.client(0))
    assert not any(isinstance(v, torch.nn.Module) for v in vars(client).values() if v is not ctx)
    before = trainable_state(ctx.model)
    server = fedllm.Server(ctx.server())
    gen = server.round(1, [0])
    msg = next(gen)[0]
    executor = Sequential(ctx.client(0))
    reply = drive(client.handle(msg), executor.execute)
    assert set(reply.tensors) == set(before) and reply.meta["num_samples"] == len(
        ctx.data.client_idx[0]
    )
    assert client.opt_state is not None  # Adam moments stay with the client (optimizer_state=keep)
