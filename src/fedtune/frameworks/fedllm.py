"""FedLLM: federated averaging of LoRA adapters (the paper's workflow a1-a4).

a1  the server sends the global LoRA + head tensors to each sampled client;
a2  each client fine-tunes them on its private data (Adam, lr 1e-3 by default);
a3  each client uploads its updated tensors and its sample count;
a4  the server checks every upload (names, shapes, dtypes, NaN/Inf, ``fed.max_update_norm``),
    drops the invalid ones and combines the rest with ``fed.aggregator`` (FedAvg weighted by
    sample count by default; coordinate-wise median or trimmed mean against poisoned clients).
    Clients that did not reply (dropout, deadline) are simply absent from the replies.
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
import torch

from ..aggregate import aggregate, screen_updates
from ..context import Context
from ..engine import BATCHED_STREAM, ClientJob, train_many
from ..messages import PARAMETERS, SERVER, Message, client_name
from ..train import seed_everything, train_local

NAME = "fedllm"


class Server:
    """Holds the global trainable state; one ``round`` = a1 (send) then a4 (average)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.global_state = {k: v.clone() for k, v in ctx.init_state.items()}

    def round(self, rnd: int, clients: list[int]) -> Generator[dict, dict, dict]:
        # a1: broadcast the global adapter.
        replies: dict[int, Message] = yield {
            cid: Message(PARAMETERS, rnd, SERVER, client_name(cid), self.global_state)
            for cid in clients
        }
        # a4: validate the uploads (a3), then aggregate the accepted ones.
        fed = self.ctx.cfg.fed
        sent = {cid: self.global_state for cid in replies}
        ok, rejected = screen_updates({c: m.tensors for c, m in replies.items()}, sent,
                                      fed.max_update_norm, {c: m.meta for c, m in replies.items()})  # fmt: skip
        metrics: dict = {"rejected": len(rejected), "rejected_reasons": rejected}
        if not ok:  # nothing usable: the global state stays as it was
            return metrics
        weights = [float(replies[c].meta["num_samples"]) for c in ok]
        self.global_state = aggregate([replies[c].tensors for c in ok], weights, fed.aggregator,
                                      fed.trim_ratio)  # fmt: skip
        losses = [float(replies[c].meta["loss"]) for c in ok]
        return {"train_loss": float(np.average(losses, weights=weights)), **metrics}

    def eval_state(self) -> dict[str, torch.Tensor]:
        return self.global_state

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume (tensors and small JSON-able values)."""
        return {"global_state": self.global_state}

    def load_state_dict(self, d: dict) -> None:
        self.global_state = {k: v.to(self.ctx.device) for k, v in d["global_state"].items()}


class Client:
    """A simulated client is its data indices and optimizer state, never a model copy."""

    def __init__(self, ctx: Context, cid: int) -> None:
        self.ctx, self.cid = ctx, cid
        self.opt_state: dict | None = None

    def state_dict(self) -> dict:
        return {"opt_state": self.opt_state}

    def load_state_dict(self, d: dict) -> None:
        self.opt_state = d["opt_state"]

    def handle(self, msg: Message, link=None) -> Message:
        ctx, rnd = self.ctx, msg.round
        seed_everything(ctx.cfg.seed, rnd, self.cid)  # dropout is reproducible per (round, client)
        # a2: local fine-tuning starting from the received global adapter.
        result = train_local(
            ctx.model,
            msg.tensors,
            self.opt_state,
            ctx.data.train,
            ctx.client_samples(self.cid),
            ctx.cfg.train,
            np.random.default_rng([ctx.cfg.seed, rnd, self.cid]),
            ctx.data.pad_id,
            ctx.device,
            desc=f"round {rnd} client {self.cid}",
            progress=ctx.progress,
        )
        return self.upload(rnd, result)

    def upload(self, rnd: int, result) -> Message:
        """a3: the trained adapter with the sample count used as its FedAvg weight."""
        self.opt_state = result.opt_state
        return Message(
            PARAMETERS,
            rnd,
            client_name(self.cid),
            SERVER,
            result.state,
            {"num_samples": len(self.ctx.client_samples(self.cid)), "loss": result.loss,
             "steps": result.steps},
        )  # fmt: skip


def handle_many(ctx: Context, clients: list[Client], msgs: list[Message]) -> list[Message]:
    """a2 + a3 for several clients in one batched loop (``fed.engine=batched``): the same
    updates as calling each ``Client.handle`` in turn (see :mod:`fedtune.engine`)."""
    jobs = [
        ClientJob(m.tensors, c.opt_state, ctx.client_samples(c.cid),
                  np.random.default_rng([ctx.cfg.seed, m.round, c.cid]))
        for c, m in zip(clients, msgs, strict=True)
    ]  # fmt: skip
    seed_everything(ctx.cfg.seed, msgs[0].round, BATCHED_STREAM)  # one dropout stream per round
    results = train_many(ctx.model, jobs, ctx.data.train, ctx.cfg.train, ctx.data.pad_id,
                         ctx.device)  # fmt: skip
    return [c.upload(m.round, r) for c, m, r in zip(clients, msgs, results, strict=True)]
