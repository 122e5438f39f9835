"""Split-FedLLM (SplitLoRA): the client runs the first blocks, the server the rest; activations
and their gradients cross the network per batch (the paper's workflow c1-c5, cc1-cc4).

Per batch (``split.split_layer = k``, see :mod:`fedtune.split_model` for the cut):

c1  the client runs the embeddings and blocks ``[0, k)`` with its LoRA: ``h [B, L, H]``;
c2  it sends ``h`` (encoded by ``split.compression``) and the attention mask ``[B, L]`` as one
    ACTIVATIONS message. Labels go in one LABELS message per round, holding the labels of all
    the round's batches in batch order (the server takes ``B`` of them per batch): the same
    information as per-batch labels, counted under their own kind;
c3  the server runs blocks ``[k, n)``, the final norm and the head with its own LoRA, computes
    the cross-entropy, back-propagates and updates its LoRA and head (Adam);
c4  it returns ``dL/dh`` (encoded the same way) as a GRADIENTS message;
c5  the client back-propagates ``dL/dh`` through its blocks and updates its LoRA.

U-shaped (``split.u_shaped``): the head stays on the client and labels never leave it. In c3
the server stops after the final norm and returns the pooled last hidden states ``[B, H]``
(ACTIVATIONS, down; pooling at each row's last non-pad token is what HF's classifier does, and
the server knows those positions from the mask); the client runs the head and the loss and
sends the gradient of the pooled states (GRADIENTS, up); the server back-propagates, updates
and returns ``dL/dh`` (c4).

Per round:

cc1  the server sends each client the averaged client-side LoRA of its blocks and its split layer;
cc2  the client runs c1-c5 on ``split.samples_per_round`` of its samples (0 = local epochs);
cc3  it uploads its client-side LoRA and the number of samples it processed;
cc4  the server averages every tensor by sample count over the parties that trained it: the
     clients that own its block and, for server-side blocks, the server model(s).

``split.server_mode``: 'shared' trains one server-side model on all clients' batches in turn
(SplitLoRA); 'per_client' trains one server-side copy per client, averaged in cc4.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .. import compute
from ..aggregate import aggregate, screen_updates
from ..context import Context
from ..data import batches
from ..errors import ConfigError, MessageError
from ..messages import (
    ACTIVATIONS,
    GRADIENTS,
    LABELS,
    METADATA,
    PARAMETERS,
    SERVER,
    Message,
    client_name,
    encode,
)
from ..models import load_trainable_state
from ..split_model import (
    client_forward,
    compress,
    decompress,
    head_logits,
    num_blocks,
    part_names,
    server_forward,
)
from ..train import make_optimizer, optimizer_step, seed_everything, to_device

NAME = "split"


def round_samples(ctx: Context, cid: int, rnd: int) -> np.ndarray:
    """The sample indices client ``cid`` trains on in round ``rnd`` (shuffled, seeded).

    ``split.samples_per_round`` samples, else ``train.local_steps`` batches, else
    ``train.local_epochs`` passes; more than one pass concatenates fresh permutations."""
    idx, t = ctx.client_samples(cid), ctx.cfg.train
    n = (
        ctx.cfg.split.samples_per_round
        or (t.local_steps * t.batch_size)
        or t.local_epochs * len(idx)
    )
    rng = np.random.default_rng([ctx.cfg.seed, rnd, cid, 1])
    return np.concatenate([rng.permutation(idx) for _ in range(-(-n // len(idx)))])[:n]


# ----------------------------------------------------------------------------- split layers


def client_step_flops(ctx: Context, k: int) -> int:
    """FLOPs of one client forward + backward (c1 + c5) at split layer ``k`` on a full-length
    batch ``[batch_size, model.max_length]``, counted with torch's FlopCounterMode."""
    b, length = ctx.cfg.train.batch_size, ctx.cfg.model.max_length
    ids = torch.ones(b, length, dtype=torch.long, device=ctx.device)
    with FlopCounterMode(display=False) as counter:
        h = client_forward(ctx.model, ids, torch.ones_like(ids), k, ctx.cfg.train.autocast)
        h.float().sum().backward()
    ctx.model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def wire_bytes_per_round(ctx: Context, k: int, num_samples: int) -> int:
    """Estimated bytes (up + down) one client at split layer ``k`` puts on the wire per round:
    the real messages encoded, with every batch padded to ``model.max_length``."""
    cfg, b = ctx.cfg, ctx.cfg.train.batch_size
    hidden = ctx.model.config.hidden_size
    x, meta = compress(torch.zeros(b, cfg.model.max_length, hidden), cfg.split.compression,
                       cfg.split.topk_ratio)  # fmt: skip
    mask = {"mask": torch.ones(b, cfg.model.max_length, dtype=torch.bool)}
    per_batch = 2 * len(encode(Message(ACTIVATIONS, 1, SERVER, "client-0", {**x, **mask}, meta)))
    if cfg.split.u_shaped:  # pooled states down and their gradient up, [B, H] each
        p, meta = compress(torch.zeros(b, hidden), cfg.split.compression, cfg.split.topk_ratio)
        per_batch += 2 * len(encode(Message(GRADIENTS, 1, SERVER, "client-0", p, meta)))
    labels = {"labels": torch.zeros(num_samples, dtype=torch.long)}
    once = len(encode(Message(LABELS, 1, SERVER, "client-0", labels)))
    state = {n: ctx.init_state[n] for n in part_names(ctx.model, k, "client", cfg.split.u_shaped)}
    once += 2 * len(encode(Message(PARAMETERS, 1, SERVER, "client-0", state, {"num_samples": 0})))
    return -(-num_samples // b) * per_batch + once


def choose_split_layers(ctx: Context) -> list[int]:
    """Each client's split layer ``k`` (``1 <= k < n`` blocks).

    policy=fixed: ``split.client_split_layers`` or ``split.split_layer`` for all.
    policy=budget: the deepest ``k`` whose estimated client FLOPs per round (full-length
    batches) and bytes per round fit the client's budgets. Deeper cuts keep more of the model,
    and more of the raw input's traces, on the client, and both costs grow with ``k`` (client
    blocks; client LoRA exchanged in cc1/cc3), so the deepest layer that fits is the most the
    client can afford. No fitting layer is a ConfigError."""
    s, n = ctx.cfg.split, num_blocks(ctx.model)
    num_clients = len(ctx.data.client_idx)
    for key in ("client_split_layers", "client_compute_budgets", "client_bandwidth_budgets"):
        values = getattr(s, key)
        if values and len(values) != num_clients:
            raise ConfigError(f"config key split.{key}: needs {num_clients} values "
                              f"(one per client), got {len(values)}")  # fmt: skip
    layers = list(s.client_split_layers) or [s.split_layer] * num_clients
    if s.policy == "budget":
        # Client FLOPs are linear in k from k = 1 on (identical blocks), so two counts suffice.
        f1, f2 = client_step_flops(ctx, 1), client_step_flops(ctx, 2)
        full = client_step_flops(ctx, n)  # whole model on the client: the base of relative budgets
        layers = []
        for cid in range(num_clients):
            m = len(round_samples(ctx, cid, 1))
            steps = -(-m // ctx.cfg.train.batch_size)
            compute_budget = s.client_compute_budgets[cid] if s.client_compute_budgets else math.inf
            if compute_budget <= 1:
                compute_budget *= full * steps
            bw_budget = s.client_bandwidth_budgets[cid] if s.client_bandwidth_budgets else math.inf
            fits = [k for k in range(1, n)
                    if steps * (f1 + (k - 1) * (f2 - f1)) <= compute_budget
                    and wire_bytes_per_round(ctx, k, m) <= bw_budget]  # fmt: skip
            if not fits:
                raise ConfigError(
                    f"config key split.client_compute_budgets: no split layer fits client {cid}; "
                    f"layer 1 needs {steps * f1:.3g} FLOPs and "
                    f"{wire_bytes_per_round(ctx, 1, m):.3g} bytes per round"
                )
            layers.append(max(fits))
    for cid, k in enumerate(layers):
        if not 1 <= k < n:
            raise ConfigError(f"config key split.split_layer: client {cid} split layer {k} must "
                              f"be in [1, {n - 1}] for a model with {n} blocks")  # fmt: skip
    return layers


# ----------------------------------------------------------------------------- server


class Server:
    """Holds the global state (all LoRA + head) and the server-side model(s) trained in c3."""

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.s = ctx, ctx.cfg.split
        self.layers = choose_split_layers(ctx)
        u = self.s.u_shaped
        self.client_keys = [part_names(ctx.model, k, "client", u) for k in self.layers]
        self.server_keys = [part_names(ctx.model, k, "server", u) for k in self.layers]
        self.cid = {client_name(c): c for c in range(len(self.layers))}
        self.global_state = {k: v.clone() for k, v in ctx.init_state.items()}
        self.states: dict = {}  # slot ('shared' or cid) -> server-side tensors
        self.opts: dict = {}  # slot -> optimizer, kept across rounds like the clients' Adam
        self.labels: dict[int, torch.Tensor] = {}  # cid -> this round's labels not yet used
        self.pending: dict[int, tuple] = {}  # U-shaped: cid -> (h, pooled) between two calls
        self.serve_seconds = 0.0
        self.saved_opts: dict = {}  # slot -> optimizer state from a checkpoint, loaded lazily

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume: the global state and the server-side
        optimizer states (the per-round server copies start from the global state)."""
        opts = {**self.saved_opts, **{s: o.state_dict() for s, o in self.opts.items()}}
        return {"global_state": self.global_state, "opts": opts}

    def load_state_dict(self, d: dict) -> None:
        self.global_state = {k: v.to(self.ctx.device) for k, v in d["global_state"].items()}
        self.opts, self.saved_opts = {}, dict(d["opts"])

    def slot(self, cid: int):
        return "shared" if self.s.server_mode == "shared" else cid

    def round(self, rnd: int, clients: list[int]) -> Generator[dict, dict, dict]:
        self.serve_seconds = 0.0
        if self.ctx.cfg.train.optimizer_state == "reset":
            self.opts.clear()
            self.saved_opts.clear()
        everyone = range(len(self.layers))
        for cid in clients:  # server-side model(s) start the round from the global state
            keys = [
                n for c in everyone if self.slot(c) == self.slot(cid) for n in self.server_keys[c]
            ]
            self.states[self.slot(cid)] = {
                n: self.global_state[n].clone() for n in dict.fromkeys(keys)
            }
        # cc1: each client gets the averaged client-side LoRA of its blocks and its split layer.
        replies: dict[int, Message] = yield {
            cid: Message(PARAMETERS, rnd, SERVER, client_name(cid),
                         {n: self.global_state[n] for n in self.client_keys[cid]},
                         {"split_layer": self.layers[cid]})
            for cid in clients
        }  # fmt: skip
        # cc4: validate the uploads (cc3); per tensor, combine (fed.aggregator, FedAvg by
        # sample count by default) over every party that trained it. Clients that did not reply
        # (dropout, deadline) or were rejected contribute no adapter.
        fed = self.ctx.cfg.fed
        sent = {c: {n: self.global_state[n] for n in self.client_keys[c]} for c in replies}
        ok, rejected = screen_updates({c: m.tensors for c, m in replies.items()}, sent,
                                      fed.max_update_norm, {c: m.meta for c, m in replies.items()})  # fmt: skip
        metrics: dict = {"rejected": len(rejected), "rejected_reasons": rejected,
                         "split_layers": [self.layers[c] for c in clients],
                         "server_serve_seconds": self.serve_seconds}  # fmt: skip
        if not ok:  # nothing usable: the global state stays as it was
            return metrics
        sums: dict[str, list] = {}
        for cid in ok:
            msg, w = replies[cid], float(replies[cid].meta["num_samples"])
            for n, t in msg.tensors.items():
                sums.setdefault(n, []).append((t, w))
            for n in self.server_keys[cid]:
                sums.setdefault(n, []).append((self.states[self.slot(cid)][n], w))
        for n, items in sums.items():
            # one shared server model counts once, with the samples of all clients it served
            merged: dict[int, list] = {}
            for t, w in items:
                merged.setdefault(id(t), [t, 0.0])[1] += w
            ts, ws = zip(*merged.values(), strict=True)
            dev = self.global_state[n].device  # uploads arrive on the CPU, server copies on device
            self.global_state[n] = aggregate([{n: t.to(dev)} for t in ts], ws, fed.aggregator,
                                             fed.trim_ratio)[n]  # fmt: skip
        weights = [float(replies[c].meta["num_samples"]) for c in ok]
        losses = [float(replies[c].meta["loss"]) for c in ok]
        return {"train_loss": float(np.average(losses, weights=weights)), **metrics}

    def serve(self, msg: Message) -> Message:
        """Answer one client request: LABELS (c2), ACTIVATIONS (c3) or, U-shaped, GRADIENTS."""
        t0 = time.perf_counter()
        cid = self.cid[msg.sender]
        # The server's FLOPs for one request depend only on its kind, cut and tensor shapes.
        shapes = tuple(tuple(t.shape) for t in msg.tensors.values())
        key = ("split-server", msg.kind, self.layers[cid], self.s.u_shaped,
               self.ctx.cfg.train.autocast, shapes)  # fmt: skip
        with compute.step(key):
            reply = self._serve(cid, msg)
        self.serve_seconds += time.perf_counter() - t0
        return reply

    def _serve(self, cid: int, msg: Message) -> Message:
        if msg.kind == LABELS:
            self.labels[cid] = msg.tensors["labels"].to(self.ctx.device)
            reply = Message(
                METADATA, msg.round, SERVER, msg.sender, {}, {"received": len(self.labels[cid])}
            )
        elif msg.kind == ACTIVATIONS:
            reply = self._forward(cid, msg)
        elif msg.kind == GRADIENTS and cid in self.pending:
            h, pooled = self.pending.pop(cid)
            g = decompress(msg.tensors, msg.meta).to(self.ctx.device, pooled.dtype)
            reply = self._backward(cid, msg.round, h, pooled, g, {})
        else:
            raise MessageError(f"split server cannot serve a {msg.kind} message from {msg.sender}")
        return reply

    def _forward(self, cid: int, msg: Message) -> Message:
        ctx, k = self.ctx, self.layers[cid]
        state = self.states[self.slot(cid)]
        load_trainable_state(ctx.model, {n: state[n] for n in self.server_keys[cid]})
        ctx.model.train()
        h = decompress(msg.tensors, msg.meta).to(ctx.device).requires_grad_()
        mask = msg.tensors["mask"].to(ctx.device).long()
        # c3: the remaining blocks, final norm and pooling (and, unless U-shaped, the head).
        pooled = server_forward(ctx.model, h, mask, k, ctx.cfg.train.autocast)
        if self.s.u_shaped:  # return the pooled last hidden states; the client has the head
            self.pending[cid] = (h, pooled)
            x, meta = compress(pooled, self.s.compression, self.s.topk_ratio)
            return Message(ACTIVATIONS, msg.round, SERVER, msg.sender, x, meta)
        labels, self.labels[cid] = self.labels[cid][: len(h)], self.labels[cid][len(h) :]
        loss = F.cross_entropy(head_logits(ctx.model, pooled, ctx.cfg.train.autocast), labels)
        return self._backward(cid, msg.round, h, loss, None, {"loss": loss.detach().item()})

    def _backward(self, cid: int, rnd: int, h, out, grad, meta: dict) -> Message:
        """c3 (end): back-propagate ``out`` (the loss, or pooled states with gradient ``grad``),
        update the server-side LoRA and head; c4: send ``dL/dh`` back."""
        ctx, slot, keys = self.ctx, self.slot(cid), self.server_keys[cid]
        params = dict(ctx.model.named_parameters())
        if slot not in self.opts:
            self.opts[slot] = make_optimizer([params[n] for n in self.states[slot]], ctx.cfg.train)
            if slot in self.saved_opts:  # resumed from a checkpoint
                self.opts[slot].load_state_dict(self.saved_opts.pop(slot))
        opt = self.opts[slot]
        opt.zero_grad(set_to_none=True)  # right before backward: no other party's grads leak in
        out.backward(grad)
        optimizer_step(opt, [params[n] for n in keys], ctx.cfg.train)
        self.states[slot].update({n: params[n].detach().clone() for n in keys})
        x, cmeta = compress(h.grad, self.s.compression, self.s.topk_ratio)
        return Message(GRADIENTS, rnd, SERVER, client_name(cid), x, {**cmeta, **meta})

    def eval_state(self) -> dict[str, torch.Tensor]:
        return self.global_state

    def params_exchanged(self) -> int:
        """Mean number of client-side parameters a client downloads and uploads per round."""
        sizes = [sum(self.global_state[n].numel() for n in keys) for keys in self.client_keys]
        return int(round(float(np.mean(sizes))))


# ----------------------------------------------------------------------------- client


class Client:
    """A simulated client: its optimizer over its own blocks' LoRA, never a model copy."""

    def __init__(self, ctx: Context, cid: int) -> None:
        self.ctx, self.cid = ctx, cid
        self.opt: torch.optim.Optimizer | None = None
        self.saved_opt: dict | None = None  # optimizer state from a checkpoint, loaded lazily

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict() if self.opt is not None else self.saved_opt}

    def load_state_dict(self, d: dict) -> None:
        self.opt, self.saved_opt = None, d["opt"]

    def handle(self, msg: Message, link) -> Message:
        ctx, rnd, me = self.ctx, msg.round, client_name(self.cid)
        t, s = ctx.cfg.train, ctx.cfg.split
        seed_everything(ctx.cfg.seed, rnd, self.cid)  # dropout is reproducible per (round, client)
        k = int(msg.meta["split_layer"])
        load_trainable_state(ctx.model, msg.tensors)
        params = dict(ctx.model.named_parameters())
        mine = [params[n] for n in msg.tensors]
        if self.opt is None or t.optimizer_state == "reset":
            self.opt = make_optimizer(mine, t)
            if self.saved_opt is not None and t.optimizer_state == "keep":
                self.opt.load_state_dict(self.saved_opt)  # resumed from a checkpoint
            self.saved_opt = None
        ctx.model.train()
        idx = round_samples(ctx, self.cid, rnd)
        rng = np.random.default_rng([ctx.cfg.seed, rnd, self.cid])
        round_batches = list(batches(ctx.data.train, idx, t.batch_size, ctx.data.pad_id, rng,
                                     t.group_by_length))  # fmt: skip
        if not s.u_shaped:  # c2 (labels): the labels of every batch of the round, in order
            labels = torch.cat([b["labels"] for b in round_batches])
            link.call(Message(LABELS, rnd, me, SERVER, {"labels": labels}))
        losses = []
        for batch in round_batches:
            losses.append(self.step(to_device(batch, ctx.device), k, link, rnd))
        # cc3: upload the client-side LoRA with the number of samples it was trained on.
        return Message(PARAMETERS, rnd, me, SERVER,
                       {n: params[n].detach().clone() for n in msg.tensors},
                       {"num_samples": len(idx), "loss": float(np.mean(losses)),
                        "steps": len(round_batches)})  # fmt: skip

    def step(self, batch: dict, k: int, link, rnd: int) -> float:
        """One split training step on ``input_ids [B, L]``; returns the batch loss."""
        ctx, s, amp = self.ctx, self.ctx.cfg.split, self.ctx.cfg.train.autocast
        me, key = client_name(self.cid), ("split-client", amp, *batch["input_ids"].shape, k)
        self.opt.zero_grad(set_to_none=True)
        # c1: embeddings + blocks [0, k) with the client's LoRA.
        with compute.step((*key, "forward")):
            h = client_forward(ctx.model, batch["input_ids"], batch["attention_mask"], k, amp)
        # c2: cut-layer activations + mask to the server (c3 runs there; the link pauses our meter).
        x, meta = compress(h, s.compression, s.topk_ratio)
        mask = batch["attention_mask"].bool()
        reply = link.call(Message(ACTIVATIONS, rnd, me, SERVER, {**x, "mask": mask}, meta))
        if s.u_shaped:  # the head and the loss stay here; send back d loss / d pooled
            pooled = decompress(reply.tensors, reply.meta).to(ctx.device).requires_grad_()
            with compute.step((*key, "head")):
                loss = F.cross_entropy(head_logits(ctx.model, pooled, amp), batch["labels"])
                loss.backward()
            g, gmeta = compress(pooled.grad, s.compression, s.topk_ratio)
            reply = link.call(Message(GRADIENTS, rnd, me, SERVER, g, gmeta))
            loss_value = loss.detach().item()
        else:
            loss_value = float(reply.meta["loss"])
        # c4 -> c5: back-propagate the received d loss / d h and update the client LoRA.
        grad = decompress(reply.tensors, reply.meta).to(ctx.device, h.dtype)
        with compute.step((*key, "backward")):
            h.backward(grad)
        optimizer_step(self.opt, [p for g in self.opt.param_groups for p in g["params"]],
                       ctx.cfg.train)  # fmt: skip
        return loss_value
