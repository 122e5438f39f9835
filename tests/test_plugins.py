"""A fourth framework and a stateful aggregator, defined here and registered without editing the
package: they run in simulation with both executors and resume from a checkpoint.

``fedsgd``: every sampled client takes ``[fedsgd] local_steps`` optimizer steps (one by default,
FedSGD) from the global adapter and uploads it; the server combines the uploads with the
``fed.aggregator`` strategy. ``fedavgm``: FedAvg with server momentum (Hsu et al. 2019) on the
pseudo-gradient ``global - average``, whose momentum buffer is the strategy's state.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from conftest import tiny_cfg
from fedtune import aggregate, config, frameworks
from fedtune.execution.jobs import Train
from fedtune.messages import PARAMETERS, SERVER, Message, client_name
from fedtune.runtime import run
from fedtune.runtime.inprocess import InProcess


@dataclass(frozen=True)
class FedSGDConfig:
    local_steps: int = config.opt(1, "optimizer steps per client and round")


class FedSGDServer:
    def __init__(self, ctx) -> None:
        self.ctx, self.state = ctx, dict(ctx.init_state)
        self.strategy = aggregate.build(ctx.cfg.fed)
        SERVERS.append(self)

    def round(self, rnd, clients):
        replies = yield {
            c: Message(PARAMETERS, rnd, SERVER, client_name(c), self.state) for c in clients
        }
        ok = sorted(replies)
        weights = [float(replies[c].meta["num_samples"]) for c in ok]
        self.state = self.strategy(self.state, [replies[c].tensors for c in ok], weights)
        return {"train_loss": sum(float(replies[c].meta["loss"]) for c in ok) / len(ok)}

    def eval_state(self):
        return self.state

    def params_exchanged(self):
        return sum(t.numel() for t in self.state.values())

    def state_dict(self):
        return {"state": self.state, "aggregator": self.strategy.state_dict()}

    def load_state_dict(self, d):
        self.state = d["state"]
        self.strategy.load_state_dict(d["aggregator"])


class FedSGDClient:
    def __init__(self, ctx) -> None:
        self.ctx, self.cid = ctx, ctx.cid

    def handle(self, msg, link=None):
        cfg, idx = self.ctx.cfg, self.ctx.data.samples
        stream = (cfg.seed, msg.round, self.cid)
        job = Train(
            msg.tensors,
            None,
            self.ctx.data.train,
            idx,
            self.ctx.task.loss(),
            stream,
            steps=cfg.fedsgd.local_steps,
        )
        result = yield job
        meta = {"num_samples": len(idx), "loss": result.loss}
        return Message(PARAMETERS, msg.round, client_name(self.cid), SERVER, result.state, meta)

    def state_dict(self):
        return {}

    def load_state_dict(self, d):
        pass


class FedAvgM:
    """``m <- beta * m + (global - average)``; ``global <- global - lr * m``."""

    def __init__(self, fed, beta: float = 0.9, lr: float = 1.0) -> None:
        self.beta, self.lr, self.m = beta, lr, {}

    def __call__(self, ref, states, weights):
        avg = aggregate.weighted_average(states, weights)
        for k, v in avg.items():
            self.m[k] = self.beta * self.m.get(k, torch.zeros_like(v)) + (ref[k] - v)
        return {k: ref[k] - self.lr * self.m[k] for k in avg}

    def state_dict(self):
        return {"m": self.m}

    def load_state_dict(self, d):
        self.m = dict(d["m"])


SERVERS: list[FedSGDServer] = []


@pytest.fixture
def plugins():
    frameworks.register("fedsgd", FedSGDServer, FedSGDClient, config=FedSGDConfig)
    aggregate.register("fedavgm", FedAvgM)
    SERVERS.clear()
    yield
    frameworks.unregister("fedsgd")
    aggregate.unregister("fedavgm")


def test_fedavgm_keeps_momentum_across_rounds():
    ref = {"w": torch.tensor([1.0, 1.0])}
    s = FedAvgM(None, beta=0.5)
    # round 1: average [0, 2] (weights 1, 1 of [0, 1] and [0, 3]): m = [1, -1], new = [0, 2]
    new = s(ref, [{"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([0.0, 3.0])}], [1, 1])
    assert new["w"].tolist() == [0.0, 2.0]
    # round 2: average equals the reference: m = 0.5 * [1, -1] + 0 -> new = ref - m
    new = s(new, [{"w": torch.tensor([0.0, 2.0])}], [5])
    assert new["w"].tolist() == [-0.5, 2.5]


def test_a_fourth_framework_runs_with_both_executors(plugins, synth_dir):
    cfg = config.with_overrides(
        tiny_cfg(synth_dir, model="tiny-llama", fed={"framework": "fedsgd", "rounds": 3}),
        model={"lora_dropout": 0.0},
        fed={"aggregator": "fedavgm"},
        fedsgd={"local_steps": 2},
        # SGD: an update is linear in the gradient, so the executors' float rounding (differently
        # shaped matmuls, ~1e-7 relative) stays that small; Adam divides by sqrt(v) and can turn
        # a rounding difference in a near-zero gradient into a step of up to lr.
        train={"optimizer": "sgd", "lr": 0.5},
    )
    assert cfg.fedsgd.local_steps == 2 and "[fedsgd]" in config.to_toml(cfg)
    assert "fedsgd.local_steps" in config.describe()
    results = {}
    for engine in ("sequential", "batched"):
        c = config.with_overrides(cfg, fed={"engine": engine})
        results[engine] = run(c, InProcess(), log=None)
    seq, bat = (SERVERS[-2].state, SERVERS[-1].state)
    moved = max((seq[k] - SERVERS[-2].ctx.init_state[k]).abs().max().item() for k in seq)
    assert moved > 1e-3
    # The same updates up to float32 rounding of differently shaped matmuls: ~1e-7 relative per
    # op, summed over batch and hidden dims, through 6 SGD steps at lr 0.5 and a momentum that
    # amplifies up to 1 + 0.9 + 0.81; values move by up to ~1, so 1e-4 absolute. A wrong batch,
    # loss or optimizer step differs by O(0.1).
    for k in seq:
        torch.testing.assert_close(bat[k], seq[k], atol=1e-4, rtol=1e-4)
    a, b = results["sequential"], results["batched"]
    assert [r["bytes_up_per_client"] for r in a.history] == [
        r["bytes_up_per_client"] for r in b.history
    ]
    assert len(a.history) == 3 and all(r["client_flops"] > 0 for r in b.history)


def test_the_stateful_aggregator_is_checkpointed(plugins, synth_dir, tmp_path):
    cfg = config.with_overrides(
        tiny_cfg(synth_dir, model="tiny-llama", fed={"framework": "fedsgd", "rounds": 3}),
        model={"lora_dropout": 0.0},
        fed={"aggregator": "fedavgm"},
        flops="off",  # about resuming, not measuring (counting changes no number)
    )
    whole = run(cfg, InProcess(), tmp_path / "whole", log=None)

    def stop_after_round_2(record):
        if record["round"] == 2:
            raise KeyboardInterrupt  # as if killed right after round 2's checkpoint

    with pytest.raises(KeyboardInterrupt):
        run(cfg, InProcess(), tmp_path / "cut", log=None, on_round=stop_after_round_2)
    resumed = run(cfg, InProcess(), tmp_path / "cut", log=None, resume=True)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]
    assert resumed.summary["final_accuracy"] == whole.summary["final_accuracy"]
    # round 3's update adds 0.9 x the momentum of rounds 1-2: equal only if it was restored
    for k, v in SERVERS[0].state.items():
        assert torch.equal(SERVERS[-1].state[k], v)
        assert torch.equal(SERVERS[-1].strategy.m[k], SERVERS[0].strategy.m[k])
