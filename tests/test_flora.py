"""FLoRA (fedopt.rank_aggregation=flora): the stack's product is the weighted mean product
exactly, merging changes a party's own frozen weights only, clients that missed rounds catch
up, runs resume identically, and the exported residual is loaded with the adapter."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_cfg
from fedtune import config
from fedtune.context import build_context
from fedtune.errors import ConfigError
from fedtune.fedopt.flora import (
    RESIDUAL_FILE,
    Merged,
    lora_part,
    merge,
    numbered,
    stack,
    weight_name,
)
from fedtune.inference import load_run
from fedtune.models import RESIDUAL, load_trainable_state
from fedtune.runtime import checkpoint, simulate
from test_checkpoint import resumed_equals_straight

A, B = "m.lora_A.default.weight", "m.lora_B.default.weight"


def test_stack_product_is_the_weighted_mean_product():
    """Client 1 (rank 1, weight 1) and client 2 (rank 2, weight 3), by hand:
    B1 A1 = [[1, 2], [0, 0]], B2 A2 = [[0, 1], [2, 0]], mean = [[.25, 1.25], [1.5, 0]]."""
    c1 = {A: torch.tensor([[1.0, 2.0]]), B: torch.tensor([[1.0], [0.0]])}
    c2 = {A: torch.tensor([[0.0, 1.0], [1.0, 0.0]]), B: torch.tensor([[1.0, 0.0], [0.0, 2.0]])}
    s = stack([c1, c2], [1.0, 3.0])
    assert s[A].shape == (3, 2) and s[B].shape == (2, 3)  # ranks 1 + 2 stacked
    assert torch.equal(s[B] @ s[A], torch.tensor([[0.25, 1.25], [1.5, 0.0]]))


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_merge_changes_the_frozen_weights_and_loading_restores_them(synth_dir, model):
    """``residual.*`` entries make W = W0 + s B A (GPT-2's Conv1D holds it transposed); a
    state without them brings back W0 exactly."""
    ctx = build_context(tiny_cfg(synth_dir, model))
    g = torch.Generator().manual_seed(0)
    piece = {
        n: torch.randn(2, t.shape[1], generator=g)
        if ".lora_A." in n
        else torch.randn(t.shape[0], 2, generator=g)
        for n, t in lora_part(ctx.init_state).items()
    }
    residual = merge(ctx.model, {}, piece)
    params = dict(ctx.model.named_parameters())
    a = next(n for n in piece if ".lora_A." in n)
    module = ctx.model.get_submodule(a.split(".lora_A.")[0])
    w0 = params[weight_name(a)].detach().clone()
    load_trainable_state(ctx.model, {**ctx.init_state, **residual})
    delta = module.scaling["default"] * piece[a.replace("_A.", "_B.")] @ piece[a]
    delta = delta.T if module.fan_in_fan_out else delta
    torch.testing.assert_close(params[weight_name(a)] - w0, delta, atol=1e-5, rtol=1e-5)
    load_trainable_state(ctx.model, ctx.init_state)
    assert torch.equal(params[weight_name(a)], w0)


def test_client_takes_only_a_consistent_a1(synth_dir):
    ctx = build_context(tiny_cfg(synth_dir))
    lora = lora_part(ctx.init_state)
    head = {n: t for n, t in ctx.init_state.items() if n not in lora}
    g = torch.Generator().manual_seed(0)
    piece = {
        n: torch.randn(t.shape[0], 3, generator=g) if ".lora_B." in n else t[:3]
        for n, t in lora.items()
    }
    b0 = next(n for n in piece if ".lora_B." in n)  # given rank 2 where the stack has 3
    client = Merged()
    ok = client.receive(
        ctx.model, {**head, **numbered(0, piece)}, {"rank": 2, "merges": 1}, ctx.init_state, 12
    )
    assert ok is not None and client.merged == 1 and ok[1] == 2
    assert all(n in ok[0] for n in client.residual)
    bad = [
        ({**head, **numbered(2, piece)}, {"rank": 2, "merges": 3}),  # a gap: stack 1 missing
        ({**head, **numbered(1, piece)}, {"rank": 9, "merges": 2}),  # rank above model.lora_r
        ({**head, **numbered(1, piece)}, {"rank": 2, "merges": 5}),  # claims more than sent
        (head, {"rank": 2, "merges": 0}),  # goes back
        ({**head, **numbered(1, {**piece, b0: piece[b0][:, :2]})}, {"rank": 2, "merges": 2}),
        (numbered(1, piece), {"rank": 2, "merges": 2}),  # the head is missing
    ]
    for tensors, meta in bad:
        assert client.receive(ctx.model, tensors, meta, ctx.init_state, 12) is None, meta
        assert client.merged == 1
    # a stack it already merged is skipped: stacks 0 and 1 sent, only 1 merged
    before = {n: t.clone() for n, t in client.residual.items()}
    both = {**head, **numbered(0, piece), **numbered(1, piece)}
    assert client.receive(ctx.model, both, {"rank": 4, "merges": 2}, ctx.init_state, 12)
    once = merge(ctx.model, before, piece)
    assert all(torch.equal(client.residual[n], once[n]) for n in once)
    assert all(not torch.equal(once[n], before[n]) for n in once)
    with pytest.raises(ConfigError, match="not a count"):  # a checkpoint's merge count
        Merged().load_state_dict({"residual": {}, "merged": -1}, ctx.model)


def test_flora_config_checks():
    with pytest.raises(ConfigError, match="fed.engine"):
        config.load(None, ["fedopt.rank_aggregation=flora", "fed.engine=batched"])
    with pytest.raises(ConfigError, match="fedopt.rank_aggregation"):
        config.load(None, ["fedopt.rank_aggregation=flora", "fed.aggregator=median"])
    with pytest.raises(ConfigError, match="fedopt.rank_aggregation"):
        config.load(None, ["fedopt.rank_aggregation=flora", "fed.framework=split"])


def test_flora_run_keeps_every_party_on_the_global_weights(synth_dir, tmp_path):
    """Every client takes part: after the last round, the server's residual is each client's
    plus the last stack (which no client has merged yet, so only it is kept), and a1's bytes
    grow once there is a stack to send (ranks 1 + 2 + 4 against a client's own)."""
    cfg = tiny_cfg(
        synth_dir,
        fed={"rounds": 3},
        fedopt={"client_ranks": [1, 2, 4], "rank_aggregation": "flora"},
    )
    simulate(cfg, tmp_path / "run", log=None)
    ck = checkpoint.load(tmp_path / "run")
    flora = ck["server"]["flora"]
    assert flora["merges"] == 3 and flora["synced"] == [2, 2, 2]
    assert {n.split(".")[1] for n in flora["history"]} == {"2"}
    last = {n.split(".", 2)[2]: t for n, t in flora["history"].items()}
    assert next(t for n, t in last.items() if ".lora_A." in n).shape[0] == 7
    ctx = build_context(cfg)
    for c in range(3):
        mine = ck["clients"][str(c)]["flora"]
        assert mine["merged"] == 2
        expect = merge(ctx.model, mine["residual"], last)
        for n, t in flora["residual"].items():
            torch.testing.assert_close(t, expect[n], atol=1e-6, rtol=1e-5)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    down = [r["per_client"]["0"]["bytes_down"] for r in rows]
    assert down[0] < down[1] == down[2] and all(r["rejected"] == 0 for r in rows)
    # the run's export: the adapter and the residual, loaded together
    assert (tmp_path / "run" / "adapter" / RESIDUAL_FILE).is_file()
    load_trainable_state(ctx.model, ctx.init_state)  # pristine weights to compare with
    pristine = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    run = load_run(tmp_path / "run")
    params = dict(run.model.named_parameters())
    for n, t in flora["residual"].items():
        w = n[len(RESIDUAL) :]
        torch.testing.assert_close(params[w], pristine[w] + t, atol=1e-6, rtol=1e-5)


def test_flora_resumes_identically_and_late_clients_catch_up(synth_dir, tmp_path):
    """2 of 3 clients a round: a client that sat a round out gets both stacks it missed (its
    a1 is larger), and 4 rounds straight equal 2, interrupted, and 2 resumed."""
    cfg = tiny_cfg(
        synth_dir,
        fed={"rounds": 4, "fraction_fit": 0.67},
        fedopt={"rank_aggregation": "flora"},
    )
    a = resumed_equals_straight(cfg, tmp_path)
    rows = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rejected"] == 0 for r in rows)
    sizes = sorted({v["bytes_down"] for r in rows[1:] for v in r["per_client"].values()})
    assert len(sizes) >= 2  # one stack or two, by how long a client sat out


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_one_client_round_merges_into_exactly_its_trained_model(synth_dir, tmp_path, model):
    """With one client a round, FLoRA's global model after round 1 (W + s B1 A1, its head) is
    that client's trained model, which FedIT's average of one also is: same test loss."""
    losses = []
    for agg in ("hetlora", "flora"):
        fed, fedopt = {"rounds": 1, "fraction_fit": 0.34}, {"rank_aggregation": agg}
        simulate(tiny_cfg(synth_dir, model, fed=fed, fedopt=fedopt), tmp_path / agg, log=None)
        row = json.loads((tmp_path / agg / "metrics.jsonl").read_text().splitlines()[0])
        losses.append(row["test_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
