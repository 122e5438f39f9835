"""The batched engine trains N clients in one loop exactly as training them one after another."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_cfg
from fedtune import config
from fedtune.context import build_context
from fedtune.data import Tokenized
from fedtune.errors import ConfigError
from fedtune.execution import engine
from fedtune.execution.jobs import Predict, Train
from fedtune.execution.train import num_local_steps, outputs, train
from fedtune.frameworks.kd.ops import Distill
from fedtune.runtime import simulate

# Tolerances from the arithmetic, not from one CPU's measured maximum (an AVX-512 Xeon rounds
# differently from an EPYC). Both paths compute each gradient with differently shaped float32
# matmuls, so a gradient differs by a few ulps of its largest terms. Adam then moves every
# parameter by about lr per step whatever the gradient's size: where a gradient is near zero
# (cancelling terms) those ulps change m / sqrt(v) by O(1), so such an element can differ by a
# fraction of one step. A wrong batch, teacher or adapter moves parameters by ~lr per step.
# Parameters: 1% of one step at the tests' lr (tiny_cfg: 5e-3). Adam's first moment is linear
# in the gradients: a few ulps of gradients of size <= 1 (GRAD_ATOL).
LR = 5e-3
ATOL, RTOL = 0.01 * LR, 1e-5
GRAD_ATOL = 1e-6


def no_dropout(model: nn.Module) -> None:
    """Dropout draws differ between the engines; the equivalence is checked without it."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def two_rounds(ctx, sizes, batched_rounds: tuple[bool, bool]):
    """Each client trains 2 rounds from the same start (optimizer state kept between them)."""
    cfg, d = ctx.cfg, ctx.data
    idx = [ctx.data.client_idx[c] for c in range(len(sizes))]
    states = [dict(ctx.init_state) for _ in sizes]
    opts: list = [None] * len(sizes)
    for rnd, batched in enumerate(batched_rounds, start=1):
        jobs = [
            Train(
                s,
                o,
                d.train,
                i,
                ctx.task.loss(),
                (cfg.seed, rnd, c),
                steps=num_local_steps(len(i), cfg.train),
            )
            for c, (s, o, i) in enumerate(zip(states, opts, idx, strict=True))
        ]
        res = engine.train_many(ctx, jobs) if batched else [train(ctx, job) for job in jobs]
        states, opts = [r.state for r in res], [r.opt_state for r in res]
    return states, opts, res


@pytest.mark.parametrize(
    ("model", "optimizer", "bucket_rows"),
    [
        ("tiny-gpt2", "adam", 16),
        ("tiny-gpt2", "adamw", 4),
        ("tiny-llama", "adam", 4),
        ("tiny-llama", "adamw", 16),
        ("tiny-llama", "sgd", 4),
    ],
)
def test_batched_local_training_equals_sequential(
    synth_dir, model, optimizer, bucket_rows, monkeypatch
):
    # unequal clients (3, 5 and 2 steps of batch 8): the engine masks finished clients and
    # keeps per-client Adam step counts; clipping at 0.5 is active and per client. With
    # bucket_rows=4 fused steps are also split into length-sorted sub-batches.
    monkeypatch.setattr(engine, "MIN_BUCKET_ROWS", bucket_rows)
    sizes = [20, 37, 9]
    cfg = tiny_cfg(synth_dir, model=model)
    cfg = config.with_overrides(
        cfg,
        model={"lora_dropout": 0.0},
        data={"partition": "sizes", "client_sizes": sizes},
        train={
            "optimizer": optimizer,
            "weight_decay": 0.01,
            "grad_clip": 0.5,
            "group_by_length": True,
        },
    )
    assert cfg.train.lr == LR  # ATOL is a fraction of one Adam step at this lr
    ctx = build_context(cfg)
    no_dropout(ctx.model)
    no_dropout(engine.multinet(ctx.model, len(sizes)).net)
    seq, seq_opt, seq_res = two_rounds(ctx, sizes, (False, False))
    bat, bat_opt, bat_res = two_rounds(ctx, sizes, (True, True))
    mixed, _, _ = two_rounds(ctx, sizes, (True, False))  # batched opt state -> torch Adam
    assert [r.steps for r in bat_res] == [r.steps for r in seq_res] == [3, 5, 2]
    assert [r.samples for r in bat_res] == [20, 37, 9]
    for c in range(len(sizes)):
        assert list(bat[c]) == list(seq[c])  # same names, same order
        moved = max((seq[c][k] - ctx.init_state[k]).abs().max().item() for k in seq[c])
        assert moved > 1e-3  # training did change the state
        for k in seq[c]:
            torch.testing.assert_close(bat[c][k], seq[c][k], atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(mixed[c][k], seq[c][k], atol=ATOL, rtol=RTOL)
        assert bat_opt[c]["param_groups"] == seq_opt[c]["param_groups"]
        assert len(bat_opt[c]["state"]) == len(seq_opt[c]["state"])  # SGD: none
        if optimizer != "sgd":
            assert seq_opt[c]["state"][0]["step"] == bat_opt[c]["state"][0]["step"]
        for i, s in seq_opt[c]["state"].items():
            torch.testing.assert_close(
                bat_opt[c]["state"][i]["exp_avg"], s["exp_avg"], atol=GRAD_ATOL, rtol=1e-3
            )
        assert bat_res[c].loss == pytest.approx(seq_res[c].loss, rel=1e-4)


def test_batched_distillation_equals_sequential(synth_dir):
    """Distillation jobs fuse even when every client has its own teacher (each client's loss
    runs on its own rows of the fused batch)."""
    cfg = tiny_cfg(synth_dir, model="tiny-llama")
    cfg = config.with_overrides(cfg, model={"lora_dropout": 0.0}, train={"group_by_length": True})
    ctx = build_context(cfg)
    no_dropout(ctx.model)
    no_dropout(engine.multinet(ctx.model, 3).net)
    d = ctx.data
    sel = d.public_idx[:21]  # 21 samples, batch 8: 3 steps per epoch, 2 epochs
    gen = torch.Generator().manual_seed(0)
    teachers = [(torch.randn(21, d.num_labels, generator=gen) / 2).softmax(-1) for _ in range(3)]
    view = Tokenized([d.train.ids[i] for i in sel], np.arange(21))
    jobs = [
        Train(
            ctx.init_state,
            None,
            view,
            np.arange(21),
            Distill(teachers[c], 2.0),
            (c,),
            epochs=2,
            batch_size=8,
        )
        for c in range(3)
    ]
    many = engine.train_many(ctx, jobs)
    for job, got in zip(jobs, many, strict=True):
        want = train(ctx, job)
        assert got.steps == want.steps == 6
        assert got.loss == pytest.approx(want.loss, rel=1e-4)
        for k, v in want.state.items():
            torch.testing.assert_close(got.state[k], v, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(many[0].state[k], many[1].state[k])  # own batches and teachers


def test_predict_many_equals_predict_logits(synth_dir):
    cfg = tiny_cfg(synth_dir, model="tiny-llama")
    ctx = build_context(cfg)
    d = ctx.data
    gen = torch.Generator().manual_seed(1)
    states = [
        {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in ctx.init_state.items()}
        for _ in range(3)
    ]
    idx = d.public_idx[:23]
    ctx = dataclasses.replace(ctx, cfg=config.with_overrides(cfg, train={"eval_batch_size": 16}))
    jobs = [Predict(st, d.train, idx) for st in states]
    many = engine.predict_many(ctx, jobs)
    for st, got in zip(states, many, strict=True):
        want = outputs(ctx, st, d.train, idx)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(many[0], many[1])  # each row really used its own adapter


@pytest.mark.parametrize("framework", ["fedllm", "kd"])
def test_simulation_with_batched_engine(synth_dir, framework, monkeypatch):
    cfg = tiny_cfg(
        synth_dir,
        model="tiny-llama",
        fed={"framework": framework, "rounds": 2},
        kd={"client_eval": False},
    )
    seq = simulate(cfg, log=None)
    calls, train_many = [], engine.train_many

    def spy(*a, **k):
        calls.append(len(a[1]))
        return train_many(*a, **k)

    monkeypatch.setattr(engine, "train_many", spy)
    bat = simulate(config.with_overrides(cfg, fed={"engine": "batched"}), log=None)
    # one fused loop of all 3 clients per round (KD: local training b1 and distillation b8)
    assert calls == [3, 3] * (2 if framework == "kd" else 1)
    assert bat["total_bytes"] == seq["total_bytes"]  # same messages on the wire
    assert bat["client_flops_per_round"] > 0
    assert bat["final_accuracy"] == pytest.approx(seq["final_accuracy"], abs=0.1)  # dropout RNG
    # each client's memory is its own steps', not the fused step's (3 clients' worth): training
    # steps are the sequential ones; fused inference gives each client 1/3 of an eval batch
    # (KD's b2), so its largest step (here its training step, which needs more) is no larger
    if framework == "fedllm":
        assert bat["client_peak_memory_bytes"] == seq["client_peak_memory_bytes"] > 0
    else:
        assert 0 < bat["client_peak_memory_bytes"] <= seq["client_peak_memory_bytes"]


def test_concurrent_clients_chunks_and_validation(synth_dir, monkeypatch):
    cfg = tiny_cfg(synth_dir, fed={"engine": "batched", "concurrent_clients": 2, "rounds": 1})
    calls, train_many = [], engine.train_many

    def spy(*a, **k):
        calls.append(len(a[1]))
        return train_many(*a, **k)

    monkeypatch.setattr(engine, "train_many", spy)
    s = simulate(cfg, log=None)
    assert calls == [2, 1]  # 3 clients, at most 2 per fused step
    assert s["rounds"] == 1 and s["client_flops_per_round"] > 0
    with pytest.raises(ConfigError, match="fed.concurrent_clients"):
        config.with_overrides(cfg, fed={"concurrent_clients": -1})
    with pytest.raises(ConfigError, match="fed.engine"):
        config.with_overrides(cfg, fed={"engine": "parallel"})


def test_bf16_backbone_keeps_float32_adapters(synth_dir):
    # GPU mode: bf16 backbone weights; the engine keeps float32 master copies of the adapters
    # and returns each tensor in the dtype the PEFT model (and the wire) uses.
    cfg = tiny_cfg(synth_dir, model="tiny-llama")
    cfg = config.with_overrides(cfg, model={"dtype": "bfloat16", "lora_dropout": 0.0})
    ctx = build_context(cfg)
    jobs = [
        Train(
            ctx.init_state,
            None,
            ctx.data.train,
            ctx.data.client_idx[c],
            ctx.task.loss(),
            (c,),
            steps=num_local_steps(len(ctx.data.client_idx[c]), cfg.train),
        )
        for c in range(3)
    ]
    res = engine.train_many(ctx, jobs)
    assert engine.multinet(ctx.model, 3).flat.dtype == torch.float32
    for r in res:
        assert {k: v.dtype for k, v in r.state.items()} == {
            k: v.dtype for k, v in ctx.init_state.items()
        }
        assert all(torch.isfinite(v.float()).all() for v in r.state.values())
        assert r.loss == r.loss and r.steps == -(-len(ctx.data.client_idx[0]) // 8)


def test_length_buckets_split_only_when_padding_drops():
    ids = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0, 0], [1] * 9, [1, 1, 1] + [0] * 6, [1] * 8 + [0]])
    batch = {
        "input_ids": ids,
        "attention_mask": ids.clone(),
        "labels": torch.arange(4),
        "rows": torch.tensor([0, 0, 1, 1]),
    }
    # lengths 2, 9, 3, 8: one batch pads to 4 x 9 = 36 tokens, two sorted halves to
    # 2 x 3 + 2 x 9 = 24 (saves more than 5%); four would go below min_rows=2.
    subs = engine.length_buckets(batch, min_rows=2)
    assert [s["labels"].tolist() for s in subs] == [[0, 2], [3, 1]]
    assert [tuple(s["input_ids"].shape) for s in subs] == [(2, 3), (2, 9)]
    assert subs[0]["rows"].tolist() == [0, 1]
    assert engine.length_buckets(batch, min_rows=3) == [batch]  # halves too small: unsplit
    same = {k: v[[1, 1, 3]] for k, v in batch.items()}  # 9, 9, 8: 27 tokens, halves 26
    assert engine.length_buckets(same, min_rows=1)[0] is same  # saves < 5%: unsplit


def test_frozen_head_is_shared_by_all_rows(synth_dir):
    # model.train_head=false: only LoRA tensors are stacked; the head stays the shared one.
    cfg = tiny_cfg(synth_dir, model="tiny-llama")
    cfg = config.with_overrides(cfg, model={"lora_dropout": 0.0, "train_head": False})
    ctx = build_context(cfg)
    assert not any("score" in k for k in ctx.init_state)
    idx = ctx.data.client_idx[0]
    job = Train(
        ctx.init_state,
        None,
        ctx.data.train,
        idx,
        ctx.task.loss(),
        (0,),
        steps=num_local_steps(len(idx), cfg.train),
    )
    got = engine.train_many(ctx, [job])[0]
    want = train(ctx, job)
    for k, v in want.state.items():
        torch.testing.assert_close(got.state[k], v, atol=ATOL, rtol=RTOL)


def test_batched_engine_honours_client_faults(synth_dir):
    # Dropout, a poisoned client and update validation apply to the fused path as they do to the
    # sequential one: the same clients drop, the same upload is rejected, the same bytes move.
    cfg = tiny_cfg(
        synth_dir,
        model="tiny-llama",
        fed={"rounds": 3, "dropout": 0.4, "poison_clients": (0,), "max_update_norm": 50.0},
    )
    seq = simulate(cfg, log=None)
    bat = simulate(config.with_overrides(cfg, fed={"engine": "batched"}), log=None)
    assert seq["clients_dropped"] > 0 and seq["updates_rejected"] > 0
    for key in ("clients_dropped", "updates_rejected", "total_bytes", "rounds_skipped"):
        assert bat[key] == seq[key], key


def test_fused_compute_is_shared_by_rows_processed(synth_dir, tmp_path):
    """One local step of batch 8 each: the three clients ran 8 rows each through the fused
    step, so each is charged a third of it, whatever its dataset size (20, 37, 9)."""
    import json

    cfg = tiny_cfg(
        synth_dir,
        fed={"rounds": 1, "engine": "batched"},
        data={"partition": "sizes", "client_sizes": [20, 37, 9]},
        train={"local_steps": 1},
    )
    simulate(cfg, tmp_path / "run", log=None)
    (r,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    flops = [c["flops"] for c in r["per_client"].values()]
    assert len(set(flops)) == 1 and flops[0] > 0


def test_each_chunk_of_fused_clients_has_its_own_dropout_stream():
    """fed.concurrent_clients=1 of 3: the chunks start with clients 0, 1, 2, and draw from three
    streams (they all drew the same masks when the stream named no client)."""
    from fedtune import seeds

    streams = {seeds.batched(seeds.client(0, 1, c)) for c in range(3)}
    assert len(streams) == 3
    assert seeds.batched(seeds.client(0, 1, 0, job=1)) not in streams  # KD's b8 is another job
