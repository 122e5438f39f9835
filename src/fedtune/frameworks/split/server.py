"""Split-FedLLM's server: the server half of every step (c3, c4) and the round's aggregation
of the client-side LoRA (cc2, cc3). See the package docstring."""

from __future__ import annotations

import copy
import time
from collections.abc import Generator

import numpy as np
import torch

from ... import codec, compute
from ...aggregate import build, finite, screen_updates, update_problem
from ...context import ServerContext
from ...errors import ConfigError, MessageError
from ...execution.train import make_optimizer, optimizer_step
from ...fedopt import server_control, server_optimizer, split_control, with_control
from ...messages import (
    ACTIVATIONS,
    GRADIENTS,
    LABELS,
    METADATA,
    PARAMETERS,
    SERVER,
    Message,
    client_name,
)
from ...models import load_trainable_state, vocab_size
from ...privacy import ClientLevelDP, largest_reported, secure_aggregate
from .combine import combine
from .config import is_u_shaped
from .layers import choose_split_layers, samples_per_round
from .model import compress, decompress, part_names, server_forward
from .requests import check_activations, received_labels, take_labels


class Server:
    """Holds the global state (all LoRA + head) and the server-side model(s) trained in c3."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx, self.s = ctx, ctx.cfg.split
        self.layers = choose_split_layers(ctx)
        if ctx.cfg.privacy.secagg and len(set(self.layers)) > 1:  # e.g. chosen by budget
            raise ConfigError(
                f"config key privacy.secagg: the clients' split layers differ ({self.layers}); "
                "secure aggregation sums one client-side adapter shape: give one split layer"
            )
        self.u = u = is_u_shaped(ctx.cfg)
        causal = ctx.task.model_kind == "causal"
        self.classes = vocab_size(ctx.model) if causal else ctx.data.num_labels
        self.client_keys = [part_names(ctx.model, k, "client", u) for k in self.layers]
        self.server_keys = [part_names(ctx.model, k, "server", u) for k in self.layers]
        self.cid = {client_name(c): c for c in range(len(self.layers))}
        self.global_state = {k: v.clone() for k, v in ctx.init_state.items()}
        self.strategy = build(ctx.cfg.fed)  # per tensor: each has its own set of parties
        # privacy.dp: client-level DP on the client-side LoRA only (the server half trains
        # on the clients' raw activations; no epsilon covers it)
        self.dp = ClientLevelDP(ctx.cfg) if ctx.cfg.privacy.dp != "off" else None
        self.central = self.dp is not None and self.dp.central
        # SCAFFOLD: c for every client-side tensor, and how many clients own each; the server
        # optimizer steps the client-side tensors too
        owned = [n for keys in self.client_keys for n in keys]
        self.owners = {n: owned.count(n) for n in dict.fromkeys(owned)}
        zeros = {n: torch.zeros_like(self.global_state[n]) for n in self.owners}
        self.control = zeros if ctx.cfg.fedopt.scaffold else {}
        self.opt = server_optimizer(ctx.cfg, zeros)
        self.states: dict = {}  # slot ('shared' or cid) -> server-side tensors
        self.opts: dict = {}  # slot -> optimizer, kept across rounds like the clients' Adam
        self.labels: dict[int, dict] = {}  # cid -> this round's labels not yet used
        self.pending: dict[int, tuple] = {}  # U-shaped: cid -> (h, pooled) between two calls
        self.serve_seconds = 0.0
        self.saved_opts: dict = {}  # slot -> optimizer state from a checkpoint, loaded lazily
        # This round's request gate: the clients it serves and how many rows each may send
        # (its samples per round: the message budget), each client's server-side state from
        # before its first request (restored when the server refuses it), and who was refused.
        self.rnd, self.open = 0, False
        self.budget: dict[int, int] = {}
        self.rows: dict[int, int] = {}
        self.before: dict[int, tuple] = {}
        self.refused: dict[int, str] = {}

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume: the global state and the server-side
        optimizer states (the per-round server copies start from the global state)."""
        opts = {**self.saved_opts, **{s: o.state_dict() for s, o in self.opts.items()}}
        d = {
            "global_state": self.global_state,
            "opts": opts,
            "aggregator": self.strategy.state_dict(),
        }
        if self.opt is not None:
            d["server_opt"] = self.opt.state_dict()
        if self.control:
            d["control"] = self.control
        return {**d, "dp": self.dp.state_dict()} if self.dp is not None else d

    def load_state_dict(self, d: dict) -> None:
        self.global_state = {k: v.to(self.ctx.device) for k, v in d["global_state"].items()}
        self.opts, self.saved_opts = {}, dict(d["opts"])
        self.strategy.load_state_dict(d["aggregator"])
        if self.opt is not None:
            self.opt.load_state_dict(d["server_opt"], self.ctx.device)
        if self.control:
            self.control = {k: v.to(self.ctx.device) for k, v in d["control"].items()}
        if self.dp is not None:
            self.dp.load_state_dict(d["dp"])

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
        sizes = self.ctx.data.client_sizes
        self.budget = {c: samples_per_round(self.ctx.cfg, sizes[c]) for c in clients}
        self.rnd, self.open, self.rows, self.before, self.refused = rnd, True, {}, {}, {}
        self.labels.clear()
        self.pending.clear()
        # cc3: each client gets the aggregated client-side LoRA of its blocks (it replaces its
        # own with it: cc4) and its split layer (and, secure aggregation with central DP, the
        # bound it clips its update to).
        p = self.ctx.cfg.privacy
        clip = {"clip": self.dp.clip} if p.secagg and self.central else {}
        replies: dict[int, Message] = yield {
            cid: Message(
                PARAMETERS,
                rnd,
                SERVER,
                client_name(cid),
                with_control(
                    {n: self.global_state[n] for n in self.client_keys[cid]},
                    {n: self.control[n] for n in self.client_keys[cid]} if self.control else {},
                ),
                {"split_layer": self.layers[cid], **clip},
            )
            for cid in clients
        }
        self.open = False  # the round's requests are over: nothing trains the server half now
        metrics: dict = {
            "split_layers": [self.layers[c] for c in clients],
            "server_serve_seconds": self.serve_seconds,
        }
        sizes = {
            c: float(samples_per_round(self.ctx.cfg, self.ctx.data.client_sizes[c]))
            for c in replies
        }
        if p.secagg:  # cc1-cc2 as a secure sum: the server sees only the clients' total
            ref = {n: self.global_state[n] for n in self.client_keys[clients[0]]}  # one layer
            new, m, metas = yield from secure_aggregate(
                self.ctx.cfg, self.dp, rnd, ref, replies, sizes, len(clients)
            )
            metrics.update(m)
            if new is None or not finite(new):
                return metrics
            uploads, controls = {}, {}
        else:
            new, m, metas, uploads, controls = self.screen(rnd, clients, replies, sizes)
            metrics.update(m)
            if not metas:  # nothing usable: the global state stays as it was
                return metrics
        before = dict(self.global_state)
        self.global_state.update(new)
        weights = {c: float(meta["num_samples"]) for c, meta in metas.items()}
        trained = {
            c: {n: self.states[self.slot(c)][n] for n in self.server_keys[c]} for c in weights
        }  # cc2 averages the server half too: per slot, over the clients it served
        slots = {c: self.slot(c) for c in weights}
        new = combine(self.strategy, self.global_state, weights, uploads, trained, slots)
        self.global_state.update(new)
        if self.opt is not None:  # fedopt.server_opt steps the client-side LoRA
            names = dict.fromkeys(n for c in metas for n in self.client_keys[c])
            new = {n: self.global_state[n] for n in names}
            self.global_state.update(self.opt.step({n: before[n] for n in names}, new))
        if not finite(self.global_state):
            self.global_state = before  # finite inputs can still overflow: keep the last state
            metrics["rejected_reasons"] = {
                **metrics["rejected_reasons"],
                "aggregate": "non-finite result",
            }
            return metrics
        if self.control:
            self.control = server_control(self.control, list(controls.values()), self.owners)
        losses = [float(meta["loss"]) for meta in metas.values()]
        if p.split_noise > 0:  # each client's own accounting of its samples
            metrics["activation_epsilon"] = largest_reported(
                list(metas.values()), "activation_epsilon"
            )
        loss = np.average(losses, weights=list(weights.values()))
        return {"train_loss": float(loss), **metrics}

    def screen(self, rnd: int, clients: list[int], replies: dict, sizes: dict) -> tuple:
        """cc2's first half on plaintext uploads (cc1): validate them; central DP aggregates the
        accepted client-side tensors here. Returns the updated client-side tensors (central
        DP), the metrics, the accepted clients' metadata and the uploads left to
        :func:`.combine.combine`. Clients that did not reply (dropout, deadline) or were rejected
        contribute no adapter."""
        fed = self.ctx.cfg.fed
        sent = {c: {n: self.global_state[n] for n in self.client_keys[c]} for c in replies}
        parts = {c: split_control(m.tensors) for c, m in replies.items()}
        ok, rejected = screen_updates(
            {c: p[0] for c, p in parts.items()},
            sent,
            0.0 if self.central else fed.max_update_norm,  # central DP: clipping bounds them
            {c: m.meta for c, m in replies.items()},
            0.0 if self.central else fed.max_update_ratio,
            sizes,
        )
        for c in list(ok) if self.control else []:  # SCAFFOLD: each client's change of c_i
            why = update_problem(parts[c][1], {n: self.control[n] for n in self.client_keys[c]})
            if why:
                ok.remove(c)
                rejected[str(c)] = f"control variates: {why}"
        metrics: dict = {"rejected": len(rejected), "rejected_reasons": rejected}
        new, uploads = {}, {c: parts[c][0] for c in ok}
        if self.dp is not None and ok:
            new, m = self.dp_aggregate(rnd, clients, replies, ok)
            metrics.update(m)
            uploads = {} if self.central else uploads
        elif self.dp is not None:
            metrics.update(self.dp.metrics())
        controls = {c: parts[c][1] for c in ok}
        return new, metrics, {c: replies[c].meta for c in ok}, uploads, controls

    def dp_aggregate(self, rnd: int, clients: list[int], replies: dict, ok: list[int]):
        """Client-level DP on cc2 for the client-side tensors: central DP-FedAvg of the
        accepted uploads (each tensor over the sampled clients that own it), or, local DP,
        count the privatized uploads. Returns the new client-side tensors (central) and the
        metrics; the server-side tensors are left to :func:`.combine.combine`."""
        if not self.central:
            self.dp.count_local(ok)
            return {}, self.dp.metrics()
        owners: dict[str, int] = {}
        for c in clients:
            for n in self.client_keys[c]:
                owners[n] = owners.get(n, 0) + 1
        ref = {n: self.global_state[n] for n in owners}
        uploads = [{n: t.to(ref[n].device) for n, t in replies[c].tensors.items()} for c in ok]
        new, metrics = self.dp.aggregate(rnd, ref, uploads, owners)
        return new, {**metrics, **self.dp.metrics()}

    def serve(self, msg: Message) -> Message:
        """Answer one client request: LABELS (c2), ACTIVATIONS (c3) or, U-shaped, GRADIENTS."""
        t0 = time.perf_counter()
        cid = self.cid.get(msg.sender, -1)
        if not self.open or msg.round != self.rnd or cid not in self.budget:
            raise MessageError(f"split server does not serve {msg.sender} in round {msg.round}")
        if cid in self.refused:
            raise MessageError(f"{msg.sender} was refused in round {self.rnd}")
        if cid not in self.before:
            self.before[cid] = self._snapshot(cid)
        # The server's FLOPs for one request depend only on its kind, cut and tensor shapes.
        shapes = tuple(tuple(t.shape) for t in msg.tensors.values())
        if msg.kind == ACTIVATIONS and not self.u:  # the head runs on the labels' R positions
            v = msg.tensors.get("values")
            shapes += (self._label_width(cid, len(v) if v is not None and v.dim() else 0),)
        if msg.kind == GRADIENTS and cid in self.pending:  # U-shaped backward: through [B, L, H]
            shapes += (tuple(self.pending[cid][0].shape),)
        key = (
            "split-server",
            msg.kind,
            self.layers[cid],
            self.u,
            self.ctx.cfg.train.autocast,
            shapes,
        )
        try:
            with compute.inline(key):
                reply = self._serve(cid, msg)
        except MessageError as e:  # the client is out for the round, its updates undone
            self._restore(cid)
            self.refused[cid] = str(e)
            raise
        self.serve_seconds += time.perf_counter() - t0
        return reply

    def refuse(self, sender: str, why: str) -> None:
        """The runtime refused ``sender``'s request before it reached :meth:`serve` (routing,
        decoding), or cut its stream: undo what its accepted requests did this round."""
        cid = self.cid.get(sender, -1)
        if cid in self.budget and cid not in self.refused:
            if cid in self.before:
                self._restore(cid)
            self.refused[cid] = why

    def _snapshot(self, cid: int) -> tuple:
        """The server-side state client ``cid`` can change: its slot's tensors and optimizer."""
        slot = self.slot(cid)
        opt = self.opts.get(slot)
        return (
            {n: t.clone() for n, t in self.states[slot].items()},
            None if opt is None else copy.deepcopy(opt.state_dict()),
            self.saved_opts.get(slot),
        )

    def _restore(self, cid: int) -> None:
        """Undo every update client ``cid``'s requests made this round (a shared server half
        then holds only the other clients' batches)."""
        slot, (states, opt, saved) = self.slot(cid), self.before[cid]
        self.states[slot] = states
        if opt is None:
            self.opts.pop(slot, None)
            if saved is not None:
                self.saved_opts[slot] = saved
        else:
            self.opts[slot].load_state_dict(opt)
        self.labels.pop(cid, None)
        self.pending.pop(cid, None)

    def _label_width(self, cid: int, b: int) -> int:
        """R of the next ``b`` rows of client ``cid``'s labels (generation), else 0."""
        tgt = (self.labels.get(cid) or {}).get("target_ids")
        if tgt is None or not len(tgt[:b]):
            return 0
        return max(1, int((tgt[:b] != -100).sum(1).max()))

    def _serve(self, cid: int, msg: Message) -> Message:
        if msg.kind == LABELS:
            if cid in self.labels or self.rows.get(cid):
                raise MessageError(f"{msg.sender} sent its labels twice or after activations")
            labels = received_labels(msg)
            n = len(next(iter(labels.values())))
            if n > self.budget[cid]:
                raise MessageError(
                    f"{msg.sender} sent {n} labels, over its {self.budget[cid]} samples per round"
                )
            self.labels[cid] = labels
            reply = Message(METADATA, msg.round, SERVER, msg.sender, {}, {"received": n})
        elif msg.kind == ACTIVATIONS and cid not in self.pending:
            reply = self._forward(cid, msg)
        elif msg.kind == GRADIENTS and cid in self.pending:
            h, pooled = self.pending.pop(cid)
            codec.check_names(msg.tensors)
            g = self._decompress(msg).to(self.ctx.device, pooled.dtype)
            if g.shape != pooled.shape:
                raise MessageError(f"gradients from {msg.sender} do not match the states sent")
            reply = self._backward(cid, msg.round, h, pooled, g, {})
        else:
            raise MessageError(f"split server cannot serve a {msg.kind} message from {msg.sender}")
        return reply

    def _forward(self, cid: int, msg: Message) -> Message:
        ctx, k = self.ctx, self.layers[cid]
        b = check_activations(ctx.cfg, msg)
        self.rows[cid] = self.rows.get(cid, 0) + b
        if self.rows[cid] > self.budget[cid]:
            raise MessageError(
                f"{msg.sender} sent over its {self.budget[cid]} samples per round of activations"
            )
        state = self.states[self.slot(cid)]
        load_trainable_state(ctx.model, {n: state[n] for n in self.server_keys[cid]})
        if not ctx.model.training:  # whole-model switches only: train() walks every module
            ctx.model.train()
        h = self._decompress(msg).to(ctx.device).requires_grad_()
        mask = msg.tensors["mask"].to(ctx.device).long()
        # c3: the remaining blocks, final norm and pooling (and, unless U-shaped, the head).
        pooled = ctx.task.pool(server_forward(ctx.model, h, mask, k, ctx.cfg.train.autocast), mask)
        if self.u:  # return the pooled last hidden states; the client has the head
            self.pending[cid] = (h, pooled)
            x = compress(pooled, self.s.compression, self.s.topk_ratio)
            return Message(ACTIVATIONS, msg.round, SERVER, msg.sender, x)
        batch = take_labels(self.labels, cid, len(h), h.shape[1], self.classes, ctx.device)
        logits = ctx.task.head(ctx.model, pooled, batch, ctx.cfg.train.autocast)
        loss = ctx.task.loss()(logits, batch)
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
        if grad is None and not torch.isfinite(out):  # e.g. finite but huge activations
            raise MessageError(f"the batch of {client_name(cid)} gives a non-finite loss")
        opt.zero_grad(set_to_none=True)  # right before backward: no other party's grads leak in
        out.backward(grad)
        optimizer_step(opt, [params[n] for n in keys], ctx.cfg.train)
        new = {n: params[n].detach().clone() for n in keys}
        if not finite(new):
            raise MessageError(f"the batch of {client_name(cid)} made the server half non-finite")
        self.states[slot].update(new)
        x = compress(h.grad, self.s.compression, self.s.topk_ratio)
        return Message(GRADIENTS, rnd, SERVER, client_name(cid), x, meta)

    def _decompress(self, msg: Message) -> torch.Tensor:
        """A client's activations or gradients ``[..., H]``, decoded with our own
        ``split.compression`` and hidden size ``H`` (the message carries neither)."""
        return decompress(msg.tensors, self.s.compression, self.ctx.model.config.hidden_size)

    def eval_state(self) -> dict[str, torch.Tensor]:
        return self.global_state

    def params_exchanged(self) -> int:
        """Mean number of client-side parameters a client downloads and uploads per round."""
        sizes = [sum(self.global_state[n].numel() for n in keys) for keys in self.client_keys]
        return int(round(float(np.mean(sizes))))
