"""KD-FedLLM: federated knowledge distillation through logits on a shared public set.

Every party keeps its own model (a trainable state: LoRA + head); only logits on the public
set (``ctx.data.public_idx``, or a seeded subset of ``kd.public_samples``) cross the wire.

b1  each client fine-tunes its persistent local model on its private data;
b2  each client computes its logits on the public selection (public labels are never used);
b3  each client uploads them (LOGITS, compressed by ``kd.topk`` / ``kd.logit_dtype``);
b4  the server aggregates them into global knowledge: a weighted mean of softened
    probabilities, after an optional entropy filter (``kd.aggregate``, ``kd.entropy_threshold``);
b5  the server distils that knowledge into the global model (KL at temperature T);
b6  the server computes the global model's logits on the public set;
b7  the server sends them to every client (LOGITS, same compression);
b8  each client distils them into its local model.

What goes on the wire, per sampled client and round:
  down  METADATA  "start" (b1-b3 trigger); with ``kd.prune`` also a bitmask of the kept
                  public samples (N/8 bytes), since the selection changes every round;
  up    LOGITS    the client's packed logits [S, C] + its sample count and training loss;
  down  LOGITS    the global model's packed logits [S, C];
  b8 sends no reply: nothing the server needs, and the next upload acknowledges it.
With ``kd.align`` a client answers a METADATA request once, with its label histogram (LABELS,
[C] int32): private data does not change, so resending it every round would only cost bytes.
The public texts themselves are not counted: like the backbone, every party has them before
training starts. ``params_exchanged()`` is 0: no trainable parameter ever crosses the wire;
the logits are what is counted, in bytes.
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
import torch

from ..aggregate import meta_problem
from ..context import Context
from ..data import Tokenized
from ..engine import BATCHED_STREAM, ClientJob, predict_many, train_many
from ..errors import ConfigError, MessageError
from ..kd_ops import (
    aggregate_knowledge,
    alignment_weights,
    distill,
    label_distribution,
    pack_logits,
    prune_public,
    tv_distance,
    unpack_logits,
)
from ..messages import LABELS, LOGITS, METADATA, SERVER, Message, client_name
from ..train import evaluate, predict_logits, seed_everything, train_local

NAME = "kd"
SERVER_STREAM = 1_000_003  # seed stream of the server's dropout and batch order


def public_candidates(ctx: Context) -> np.ndarray:
    """Indices into ``ctx.data.train`` of the public samples in use (``[N]``, sorted)."""
    pub, n = ctx.data.public_idx, ctx.cfg.kd.public_samples
    if len(pub) == 0:
        raise ConfigError("config key data.public_size: KD-FedLLM needs a public set (> 0)")
    if n > len(pub):
        raise ConfigError(f"config key kd.public_samples: {n} > public set size {len(pub)}")
    return public_subset(pub, n, ctx.cfg.seed)


def public_subset(public_idx: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded uniform subset of ``n`` public indices (``[n]``, sorted); 0 = all of them.

    Not the first ``n``: dataset files are often grouped by class (Banking77's train.csv is),
    so a prefix would hold a handful of classes. The subsets are nested (the first ``n`` of
    one seeded permutation), so a public-size sweep compares growing sets, not different ones."""
    if n == 0 or n >= len(public_idx):
        return np.asarray(public_idx)
    order = np.random.default_rng([seed, 4243]).permutation(len(public_idx))
    return np.sort(np.asarray(public_idx)[order[:n]])


def distill_batch_size(ctx: Context) -> int:
    return ctx.cfg.kd.distill_batch_size or ctx.cfg.train.batch_size


def public_logits(ctx: Context, state: dict[str, torch.Tensor], idx: np.ndarray) -> torch.Tensor:
    """``state``'s logits ``[len(idx), C]`` on public samples ``idx`` (indices into train)."""
    cfg, d = ctx.cfg, ctx.data
    return predict_logits(ctx.model, state, d.train, idx, cfg.train.eval_batch_size, d.pad_id,
                          ctx.device, cfg.train.autocast)  # fmt: skip


def received_logits(msg: Message, rows: int, num_classes: int, sender: str) -> torch.Tensor:
    """Unpack and check a LOGITS message: ``[rows, C]``, no NaN / +inf (top-k gives -inf)."""
    try:
        logits = unpack_logits(msg.tensors, num_classes)
    except (KeyError, RuntimeError, IndexError) as e:
        raise MessageError(f"logits from {sender} are malformed: {e}") from None
    if logits.shape != (rows, num_classes) or logits.isnan().any() or torch.isposinf(logits).any():
        raise MessageError(f"logits from {sender}: shape {list(logits.shape)} or NaN/Inf, "
                           f"expected [{rows}, {num_classes}]")  # fmt: skip
    return logits


class Server:
    """The global model (state + optimizer state), the last global logits on the public set
    and the clients' label histograms (alignment only)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.candidates = public_candidates(ctx)
        if ctx.cfg.kd.topk >= ctx.data.num_labels:
            raise ConfigError(f"config key kd.topk: must be < the number of classes "
                              f"({ctx.data.num_labels}), got {ctx.cfg.kd.topk}")  # fmt: skip
        self.state = {k: v.clone() for k, v in ctx.init_state.items()}
        self.opt_state: dict | None = None
        self.global_logits: torch.Tensor | None = None  # [N, C] from the last b6
        self.histograms: dict[int, np.ndarray] = {}  # cid -> [C] private label counts

    def round(self, rnd: int, clients: list[int]) -> Generator[dict, dict, dict]:
        ctx, kd = self.ctx, self.ctx.cfg.kd
        c, n = ctx.data.num_labels, len(self.candidates)
        metrics: dict = {}
        rejected: dict[str, str] = {}  # client id -> why its reply was not used
        # Alignment: ask each client for its label histogram the first time it is sampled.
        missing = [cid for cid in clients if cid not in self.histograms]
        if kd.align != "none" and missing:
            replies = yield {
                cid: Message(METADATA, rnd, SERVER, client_name(cid), meta={"request": "labels"})
                for cid in missing
            }
            for cid, msg in replies.items():
                t = msg.tensors.get("histogram", torch.zeros(0))
                hist = np.zeros(0) if t.is_floating_point() else t.numpy().astype(np.int64)
                if hist.shape != (c,) or (hist < 0).any() or hist.sum() == 0:
                    rejected[str(cid)] = "malformed label histogram"  # asked again next round
                else:
                    self.histograms[cid] = hist
        # Pruning: this round's selection by the global model's logits (the initial model's in
        # round 1, computed here); clients learn it from a bitmask in the start message.
        start: dict[str, torch.Tensor] = {}
        sel = np.arange(n)
        if kd.prune != "none":
            if self.global_logits is None:
                self.global_logits = public_logits(ctx, self.state, self.candidates)
            sel = prune_public(self.global_logits, kd.prune, kd.prune_keep)
            mask = np.zeros(n, dtype=bool)
            mask[sel] = True
            start["keep"] = torch.from_numpy(np.packbits(mask))
        metrics["public_samples"] = len(sel)

        # b1-b3 happen in Client.handle; the replies are the uploaded client logits.
        replies = yield {
            cid: Message(METADATA, rnd, SERVER, client_name(cid), start, {"step": "start"})
            for cid in clients
        }
        # b4: global knowledge = weighted mean of the clients' softened probabilities, over the
        # clients that replied (dropout, deadline) with valid logits and metadata.
        logits, cids = [], []
        for i in sorted(replies):
            try:
                if why := meta_problem(replies[i].meta):
                    raise MessageError(why)
                if kd.align != "none" and i not in self.histograms:
                    raise MessageError("no valid label histogram")
                logits.append(received_logits(replies[i], len(sel), c, client_name(i)))
                cids.append(i)
            except MessageError as e:
                rejected[str(i)] = str(e)
        metrics.update(rejected=len(rejected), rejected_reasons=rejected)
        if not cids:  # nothing usable: the global model stays as it was
            return metrics
        sizes = [int(float(replies[i].meta["num_samples"])) for i in cids]
        teacher, kept = aggregate_knowledge(
            logits, kd.temperature, kd.aggregate, sizes, kd.entropy_threshold
        )
        metrics["train_loss"] = float(np.average([float(replies[i].meta["loss"]) for i in cids],
                                                 weights=sizes))  # fmt: skip
        metrics["knowledge_kept"] = float(kept.float().mean())
        weights = kept.numpy().astype(np.float64)  # samples every client was unsure of: 0
        public_y = ctx.data.train.labels[self.candidates[sel]]
        labels = public_y if kd.server_uses_public_labels else None
        if kd.align != "none":
            # Public labels are unknown by default: use the teacher's argmax (the clients'
            # consensus), available from round 1 on, unlike the untrained global model's.
            pseudo = public_y if kd.server_uses_public_labels else teacher.argmax(-1).numpy()
            target = sum(self.histograms[i] for i in cids)
            weights = weights * alignment_weights(pseudo, target)
            goal = target / target.sum()
            metrics["align_tv_before"] = tv_distance(label_distribution(pseudo, c), goal)
            metrics["align_tv_after"] = tv_distance(label_distribution(pseudo, c, weights), goal)
        resample = weights / weights.sum() if kd.align == "resample" and weights.sum() > 0 else None
        # b5: distil the global knowledge into the global model (the server's own optimizer).
        seed_everything(ctx.cfg.seed, rnd, SERVER_STREAM)
        result = distill(
            ctx.model, self.state, self.opt_state, ctx.data.train, self.candidates[sel], teacher,
            ctx.cfg.train, temperature=kd.temperature, epochs=kd.server_epochs,
            batch_size=distill_batch_size(ctx), rng=np.random.default_rng([ctx.cfg.seed, rnd,
            SERVER_STREAM]), pad_id=ctx.data.pad_id, device=ctx.device,
            weights=None if resample is not None else weights, resample=resample, labels=labels,
        )  # fmt: skip
        self.state, self.opt_state = result.state, result.opt_state
        metrics["server_distill_loss"] = result.loss
        # b6: the global model's logits on all candidates (the next round prunes with them).
        self.global_logits = public_logits(ctx, self.state, self.candidates)
        # b7: broadcast them on this round's selection; b8 happens in Client.handle.
        down = pack_logits(self.global_logits[sel], kd.topk, kd.logit_dtype)
        yield {cid: Message(LOGITS, rnd, SERVER, client_name(cid), down) for cid in replies}
        return metrics

    def eval_state(self) -> dict[str, torch.Tensor]:
        return self.state

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume (tensors and small JSON-able values)."""
        return {"state": self.state, "opt_state": self.opt_state,
                "global_logits": self.global_logits, "histograms": self.histograms}  # fmt: skip

    def load_state_dict(self, d: dict) -> None:
        self.state = {k: v.to(self.ctx.device) for k, v in d["state"].items()}
        self.opt_state, self.global_logits = d["opt_state"], d["global_logits"]
        self.histograms = {int(k): np.asarray(v) for k, v in d["histograms"].items()}

    def params_exchanged(self) -> int:
        return 0  # only logits travel; see the module docstring


class Client:
    """A client's persistent local model is its trainable state + optimizer state (no model
    copy) and the public selection of the current round."""

    def __init__(self, ctx: Context, cid: int) -> None:
        self.ctx, self.cid = ctx, cid
        self.state = {k: v.clone() for k, v in ctx.init_state.items()}
        self.opt_state: dict | None = None
        self.candidates = public_candidates(ctx)
        self.selection = self.candidates  # indices into train of this round's public samples

    def state_dict(self) -> dict:
        return {"state": self.state, "opt_state": self.opt_state, "selection": self.selection}

    def load_state_dict(self, d: dict) -> None:
        self.state = {k: v.to(self.ctx.device) for k, v in d["state"].items()}
        self.opt_state, self.selection = d["opt_state"], np.asarray(d["selection"])

    def handle(self, msg: Message, link=None) -> Message | None:
        if msg.kind == METADATA and msg.meta.get("request") == "labels":
            return self.send_histogram(msg.round)
        if msg.kind == METADATA:
            return self.train_and_predict(msg)
        if msg.kind == LOGITS:
            return self.distill_global(msg)
        raise MessageError(f"client {self.cid} cannot handle a {msg.kind!r} message")

    def send_histogram(self, rnd: int) -> Message:
        """Alignment: the private label counts ``[C]`` (int32), sent once."""
        d = self.ctx.data
        hist = np.bincount(
            d.train.labels[self.ctx.client_samples(self.cid)], minlength=d.num_labels
        )
        return Message(LABELS, rnd, client_name(self.cid), SERVER,
                       {"histogram": torch.from_numpy(hist.astype(np.int32))})  # fmt: skip

    def train_and_predict(self, msg: Message) -> Message:
        ctx, rnd = self.ctx, msg.round
        self.select(msg)
        seed_everything(ctx.cfg.seed, rnd, self.cid)
        # b1: fine-tune the local model on the private data.
        result = train_local(
            ctx.model, self.state, self.opt_state, ctx.data.train, ctx.client_samples(self.cid),
            ctx.cfg.train, np.random.default_rng([ctx.cfg.seed, rnd, self.cid]), ctx.data.pad_id,
            ctx.device, desc=f"round {rnd} client {self.cid}", progress=ctx.progress,
        )  # fmt: skip
        self.state, self.opt_state = result.state, result.opt_state
        # b2: logits on the public selection (its labels are never read here).
        return self.upload(rnd, result, public_logits(ctx, self.state, self.selection))

    def select(self, msg: Message) -> None:
        if "keep" in msg.tensors:  # the server pruned the public set for this round
            n = len(self.candidates)
            mask = np.unpackbits(msg.tensors["keep"].numpy(), count=n).astype(bool)
            self.selection = self.candidates[mask]

    def upload(self, rnd: int, result, logits: torch.Tensor) -> Message:
        """b3: upload the logits, compressed; the loss is fixed-width so sizes do not depend
        on it."""
        kd = self.ctx.cfg.kd
        return Message(
            LOGITS, rnd, client_name(self.cid), SERVER,
            pack_logits(logits, kd.topk, kd.logit_dtype),
            {"num_samples": len(self.ctx.client_samples(self.cid)), "loss": f"{result.loss:.6e}"},
        )  # fmt: skip

    def distill_global(self, msg: Message) -> None:
        ctx, kd, rnd = self.ctx, self.ctx.cfg.kd, msg.round
        if kd.client_distill_epochs == 0:
            return None
        global_logits = received_logits(msg, len(self.selection), ctx.data.num_labels, SERVER)
        seed_everything(ctx.cfg.seed, rnd, self.cid, 1)
        # b8: distil the global model's knowledge into the local model.
        result = distill(
            ctx.model, self.state, self.opt_state, ctx.data.train, self.selection,
            (global_logits / kd.temperature).softmax(-1), ctx.cfg.train,
            temperature=kd.temperature, epochs=kd.client_distill_epochs,
            batch_size=distill_batch_size(ctx), rng=np.random.default_rng([ctx.cfg.seed, rnd,
            self.cid, 1]), pad_id=ctx.data.pad_id, device=ctx.device,
        )  # fmt: skip
        self.state, self.opt_state = result.state, result.opt_state
        return None


def extra_eval(ctx: Context, server: Server, clients: dict[int, Client]) -> dict:
    """Mean test accuracy of the clients' local models (the global model is the headline)."""
    if not ctx.cfg.kd.client_eval:
        return {}
    cfg, d = ctx.cfg, ctx.data
    accs = [
        evaluate(ctx.model, cl.state, d.test, cfg.train.eval_batch_size, d.pad_id, ctx.device,
                 cfg.train.autocast)["accuracy"]
        for _, cl in sorted(clients.items())
    ]  # fmt: skip
    return {"client_accuracy": float(np.mean(accs)), "client_accuracies": accs}


def accepts_many(msgs: list[Message]) -> bool:
    """``fed.engine=batched`` handles the b1-b3 trigger and the b7 broadcast; label requests
    go one by one."""
    kinds = {m.kind for m in msgs}
    return (kinds == {METADATA} and all(m.meta.get("request") != "labels" for m in msgs)) or (
        kinds == {LOGITS}
    )


def handle_many(ctx: Context, clients: list[Client], msgs: list[Message]) -> list[Message]:
    """b1-b3 (or b8) for several clients at once: one batched training loop over their private
    data, then one batched pass for their logits on the public selection; or one batched
    distillation loop (see :mod:`fedtune.engine`)."""
    if msgs[0].kind == LOGITS:
        return distill_many(ctx, clients, msgs)
    for c, m in zip(clients, msgs, strict=True):
        c.select(m)
    rnd, cfg, d = msgs[0].round, ctx.cfg, ctx.data
    jobs = [ClientJob(c.state, c.opt_state, ctx.client_samples(c.cid),
                      np.random.default_rng([cfg.seed, rnd, c.cid])) for c in clients]  # fmt: skip
    seed_everything(cfg.seed, rnd, BATCHED_STREAM)
    results = train_many(ctx.model, jobs, d.train, cfg.train, d.pad_id, ctx.device)
    for c, r in zip(clients, results, strict=True):
        c.state, c.opt_state = r.state, r.opt_state
    sel = clients[0].selection
    if all(np.array_equal(c.selection, sel) for c in clients):
        logits = predict_many(ctx.model, [c.state for c in clients], d.train, sel,
                              cfg.train.eval_batch_size, d.pad_id, ctx.device, cfg.train.autocast)  # fmt: skip
    else:
        logits = [public_logits(ctx, c.state, c.selection) for c in clients]
    return [c.upload(rnd, r, lg) for c, r, lg in zip(clients, results, logits, strict=True)]


def distill_many(ctx: Context, clients: list[Client], msgs: list[Message]) -> list[None]:
    """b8 for several clients in one batched loop; per client when their public selections
    or received logits differ (never in this protocol, but kept correct)."""
    kd, cfg, rnd = ctx.cfg.kd, ctx.cfg, msgs[0].round
    if kd.client_distill_epochs == 0:
        return [None] * len(clients)
    sel = clients[0].selection
    teachers = [received_logits(m, len(c.selection), ctx.data.num_labels, SERVER)
                for c, m in zip(clients, msgs, strict=True)]  # fmt: skip
    same = all(np.array_equal(c.selection, sel) and torch.equal(t, teachers[0])
               for c, t in zip(clients, teachers, strict=True))  # fmt: skip
    if not same:
        return [c.distill_global(m) for c, m in zip(clients, msgs, strict=True)]
    view = Tokenized([ctx.data.train.ids[i] for i in sel], np.arange(len(sel)))
    jobs = [ClientJob(c.state, c.opt_state, np.arange(len(sel)),
                      np.random.default_rng([cfg.seed, rnd, c.cid, 1])) for c in clients]  # fmt: skip
    seed_everything(cfg.seed, rnd, BATCHED_STREAM, 1)
    results = train_many(
        ctx.model, jobs, view, cfg.train, ctx.data.pad_id, ctx.device,
        teacher=(teachers[0] / kd.temperature).softmax(-1), temperature=kd.temperature,
        epochs=kd.client_distill_epochs, batch_size=distill_batch_size(ctx),
    )  # fmt: skip
    for c, r in zip(clients, results, strict=True):
        c.state, c.opt_state = r.state, r.opt_state
    return [None] * len(clients)
