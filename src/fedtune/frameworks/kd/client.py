"""KD-FedLLM's client: fine-tunes its own model (b1), uploads its public logits (b2, b3) and
distils the global logits into its model (b8). See the package docstring."""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
import torch

from ... import seeds
from ...context import ClientContext, ServerContext
from ...errors import MessageError
from ...execution.jobs import Predict, Train
from ...execution.train import clients_mean, evaluate, num_local_steps
from ...messages import LABELS, LOGITS, METADATA, SERVER, Message, client_name
from ...privacy import dp, dpsgd, outputs
from .common import distill_batch_size, public_candidates
from .knowledge import knowledge


class Client:
    """A client's persistent local model is its trainable state + optimizer state (no model
    copy) and the public selection of the current round."""

    def __init__(self, ctx: ClientContext) -> None:
        self.ctx, self.cid = ctx, ctx.cid
        self.state = {k: v.clone() for k, v in ctx.init_state.items()}
        self.opt_state: dict | None = None
        self.candidates = public_candidates(ctx)
        self.knowledge = knowledge(ctx)  # class logits, or per-token (generation)
        self.selection = self.candidates  # positions in the public set: this round's
        self.rounds_trained = 0  # privacy.dpsgd's accounting

    def state_dict(self) -> dict:
        d = {"state": self.state, "opt_state": self.opt_state, "selection": self.selection}
        return {**d, "rounds_trained": self.rounds_trained}

    def load_state_dict(self, d: dict) -> None:
        self.state = {k: v.to(self.ctx.device) for k, v in d["state"].items()}
        self.opt_state, self.selection = d["opt_state"], np.asarray(d["selection"])
        self.rounds_trained = int(d.get("rounds_trained", 0))

    def handle(self, msg: Message, link=None) -> Generator[Train | Predict, object, Message | None]:
        if msg.kind == METADATA and msg.meta.get("request") == "labels":
            return self.send_histogram(msg.round)
        if msg.kind == METADATA:
            self.select(msg)
            # b1: fine-tune the local model on the private data.
            ctx, idx = self.ctx, self.ctx.data.samples
            steps = num_local_steps(len(idx), ctx.cfg.train)
            stream = seeds.client(ctx.cfg.seed, msg.round, self.cid)
            loss = ctx.task.loss()
            result = yield Train(
                self.state, self.opt_state, ctx.data.train, idx, loss, stream, steps, private=True
            )
            self.state, self.opt_state = result.state, result.opt_state
            self.rounds_trained += 1
            # b2: logits on the public selection (its labels are never read here).
            logits = yield self.knowledge.predict(self.state, self.selection)
            return self.upload(msg.round, result.loss, logits)
        if msg.kind == LOGITS:
            return (yield from self.distill_global(msg))
        raise MessageError(f"client {self.cid} cannot handle a {msg.kind!r} message")

    def send_histogram(self, rnd: int) -> Message:
        """Alignment: the private label counts ``[C]`` (int32), sent once."""
        d = self.ctx.data
        hist = np.bincount(d.train.labels, minlength=d.num_labels)
        return Message(
            LABELS,
            rnd,
            client_name(self.cid),
            SERVER,
            {"histogram": torch.from_numpy(hist.astype(np.int32))},
        )

    def select(self, msg: Message) -> None:
        if "keep" in msg.tensors:  # the server pruned the public set for this round
            n, keep = len(self.candidates), msg.tensors["keep"]
            if keep.dtype != torch.uint8 or tuple(keep.shape) != (-(-n // 8),):
                raise MessageError(f"public selection mask {list(keep.shape)} is not {n} bits")
            mask = np.unpackbits(keep.numpy(), count=n).astype(bool)
            if not mask.any():
                raise MessageError("public selection mask selects no sample")
            self.selection = self.candidates[mask]

    def upload(self, rnd: int, loss: float, logits: torch.Tensor) -> Message:
        """b3: upload the logits, compressed; the loss is fixed-width so sizes do not depend
        on it."""
        meta = {"num_samples": len(self.ctx.data.train), "loss": f"{loss:.6e}"}
        meta.update(dpsgd.report(self.ctx.cfg, len(self.ctx.data.samples), self.rounds_trained))
        p, cfg = self.ctx.cfg.privacy, self.ctx.cfg
        if p.kd_noise > 0:  # noisy probabilities, PATE-style (fedtune.privacy.outputs)
            gen = dp.generator(p.reproducible_noise, (cfg.seed, rnd, seeds.DP_NOISE, self.cid))
            logits = outputs.noisy_logits(logits, cfg.kd.temperature, p.kd_noise, gen)
        tensors = self.knowledge.pack(logits, self.selection)
        return Message(LOGITS, rnd, client_name(self.cid), SERVER, tensors, meta)

    def distill_global(self, msg: Message) -> Generator[Train, object, None]:
        """b8: distil the global model's logits on the selection into the local model."""
        ctx, kd = self.ctx, self.ctx.cfg.kd
        if kd.client_distill_epochs == 0:
            return None
        teacher = self.knowledge.teacher(self.knowledge.unpack(msg, self.selection, SERVER))
        data = self.knowledge.train_data(teacher, self.selection)
        result = yield Train(
            self.state,
            self.opt_state,
            data,
            np.arange(len(data)),
            self.knowledge.loss(teacher, self.selection),
            seeds.client(ctx.cfg.seed, msg.round, self.cid, job=1),
            epochs=kd.client_distill_epochs,
            batch_size=distill_batch_size(ctx),
        )
        self.state, self.opt_state = result.state, result.opt_state
        return None


def client_eval(ctx: ServerContext, server, clients: dict[int, Client]) -> dict:
    """Mean test accuracy (generation: perplexity) of the clients' local models (the global
    model is the headline)."""
    if not ctx.cfg.kd.client_eval:
        return {}
    return clients_mean(
        [evaluate(ctx, cl.state, ctx.data.test) for _, cl in sorted(clients.items())]
    )
