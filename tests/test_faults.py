"""Client faults (dropout, deadline, too few clients), update validation and a poisoned client."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_cfg
from fedtune.config import FedConfig
from fedtune.messages import PARAMETERS, SERVER, Message
from fedtune.runtime import faults, simulate


def metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dropout_draws_are_seeded_and_at_the_configured_rate():
    draws = [faults.drops_out(0.3, 0, r, c) for r in range(1, 2001) for c in range(5)]
    assert abs(np.mean(draws) - 0.3) < 0.015  # 10000 draws: 3 sigma is 0.014
    assert draws == [faults.drops_out(0.3, 0, r, c) for r in range(1, 2001) for c in range(5)]
    assert draws != [faults.drops_out(0.3, 1, r, c) for r in range(1, 2001) for c in range(5)]
    assert not any(faults.drops_out(0.0, 0, r, 0) for r in range(100))


def test_deadline_uses_measured_seconds_times_the_slowdown():
    fed = FedConfig(deadline_s=10.0, client_slowdown=(1.0, 100.0))
    assert not faults.misses_deadline(5.0, 0, fed)
    assert faults.misses_deadline(0.2, 1, fed)  # 0.2 s x 100 = 20 s > 10 s
    assert not faults.misses_deadline(1e6, 0, FedConfig())  # no deadline by default
    assert faults.too_few(1, 2) and not faults.too_few(2, 2)


def test_poison_scales_the_update_and_plain_tensors():
    sent = Message(PARAMETERS, 1, SERVER, "client-0", {"w": torch.tensor([1.0, 2.0])})
    reply = Message(
        PARAMETERS,
        1,
        "client-0",
        SERVER,
        {"w": torch.tensor([1.5, 1.0]), "n": torch.tensor([3]), "logits": torch.tensor([0.5])},
        {"loss": 1.0},
    )
    bad = faults.poison(reply, sent, 10.0)
    assert torch.equal(bad.tensors["w"], torch.tensor([6.0, -8.0]))  # 1 + 10 * 0.5, 2 + 10 * -1
    assert torch.equal(bad.tensors["n"], torch.tensor([3]))  # integers are left alone
    assert torch.equal(bad.tensors["logits"], torch.tensor([5.0]))
    assert bad.meta == {"loss": 1.0}


def test_30_percent_dropout_completes_every_round(synth_dir, tmp_path):
    cfg = tiny_cfg(synth_dir, fed={"rounds": 5, "dropout": 0.3})
    summary = simulate(cfg, tmp_path / "run", log=None)
    lines = metrics(tmp_path / "run")
    assert summary["rounds"] == 5 and [r["round"] for r in lines] == [1, 2, 3, 4, 5]
    dropped = [c for r in lines for c in r["dropped"]]
    # the seeded draws for seed 0: clients drop out in some rounds, and are counted
    expected = [c for r in range(1, 6) for c in range(3) if faults.drops_out(0.3, 0, r, c)]
    assert dropped == expected and len(dropped) > 0
    for r in lines:
        assert set(r["per_client"]) == {str(c) for c in r["clients"] if c not in r["dropped"]}
        assert not r["skipped"] and r["rejected"] == 0
    assert summary["final_accuracy"] is not None


def test_too_few_clients_retry_or_skip(synth_dir, tmp_path):
    logs: list[str] = []
    cfg = tiny_cfg(
        synth_dir, fed={"rounds": 2, "dropout": 0.5, "min_clients": 3, "on_too_few": "skip"}
    )
    simulate(cfg, tmp_path / "skip", log=logs.append)
    lines = metrics(tmp_path / "skip")
    skipped = [r["round"] for r in lines if r["skipped"]]
    assert skipped and all("train_loss" not in r for r in lines if r["skipped"])
    assert any("fewer than fed.min_clients=3; skipping the round" in x for x in logs)
    # retry: a fresh dropout draw per attempt, up to fed.max_retries more attempts
    cfg = tiny_cfg(
        synth_dir, fed={"rounds": 2, "dropout": 0.5, "min_clients": 3, "max_retries": 20}
    )
    simulate(cfg, tmp_path / "retry", log=None)
    lines = metrics(tmp_path / "retry")
    assert not any(r["skipped"] for r in lines) and max(r["attempts"] for r in lines) > 1
    assert all(r["dropped"] == [] for r in lines)  # the attempt that completed lost nobody


def test_a_straggler_past_the_deadline_is_left_out(synth_dir, tmp_path):
    cfg = tiny_cfg(
        synth_dir, fed={"rounds": 2, "deadline_s": 1000.0, "client_slowdown": [1.0, 1.0, 1e9]}
    )
    simulate(cfg, tmp_path / "run", log=None)
    for r in metrics(tmp_path / "run"):
        assert r["late"] == [2] and r["dropped"] == [] and not r["skipped"]
        # its upload went on the wire (the server discards it on arrival): counted, as sent
        up = {c: v["bytes_up"] for c, v in r["per_client"].items()}
        assert up["2"] == up["0"] > 0


@pytest.mark.slow
def test_a_poisoned_client_breaks_fedavg_not_median_or_trimmed_mean(synth_dir):
    """Client 0 sends global + 100 x its update. Measured (6 rounds, seed 0): clean FedAvg
    0.80, poisoned FedAvg 0.24 (chance 0.25), median 0.71, trimmed mean 0.71; norm bound 5
    rejects exactly the poisoned client (honest norms ~1, poisoned ~70-140). The default
    norm-ratio screen is off here, so that the aggregators see the poisoned update; with it
    on (the default) FedAvg is protected too."""

    def acc(**fed):
        fed = {"rounds": 6, "poison_clients": [0], "max_update_ratio": 0.0, **fed}
        cfg = tiny_cfg(synth_dir, fed=fed, train={"lr": 1e-2})
        return simulate(cfg, log=None)["final_accuracy"]

    assert acc() < 0.35
    assert acc(aggregator="median") > 0.6
    assert acc(aggregator="trimmed_mean", trim_ratio=0.34) > 0.6
    assert acc(max_update_ratio=10.0) > 0.6  # the default screen rejects the x100 update


def test_the_norm_bound_rejects_the_poisoned_update(synth_dir, tmp_path):
    cfg = tiny_cfg(synth_dir, fed={"rounds": 2, "poison_clients": [0], "max_update_norm": 5.0})
    simulate(cfg, tmp_path / "run", log=None)
    for r in metrics(tmp_path / "run"):
        assert r["rejected"] == 1 and list(r["rejected_reasons"]) == ["0"]
        assert "exceeds fed.max_update_norm=5" in r["rejected_reasons"]["0"]


@pytest.mark.parametrize("framework", ["kd", "split"])
def test_robust_aggregation_in_kd_and_split(synth_dir, tmp_path, framework):
    """A poisoned client (x100 update; KD: x100 logits) under the median: the run completes;
    split still learns (measured 0.80 after 6 rounds, 0.28 with FedAvg). The median itself is
    checked by hand in test_aggregate.py / test_kd.py. The default norm-ratio screen is off
    here: it would reject the poisoned update before the median sees it (tested below)."""
    cfg = tiny_cfg(
        synth_dir,
        fed={
            "rounds": 3,
            "framework": framework,
            "poison_clients": [0],
            "aggregator": "median",
            "max_update_ratio": 0.0,
        },
        kd={"public_samples": 40, "aggregate": "median"},
        train={"lr": 1e-2},
    )
    summary = simulate(cfg, tmp_path / "run", log=None)
    assert summary["rounds"] == 3 and all(r["rejected"] == 0 for r in metrics(tmp_path / "run"))
    if framework == "split":
        assert summary["final_accuracy"] > 0.4


@pytest.mark.parametrize("framework", ["fedllm", "split"])
def test_default_ratio_screen_rejects_an_absurd_update(synth_dir, tmp_path, framework):
    """No bound configured (fed.max_update_norm=0): a client sending global + 1e6 x its update
    is rejected by the default fed.max_update_ratio, every round, and the global state stays
    finite; the honest clients' run goes on."""
    cfg = tiny_cfg(
        synth_dir,
        fed={"rounds": 2, "framework": framework, "poison_clients": [1], "poison_scale": 1e6},
    )
    summary = simulate(cfg, tmp_path / "run", log=None)
    for r in metrics(tmp_path / "run"):
        assert list(r["rejected_reasons"]) == ["1"], r["rejected_reasons"]
        assert "fed.max_update_ratio" in r["rejected_reasons"]["1"]
    assert summary["rounds"] == 2 and np.isfinite(summary["final"]["test_loss"])
