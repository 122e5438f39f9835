"""Clients of different LoRA ranks (fedopt.client_ranks): slicing and padding, FlexLoRA's SVD,
zero-padded ranks that stay zero on both engines, and runs whose bytes follow the ranks."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_cfg
from fedtune import config
from fedtune.context import build_context
from fedtune.errors import ConfigError
from fedtune.execution import engine
from fedtune.execution.jobs import Train
from fedtune.execution.train import num_local_steps, train
from fedtune.fedopt.ranks import (
    choose_ranks,
    flexlora,
    rank_bytes,
    rank_pad,
    rank_slice,
    svd_factors,
)
from fedtune.runtime import simulate
from test_checkpoint import resumed_equals_straight
from test_engine import ATOL, RTOL, no_dropout

A, B = "m.lora_A.default.weight", "m.lora_B.default.weight"


def test_slice_and_pad_keep_the_first_ranks():
    full = {
        A: torch.arange(12.0).reshape(4, 3),
        B: torch.arange(8.0).reshape(2, 4),
        "h": torch.ones(2),
    }
    part = rank_slice(full, 2)
    assert part[A].tolist() == [[0, 1, 2], [3, 4, 5]] and part[B].tolist() == [[0, 1], [4, 5]]
    back = rank_pad(part, full)
    assert back[A][2:].abs().sum() == 0 and back[B][:, 2:].abs().sum() == 0
    assert torch.equal(back[A][:2], full[A][:2]) and torch.equal(back["h"], full["h"])


def test_flexlora_truncation_error_is_the_discarded_singular_values():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 5, generator=g, dtype=torch.float64)
    for r in (1, 2, 4):
        b, a, s = svd_factors(delta, r)
        err = float(((delta - b @ a) ** 2).sum())
        assert err == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-10)


def test_flexlora_factors_the_weighted_mean_of_the_products():
    """At full rank the aggregate's product is the clients' weighted mean product exactly."""
    g = torch.Generator().manual_seed(1)
    states = [
        {
            A: torch.randn(3, 5, generator=g, dtype=torch.float64),
            B: torch.randn(4, 3, generator=g, dtype=torch.float64),
        }
        for _ in range(3)
    ]
    w = [1.0, 3.0, 4.0]
    mean = sum(wi * s[B] @ s[A] for wi, s in zip(w, states, strict=True)) / 8.0
    ref = {A: torch.zeros(4, 5, dtype=torch.float64), B: torch.zeros(4, 4, dtype=torch.float64)}
    out = flexlora(ref, states, w)  # rank 4 = min(4, 5): the SVD keeps all
    assert torch.allclose(out[B] @ out[A], mean, atol=1e-10)


def test_rank_config_checks():
    with pytest.raises(ConfigError, match="fedopt.client_ranks"):
        config.load(None, ["fedopt.client_ranks=[4,8]"])  # 3 clients
    with pytest.raises(ConfigError, match="fedopt.client_ranks"):
        config.load(None, ["fedopt.client_ranks=[2,4,4]"])  # model.lora_r is 8
    with pytest.raises(ConfigError, match="fedopt.rank_aggregation"):
        config.load(
            None,
            [
                "fedopt.client_ranks=[2,4,8]",
                "fedopt.rank_aggregation=flexlora",
                "fed.aggregator=median",
            ],
        )


def test_batched_equals_sequential_with_mixed_ranks(synth_dir):
    """Clients of ranks 1, 2 and 4 trained zero-padded to rank 4: the padded ranks stay exactly
    zero on both engines, and the engines agree (tolerance: test_engine's, from the arithmetic)."""
    cfg = config.with_overrides(tiny_cfg(synth_dir), model={"lora_dropout": 0.0})
    ctx = build_context(cfg)
    no_dropout(ctx.model)
    no_dropout(engine.multinet(ctx.model, 3).net)
    ranks, d = [1, 2, 4], ctx.data
    starts = [rank_pad(rank_slice(ctx.init_state, r), ctx.init_state) for r in ranks]

    def jobs():
        return [
            Train(
                s,
                None,
                d.train,
                d.client_idx[c],
                ctx.task.loss(),
                (cfg.seed, 1, c),
                steps=num_local_steps(len(d.client_idx[c]), cfg.train),
            )
            for c, s in enumerate(starts)
        ]

    seq = [train(ctx, j).state for j in jobs()]
    bat = [r.state for r in engine.train_many(ctx, jobs())]
    for c, r in enumerate(ranks):
        for k in seq[c]:
            torch.testing.assert_close(bat[c][k], seq[c][k], atol=ATOL, rtol=RTOL)
            for state in (seq[c], bat[c]):
                pad = (
                    state[k][r:]
                    if ".lora_A." in k
                    else state[k][:, r:]
                    if ".lora_B." in k
                    else None
                )
                assert pad is None or not pad.any(), (c, k)
        assert any(not torch.equal(seq[c][k], starts[c][k]) for k in seq[c])  # it trained


@pytest.mark.parametrize("aggregation", ["hetlora", "flexlora"])
def test_rank_runs_resume_identically_and_bytes_follow_the_ranks(synth_dir, tmp_path, aggregation):
    fedopt = {"client_ranks": [1, 2, 4], "rank_aggregation": aggregation}
    a = resumed_equals_straight(tiny_cfg(synth_dir, fed={"rounds": 3}, fedopt=fedopt), tmp_path)
    row = json.loads((a / "metrics.jsonl").read_text().splitlines()[0])
    up = [row["per_client"][str(c)]["bytes_up"] for c in range(3)]
    assert up[0] < up[1] < up[2] and row["rejected"] == 0


def test_budget_policy_picks_the_largest_rank_that_fits(synth_dir, tmp_path):
    ctx = build_context(tiny_cfg(synth_dir)).server()
    n = [int(x) for x in ctx.data.client_sizes]
    cost = {r: rank_bytes(ctx.init_state, r, n[1]) for r in (1, 2, 4)}
    assert cost[1] < cost[2] < cost[4]  # lora_r 4: A [r, 32] and B [out, r] per module
    fedopt = {"rank_policy": "budget", "client_bandwidth_budgets": [1e12, cost[2] + 1, 1e12]}
    cfg = tiny_cfg(synth_dir, fedopt=fedopt)  # model.lora_r 4
    assert choose_ranks(build_context(cfg).server()) == (4, 2, 4)
    simulate(cfg, tmp_path / "run", log=None)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["client_ranks"] == [4, 2, 4] and row["rejected"] == 0
    # what was counted on the wire for client 1 is what the policy planned for it
    assert row["per_client"]["1"]["bytes_up"] + row["per_client"]["1"][
        "bytes_down"
    ] == pytest.approx(cost[2], rel=0.01)
    small = config.with_overrides(cfg, fedopt={"client_bandwidth_budgets": [1e12, 10.0, 1e12]})
    with pytest.raises(ConfigError, match="fedopt.client_bandwidth_budgets"):
        choose_ranks(build_context(small).server())
