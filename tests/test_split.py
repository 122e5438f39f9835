"""Split-FedLLM: the cut is exact, what crosses it is counted, client compute shrinks with k."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from fedtune.config import ModelConfig, load, with_overrides
from fedtune.context import build_context
from fedtune.data import batches, collate
from fedtune.errors import ConfigError, MessageError
from fedtune.frameworks import split
from fedtune.frameworks.split import layers
from fedtune.frameworks.split.model import (
    client_forward,
    compress,
    decompress,
    part_names,
    server_forward,
)
from fedtune.messages import Wire
from fedtune.models import init_trainable_state, load_model, load_trainable_state
from fedtune.runtime import simulate
from fedtune.runtime.inprocess import Link
from fedtune.tasks import get as get_task


def split_cfg(synth_dir, model="tiny-gpt2", rounds=1, **split_opts):
    return tiny_cfg(
        synth_dir, model=model, fed={"framework": "split", "rounds": rounds}, split=split_opts
    )


def padded_batch(seed=0):
    """Four rows of lengths 5, 9, 3, 7: right padding in every row but one."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 250, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    return collate(ids, np.array([0, 1, 2, 3]), pad_id=256)


TASK = get_task("classification")


@pytest.mark.parametrize("u_shaped", [False, True])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_split_step_gradients_equal_the_unsplit_model(name, u_shaped):
    model, _ = load_model(ModelConfig(name=name, lora_r=4, lora_dropout=0.0), 4)
    state = init_trainable_state(model, 0)
    torch.manual_seed(1)  # non-zero LoRA B, so every LoRA tensor gets a gradient
    load_trainable_state(model, {k: v + 0.05 * torch.randn_like(v) for k, v in state.items()})
    model.eval()  # no dropout: the two computations must match exactly
    b = padded_batch()
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    model.zero_grad()
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    F.cross_entropy(logits, b["labels"]).backward()
    ref = {n: params[n].grad.clone() for n in names}
    for k in (1, 2, 3):
        model.zero_grad()
        h = client_forward(model, b["input_ids"], b["attention_mask"], k)  # client
        h_server = h.detach().requires_grad_()  # what arrives over the wire
        hidden = server_forward(model, h_server, b["attention_mask"], k)  # server
        pooled = TASK.pool(hidden, b["attention_mask"])
        if u_shaped:  # head on the client: pooled states cross the wire both ways
            pooled_client = pooled.detach().requires_grad_()
            F.cross_entropy(TASK.head(model, pooled_client, b, "off"), b["labels"]).backward()
            pooled.backward(pooled_client.grad)
        else:
            F.cross_entropy(TASK.head(model, pooled, b, "off"), b["labels"]).backward()
        h.backward(h_server.grad)  # client back-propagates the returned gradient
        for side in ("client", "server"):
            for n in part_names(model, k, side, u_shaped):
                assert torch.allclose(params[n].grad, ref[n], rtol=1e-5, atol=1e-7), (k, side, n)


@pytest.mark.parametrize("u_shaped", [False, True])
def test_one_split_round_equals_one_unsplit_sgd_step(synth_dir, u_shaped):
    """Through the real server, client, messages and wire: SGD moves every tensor by
    -lr * grad, so equal updates mean equal gradients (tiny-llama has no dropout)."""
    cfg = tiny_cfg(
        synth_dir,
        model="tiny-llama",
        fed={"framework": "split"},
        train={"optimizer": "sgd", "lr": 0.5},
        split={"split_layer": 2, "u_shaped": u_shaped, "samples_per_round": 8},
    )
    cfg = with_overrides(cfg, model={"lora_dropout": 0.0})
    ctx = build_context(cfg)
    server, client = split.Server(ctx.server()), split.Client(ctx.client(0))
    gen = server.round(1, [0])
    wire = Wire()
    reply = client.handle(wire.transfer(next(gen)[0]), Link(wire, server, None))
    with pytest.raises(StopIteration):
        gen.send({0: wire.transfer(reply)})
    # the same batch through the unsplit model
    idx = client_round(ctx, 0)
    rng = np.random.default_rng([cfg.seed, 1, 0])
    (batch,) = batches(ctx.data.train, idx, 8, ctx.data.pad_id, rng, False)
    load_trainable_state(ctx.model, ctx.init_state)
    ctx.model.zero_grad()
    logits = ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    F.cross_entropy(logits, batch["labels"]).backward()
    for n, p in ctx.model.named_parameters():
        if p.requires_grad:
            expected = ctx.init_state[n] - 0.5 * p.grad
            assert torch.allclose(server.eval_state()[n], expected, rtol=1e-5, atol=1e-6), n


def client_round(ctx, c: int) -> np.ndarray:
    """Indices into the full train set of client ``c``'s round-1 samples."""
    own = ctx.data.client_idx[c]
    return own[layers.round_samples(ctx.cfg, np.arange(len(own)), c, 1)]


def server_ctx(cfg):
    return build_context(cfg).server()


def test_activation_bytes_per_batch_and_int8_is_4x_smaller(synth_dir):
    b, hidden = 8, 32
    cfg = split_cfg(synth_dir, samples_per_round=b)  # one batch per round
    ctx = build_context(cfg)
    # each client sends one batch; the ledger reports the mean over the 3 clients
    lengths = [max(len(ctx.data.train.ids[i]) for i in client_round(ctx, c)) for c in range(3)]
    sent = {}
    for mode in ("none", "int8"):
        s = simulate(with_overrides(cfg, split={"compression": mode}), log=None)
        sent[mode] = s["bytes_per_client_per_round_by_kind"]["up"]["activations"]
    tokens = b * np.mean(lengths)  # B x padded length, per client
    mask = tokens  # the attention mask travels as bool, one byte per token
    header_fp32 = sent["none"] - (tokens * hidden * 4 + mask)
    assert 0 < header_fp32 < 400  # safetensors JSON header with routing and metadata
    header_int8 = sent["int8"] - (tokens * hidden * 1 + tokens * 4 + mask)  # + fp32 scales
    assert 0 < header_int8 < 400
    assert sent["none"] / sent["int8"] > 3.2  # hidden 32: 4 bytes vs 1 + 4/32 per value
    # At SmolLM2's hidden size the per-token scales are negligible: ~4x.
    x = torch.randn(8, 80, 576)
    payload = {
        m: sum(t.numel() * t.element_size() for t in compress(x, m).values())
        for m in ("none", "int8")
    }
    assert 3.9 < payload["none"] / payload["int8"] <= 4


def test_compression_roundtrips():
    x = torch.randn(3, 5, 64)
    for mode, tol in (("none", 0), ("fp16", 1e-3), ("bf16", 1e-2), ("int8", 0.02)):
        t = compress(x, mode)
        err = (decompress(t, mode, 64) - x).abs().max() / x.abs().max()
        assert err <= tol, mode
    t = compress(x, "int8")
    assert set(t) == {"values", "scale"} and t["scale"].shape == (3, 5)
    assert torch.allclose(t["scale"], x.abs().amax(-1) / 127)  # symmetric, not centred
    t = compress(x, "topk", topk_ratio=0.25)
    assert t["values"].shape == (3, 5, 16) and t["indices"].dtype == torch.uint8  # H <= 256
    y = decompress(t, "topk", 64)
    assert (y != 0).sum(-1).eq(16).all()
    kept = x.abs() >= x.abs().topk(16, dim=-1).values[..., -1:]
    assert torch.equal(y[kept], x[kept]) and (y[~kept] == 0).all()
    assert compress(torch.randn(2, 576), "topk")["indices"].dtype == torch.int16  # SmolLM2
    assert compress(torch.randn(2, 576), "topk")["values"].shape == (2, 58)  # ceil(57.6)


def test_decompress_checks_the_receivers_mode_and_hidden_size():
    x = torch.linspace(-1, 1, 64).repeat(4, 1)  # top-k by magnitude keeps index 63
    with pytest.raises(MessageError, match="split.compression=int8"):
        decompress(compress(x, "fp16"), "int8", 64)  # sender and receiver disagree
    with pytest.raises(MessageError, match="split.compression=none"):
        decompress(compress(x, "topk"), "none", 64)
    with pytest.raises(MessageError, match=r"\[4, 64\]: expected 32 entries"):
        decompress(compress(x, "none"), "none", 32)  # the receiver's H, not the sender's
    with pytest.raises(MessageError, match="out of range"):
        decompress(compress(x, "topk"), "topk", 32)
    mask = torch.ones(4, dtype=torch.bool)  # other tensors of the message are ignored
    assert torch.equal(decompress({**compress(x, "none"), "mask": mask}, "none", 64), x)


def test_client_flops_fall_as_the_cut_moves_to_the_input(synth_dir):
    flops = []
    for k in (1, 2, 3):
        s = simulate(split_cfg(synth_dir, split_layer=k, samples_per_round=16), log=None)
        flops.append(s["client_flops_per_round"])
        assert s["bytes_per_client_per_round_by_kind"]["down"]["gradients"] > 0
    assert 0 < flops[0] < flops[1] < flops[2]
    # shape-keyed counting equals counting every op
    cfg = split_cfg(synth_dir, split_layer=2, samples_per_round=16)
    s_all = simulate(with_overrides(cfg, flops="all"), log=None)
    assert s_all["client_flops_per_round"] == flops[1]


def test_u_shaped_keeps_labels_on_the_client(synth_dir):
    s = simulate(split_cfg(synth_dir, u_shaped=True, samples_per_round=16), log=None)
    kinds = s["bytes_per_client_per_round_by_kind"]
    assert "labels" not in kinds["up"]
    assert kinds["down"]["activations"] > 0 and kinds["up"]["gradients"] > 0  # pooled states
    assert 0 <= s["final_accuracy"] <= 1


def test_heterogeneous_layers_and_per_client_server(synth_dir, tmp_path):
    cfg = split_cfg(
        synth_dir, client_split_layers=[1, 2, 3], server_mode="per_client", samples_per_round=16
    )
    simulate(cfg, tmp_path / "run", log=None)
    import json

    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["split_layers"] == [1, 2, 3]
    flops = [line["per_client"][str(c)]["flops"] for c in range(3)]
    assert flops[0] < flops[1] < flops[2]


def test_budget_policy_picks_the_deepest_layer_that_fits(synth_dir):
    cfg = split_cfg(synth_dir, samples_per_round=16)
    ctx = build_context(cfg)
    f = {k: layers.client_step_flops(ctx, k) * 2 for k in (1, 2, 3)}  # 2 batches per round
    w = {k: layers.wire_bytes_per_round(ctx, k, 16) for k in (1, 2, 3)}
    assert f[1] < f[2] < f[3] and w[1] < w[2] < w[3]
    budget = with_overrides(
        cfg,
        split={
            "policy": "budget",
            "client_compute_budgets": [1e18, f[1] * 1.01, 1e18],
            "client_bandwidth_budgets": [1e18, 1e18, w[2] + 1],
        },
    )
    ctx = build_context(budget)
    assert layers.choose_split_layers(ctx.server()) == [3, 1, 2]
    too_small = with_overrides(budget, split={"client_bandwidth_budgets": [1e18, 1e18, 10.0]})
    with pytest.raises(ConfigError, match="split.client_compute_budgets"):
        layers.choose_split_layers(server_ctx(too_small))


def test_split_config_is_validated(synth_dir):
    with pytest.raises(ConfigError, match="split.topk_ratio"):
        split_cfg(synth_dir, topk_ratio=0.0)
    with pytest.raises(ConfigError, match="split.split_layer"):
        split_cfg(synth_dir, split_layer=0)
    with pytest.raises(ConfigError, match="split.split_layer"):  # 4 blocks: k must be <= 3
        split.Server(server_ctx(split_cfg(synth_dir, split_layer=4)))
    with pytest.raises(ConfigError, match="split.client_split_layers"):
        split.Server(server_ctx(split_cfg(synth_dir, client_split_layers=[1, 2])))


@pytest.mark.slow  # ~15 s alone, a minute on a busy 2-core machine
def test_split_learns(synth_dir):
    cfg = tiny_cfg(
        synth_dir,
        fed={"framework": "split", "rounds": 4, "eval_every": 4},
        train={"lr": 1e-2},
        split={"split_layer": 2},
    )
    assert simulate(cfg, log=None)["final_accuracy"] > 0.6  # 4 classes: chance is 0.25


@pytest.mark.parametrize("preset", ["configs/demo-split.toml", "configs/paper-split.toml"])
def test_presets_load(preset):
    from pathlib import Path

    cfg = load(Path(__file__).parents[1] / preset)
    assert cfg.fed.framework == "split" and cfg.split.split_layer >= 1


def test_split_client_memory_is_its_own_half(synth_dir, monkeypatch):
    """A split client's peak memory counts its embeddings and blocks, never the server half:
    below the FedLLM client's on the same model and batches, and unchanged when the server
    half is twice as deep (tiny GPT-2 cut after block 2 of 4, then of 6)."""
    from fedtune import models

    def run(framework, blocks):
        def deeper(name, num_labels=2):
            c = tiny(name, num_labels)
            c.n_layer = blocks
            return c

        monkeypatch.setattr(models, "tiny_config", deeper)
        cfg = tiny_cfg(
            synth_dir,
            fed={"framework": framework, "rounds": 1},
            split={"split_layer": 2, "samples_per_round": 16},
            train={"local_steps": 2},
        )
        return simulate(cfg, log=None)["client_peak_memory_bytes"]

    tiny = models.tiny_config
    fedllm, split4, split6 = run("fedllm", 4), run("split", 4), run("split", 6)
    assert 0 < split4 == split6 < fedllm
    # the difference is at least the server half's frozen weights: 2 GPT-2 blocks of width 32
    # (attention 4·32² + 4·32, MLP 8·32² + 5·32, two layer norms 4·32), float32
    block = (12 * 32 * 32 + 13 * 32) * 4
    assert fedllm - split4 >= 2 * block


def test_a_deployed_split_client_holds_only_its_blocks(synth_dir):
    """A node's split client (the model is its alone) frees blocks [k, n) at its first round:
    its parameters shrink by exactly those blocks, its forward is unchanged, and a deeper cut
    later is refused in one line."""
    from dataclasses import replace

    from fedtune import models
    from fedtune.frameworks.split.client import Client
    from fedtune.frameworks.split.model import keep_client_half

    cfg = split_cfg(synth_dir, split_layer=2, samples_per_round=8)
    server = split.Server(build_context(cfg).server())
    models.release(server.ctx.model)  # the server's process: its own model
    ctx = replace(build_context(cfg).client(0), owns_model=True)
    assert ctx.model is not server.ctx.model
    ids = torch.randint(0, 250, (2, 7))
    ctx.model.eval()
    before = client_forward(ctx.model, ids, torch.ones_like(ids), 2)
    snapshot = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    blocks = list(layers_of(ctx.model))
    freed = sum(p.numel() * p.element_size() for b in blocks[2:] for p in b.parameters())
    total = sum(p.numel() * p.element_size() for p in ctx.model.parameters())
    gen = server.round(1, [0])
    wire = Wire()
    reply = Client(ctx).handle(wire.transfer(next(gen)[0]), Link(wire, server, None))
    assert reply.kind == "parameters"
    after = sum(p.numel() * p.element_size() for p in ctx.model.parameters())
    assert total - after == freed > 0
    with torch.no_grad():  # undo the round's training: the forward itself is unchanged
        for n, p in ctx.model.named_parameters():
            p.copy_(snapshot[n])
    ctx.model.eval()
    assert torch.equal(client_forward(ctx.model, ids, torch.ones_like(ids), 2), before)
    with pytest.raises(MessageError, match="holds blocks 0-1 only"):
        keep_client_half(ctx.model, 3)
    assert build_context(cfg).model is not ctx.model  # the process loads a whole one again
    assert len(list(layers_of(models.load_model(cfg.model, 4)[0]))) == 4


def layers_of(model):
    from fedtune.models import parts

    return parts(model).blocks


@pytest.mark.parametrize("k", [0, -2, 4, "2", None])
def test_a_split_layer_from_the_server_is_checked_first(synth_dir, k):
    """The server's split layer must be an int in [1, n): a negative one would otherwise free
    every block of a deployed client."""
    from dataclasses import replace

    from fedtune.frameworks.split.client import Client
    from fedtune.messages import Message

    cfg = split_cfg(synth_dir, split_layer=2, samples_per_round=8)
    ctx = replace(build_context(cfg).client(0), owns_model=True)
    msg = Message("parameters", 1, "server", "client_0", {}, {"split_layer": k})
    with pytest.raises(MessageError, match="split layer"):
        Client(ctx).handle(msg, None)
    from fedtune.frameworks.split.model import Freed

    assert not any(isinstance(b, Freed) for b in layers_of(ctx.model))  # nothing was freed
