"""Split-FedLLM's client: its first blocks' forward (c1), the exchange with the server (c2, c4)
and the backward through its blocks (c5); uploads its LoRA each round (cc1)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ... import compute, seeds
from ...aggregate import update_problem
from ...context import ClientContext
from ...data import batches, join_batches
from ...errors import MessageError
from ...execution.train import make_optimizer, optimizer_step, shape_of, to_device
from ...fedopt import client_control, drift_step, split_control, with_control
from ...messages import (
    ACTIVATIONS,
    GRADIENTS,
    LABELS,
    PARAMETERS,
    SECAGG,
    SERVER,
    Message,
    client_name,
)
from ...models import load_trainable_state, num_blocks
from ...privacy import dp, outputs, privatize, secagg, secure_session
from .config import is_u_shaped
from .layers import round_samples
from .model import client_forward, compress, decompress, keep_client_half


def round_labels(round_batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """What the server needs to compute the loss of every batch of the round, rows in order:
    classification ``labels [N]``; generation the response positions and their tokens
    ``target_pos``, ``target_ids [N, R]`` (int32, padded to the round's widest row with 0 and
    -100): in generative split learning the labels ARE the text."""
    if "target_ids" not in round_batches[0]:
        return {"labels": torch.cat([b["labels"] for b in round_batches])}
    joined = join_batches(
        [{k: b[k] for k in ("target_pos", "target_ids")} for b in round_batches], 0
    )
    return {k: v.to(torch.int32) for k, v in joined.items()}


class Client:
    """A simulated client: its optimizer over its own blocks' LoRA, never a model copy."""

    def __init__(self, ctx: ClientContext) -> None:
        self.ctx, self.cid = ctx, ctx.cid
        self.opt: torch.optim.Optimizer | None = None
        self.saved_opt: dict | None = None  # optimizer state from a checkpoint, loaded lazily
        # privacy.split_noise: the round's noise stream and how often each sample was sent
        self.noise: torch.Generator | None = None
        self.uses = np.zeros(len(ctx.data.train), dtype=np.int64)
        self.session: secagg.ClientSession | None = None  # this round's secure sum
        # fedopt: the round's received LoRA, our tensors of it, SCAFFOLD's c - c_i
        self.drift: tuple = ({}, [], None)
        self.control: dict[str, torch.Tensor] = {}  # SCAFFOLD's c_i (zeros until round 1)

    def state_dict(self) -> dict:
        opt = self.opt.state_dict() if self.opt is not None else self.saved_opt
        d = {"opt": opt, "uses": torch.from_numpy(self.uses)}
        return {**d, "control": self.control} if self.ctx.cfg.fedopt.scaffold else d

    def load_state_dict(self, d: dict) -> None:
        self.opt, self.saved_opt = None, d["opt"]
        if "uses" in d:
            self.uses = d["uses"].numpy().astype(np.int64).copy()
        self.control = dict(d.get("control") or {})

    def handle(self, msg: Message, link) -> Message | None:
        ctx, rnd, me = self.ctx, msg.round, client_name(self.cid)
        if msg.kind == SECAGG:  # a later step of this round's secure sum (cc1)
            return self.session.reply(msg) if self.session else None
        t = ctx.cfg.train
        stream = seeds.client(ctx.cfg.seed, rnd, self.cid)
        seeds.seed_torch(stream)  # dropout is reproducible per (round, client)
        k = msg.meta.get("split_layer")
        n = num_blocks(ctx.model)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < n:
            raise MessageError(f"split layer {k!r} from the server is not in [1, {n})")
        if ctx.owns_model:  # deployed: hold only what this client runs
            keep_client_half(ctx.model, k)
        sent, c = split_control(msg.tensors)  # SCAFFOLD's c travels with the LoRA
        correction = None
        if ctx.cfg.fedopt.scaffold:
            if update_problem(c, sent):
                raise MessageError("the server's control variates do not match its LoRA")
            self.control = self.control or {n: torch.zeros_like(t) for n, t in c.items()}
            correction = {n: c[n] - self.control[n] for n in c}
        load_trainable_state(ctx.model, sent)  # cc4: the aggregate replaces its LoRA
        params = dict(ctx.model.named_parameters())
        mine = [params[n] for n in sent]
        # fedopt.prox_mu: each step is pulled toward the LoRA this round started from
        self.drift = (sent, [(n, params[n]) for n in sent], correction)
        if self.opt is None or t.optimizer_state == "reset":
            self.opt = make_optimizer(mine, t)
            if self.saved_opt is not None and t.optimizer_state == "keep":
                self.opt.load_state_dict(self.saved_opt)  # resumed from a checkpoint
            self.saved_opt = None
        ctx.model.train()
        idx = round_samples(ctx.cfg, ctx.data.samples, self.cid, rnd)
        p = ctx.cfg.privacy
        if p.split_noise > 0:  # each sample's activations are sent once this round
            self.noise = dp.generator(
                p.reproducible_noise, (ctx.cfg.seed, rnd, seeds.DP_NOISE, self.cid)
            )
            np.add.at(self.uses, idx, 1)
        rng = seeds.rng(stream)
        round_batches = list(
            batches(ctx.data.train, idx, t.batch_size, ctx.data.pad_id, rng, t.group_by_length)
        )
        if not is_u_shaped(ctx.cfg):  # c2 (labels): every batch's labels of the round, in order
            link.call(Message(LABELS, rnd, me, SERVER, round_labels(round_batches)))
        losses = []
        for batch in round_batches:
            losses.append(self.step(to_device(batch, ctx.device), k, link, rnd))
        compute.hold(self.opt.state)  # held while it trained
        # cc1: upload the client-side LoRA with the number of samples it was trained on
        # (privacy.dp=local: clipped and noised before it leaves the client).
        upload = {n: params[n].detach().clone() for n in sent}
        meta = {
            "num_samples": len(idx),
            "loss": float(np.mean(losses)),
            "steps": len(round_batches),
            **self.activation_privacy(),
        }
        if p.secagg:  # cc1 happens inside the secure sum; first, the keys
            self.session = secure_session(ctx.cfg, upload, sent, msg.meta, len(idx), rnd, self.cid)
            return self.session.advertise(meta) if self.session else None
        if p.dp == "local":
            upload, _ = privatize(ctx.cfg, upload, sent, rnd, self.cid)
        if correction is not None:  # c_i moves; its change travels with the LoRA (cc1)
            args = (sent, upload, c, self.control, len(round_batches), t.lr)
            self.control, change = client_control(*args)
            upload = with_control(upload, change)
        return Message(PARAMETERS, rnd, me, SERVER, upload, meta)

    def activation_privacy(self) -> dict:
        """``privacy.split_noise``: epsilon of this client's most-sent sample's activations."""
        p = self.ctx.cfg.privacy
        if p.split_noise == 0:
            return {}
        eps = outputs.split_epsilon(p.split_noise, p.split_clip, int(self.uses.max()), p.delta)
        return {"activation_epsilon": eps if math.isfinite(eps) else None}

    def step(self, batch: dict, k: int, link, rnd: int) -> float:
        """One split training step on ``input_ids [B, L]``; returns the batch loss."""
        ctx, s, amp = self.ctx, self.ctx.cfg.split, self.ctx.cfg.train.autocast
        # the FLOPs of a step depend on the batch's shape (generation: also its R response
        # positions, where the LM head runs)
        me, key = client_name(self.cid), ("split-client", amp, *shape_of(batch), k)
        self.opt.zero_grad(set_to_none=True)
        mine = [p for g in self.opt.param_groups for p in g["params"]]
        # c1: embeddings + blocks [0, k) with the client's LoRA.
        h = compute.step(
            (*key, "forward"),
            lambda: client_forward(ctx.model, batch["input_ids"], batch["attention_mask"], k, amp),
        )
        if self.noise is not None:  # clipped per sample and noised before they leave
            p = ctx.cfg.privacy
            h = outputs.noisy_activations(h, p.split_clip, p.split_noise, self.noise)
        # c2: cut-layer activations + mask to the server (c3 runs there; the link pauses our meter).
        x = compress(h, s.compression, s.topk_ratio)
        mask = batch["attention_mask"].bool()
        reply = link.call(Message(ACTIVATIONS, rnd, me, SERVER, {**x, "mask": mask}))
        hidden = ctx.model.config.hidden_size  # ours, never read from a message
        if is_u_shaped(ctx.cfg):  # the head and the loss stay here; send back d loss / d pooled
            pooled = decompress(reply.tensors, s.compression, hidden)
            pooled = pooled.to(ctx.device).requires_grad_()

            def head(pooled=pooled):
                loss = ctx.task.loss()(ctx.task.head(ctx.model, pooled, batch, amp), batch)
                loss.backward()
                return loss

            loss = compute.step((*key, "head"), head, grads=[*mine, pooled])
            g = compress(pooled.grad, s.compression, s.topk_ratio)
            reply = link.call(Message(GRADIENTS, rnd, me, SERVER, g))
            loss_value = loss.detach().item()
        else:
            loss_value = float(reply.meta["loss"])
        # c4 -> c5: back-propagate the received d loss / d h and update the client LoRA.
        grad = decompress(reply.tensors, s.compression, hidden).to(ctx.device, h.dtype)
        # counted first, on the graph kept for it; then the real backward frees the graph
        compute.step(
            (*key, "backward"),
            lambda: h.backward(grad),
            lambda: h.backward(grad, retain_graph=True),
            grads=mine,
        )
        anchor, named, correction = self.drift
        if ctx.cfg.fedopt.prox_mu > 0 or correction is not None:
            drift_step(named, ctx.cfg.fedopt.prox_mu, anchor, correction)
        optimizer_step(self.opt, mine, ctx.cfg.train)
        return loss_value
