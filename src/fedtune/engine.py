"""Batched simulation engine: the local steps of many clients as one step of one network.

``fed.engine = "batched"`` makes the in-process runtime hand all of a round's client messages
to the framework's ``handle_many`` at once (FedLLM's a2, KD's b1/b2). Step ``t`` of the fused
loop concatenates step ``t``'s batch of every client that still has steps, runs ONE
forward/backward through the shared backbone with each row using its own client's adapter
(:mod:`fedtune.multilora`), and applies every client's optimizer step at once:

* the loss is the SUM over clients of each client's mean loss, so the gradient reaching client
  ``n``'s adapter is exactly its solo gradient (rows never interact in a transformer);
* Adam/AdamW/SGD are elementwise, so one update over the stacked ``[N, ...]`` tensors equals N
  separate updates, given a per-client step counter (clients may have different histories) and
  a per-client mask (a client with fewer local steps stops early: its tensors are untouched);
* gradient clipping uses each client's own norm.

So batched training equals training the clients one after another (tests/test_engine.py), up
to float rounding and the dropout RNG stream. Each client's batches are drawn by the same
:func:`fedtune.data.batches` calls with the same seeded generator as the sequential path.
No host synchronisation happens inside a step (losses accumulate on the device).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import compute, multilora
from .compute import ComputeMeter, ComputeStats
from .config import TrainConfig
from .data import Tokenized, batches
from .kd_ops import kd_loss_rows
from .train import LocalResult, autocast, make_optimizer, num_local_steps, trainable_params

BATCHED_STREAM = 1_000_033  # seed stream of the batched engine's dropout (one per round)
MIN_BUCKET_ROWS = 16  # smallest sub-batch a fused step is split into (see length_buckets)
_NETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # peft model -> MultiNet


def multinet(model, n: int) -> multilora.MultiNet:
    """The cached multi-client network of ``model`` with at least ``n`` slots."""
    net = _NETS.get(model)
    if net is None or net.n < n:
        with torch.inference_mode(False):  # its tensors are trained later: never inference tensors
            net = multilora.build(model, n)
        _NETS[model] = net
    return net


# ----------------------------------------------------------------------------- optimizer


class StackedOptimizer:
    """N clients' Adam / AdamW / SGD (as :func:`fedtune.train.make_optimizer` builds them) over
    the multi-client network's ``flat [N, P]`` buffer, with per-client step counts, masks and
    gradient clipping: about 15 kernels per step, however many tensors a client trains.

    Optimizer state converts to and from torch's ``state_dict()`` format per client, so a
    client's saved optimizer state is the same whichever engine trained it."""

    def __init__(self, mnet: multilora.MultiNet, cfg: TrainConfig, template: dict) -> None:
        self.mnet, self.cfg, self.template = mnet, cfg, template
        group = template["param_groups"][0]
        self.lr, self.wd = cfg.lr, cfg.weight_decay
        self.betas, self.eps = group.get("betas", (0.9, 0.999)), group.get("eps", 1e-8)
        self.adam = cfg.optimizer in ("adam", "adamw")
        flat = mnet.flat
        self.m = torch.zeros_like(flat) if self.adam else None
        self.v = torch.zeros_like(flat) if self.adam else None
        self.steps = torch.zeros(mnet.n, dtype=torch.float64, device=flat.device)

    @torch.no_grad()
    def load(self, slot: int, opt_state: dict | None) -> None:
        """Set slot ``slot`` from a torch optimizer ``state_dict()`` (None = fresh)."""
        if not self.adam:
            return
        st = (opt_state or {}).get("state", {})
        self.steps[slot] = float(st[0]["step"]) if 0 in st else 0.0
        for i, name in enumerate(self.mnet.layout):
            s = st.get(i)
            self.mnet.view(self.m, slot, name).copy_(s["exp_avg"] if s else 0.0)
            self.mnet.view(self.v, slot, name).copy_(s["exp_avg_sq"] if s else 0.0)

    @torch.no_grad()
    def state_dict(self, slot: int) -> dict:
        """Slot ``slot`` in torch's optimizer ``state_dict()`` format."""
        state, names = {}, list(self.mnet.layout)
        if self.adam:
            step = torch.tensor(float(self.steps[slot]), dtype=torch.float32)
            for i, name in enumerate(names):
                dtype = self.mnet.layout[name][2]
                state[i] = {"step": step.clone(),
                            "exp_avg": self.mnet.view(self.m, slot, name).to(dtype, copy=True),
                            "exp_avg_sq": self.mnet.view(self.v, slot, name).to(dtype, copy=True)}  # fmt: skip
        groups = [dict(g, params=list(range(len(names)))) for g in self.template["param_groups"]]
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        """One update of every client whose ``active [N]`` (bool) is set; others are untouched.

        The arithmetic of torch's single-tensor Adam/AdamW/SGD and ``clip_grad_norm_``, in
        place with per-client coefficients ``[N, 1]`` (0/1 masks make inactive rows exact
        no-ops), so the peak is about three ``[N, P]`` temporaries."""
        p, g = self.mnet.flat, self.mnet.flat_grad()  # [N, P]
        self.zero_grad()  # the per-tensor gradients are copied into g: free them now
        if self.cfg.grad_clip > 0:  # each client's own gradient norm
            norm = g.pow(2).sum(1, keepdim=True).sqrt()
            g.mul_((self.cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0))
        on = active.view(-1, 1).to(p.dtype)
        self.steps += active.to(self.steps.dtype)
        if self.wd and self.cfg.optimizer != "adamw":  # coupled L2 (Adam, SGD)
            g.add_(p, alpha=self.wd)
        if not self.adam:  # plain SGD (make_optimizer builds it without momentum)
            p.sub_(g.mul_(self.lr * on))
            return
        b1, b2 = self.betas
        if self.cfg.optimizer == "adamw":
            p.mul_(1 - self.lr * self.wd * on)
        # m <- b1 m + (1 - b1) g and v <- b2 v + (1 - b2) g^2, for active clients only
        self.m.mul_(1 - (1 - b1) * on).add_(g * ((1 - b1) * on))
        self.v.mul_(1 - (1 - b2) * on).add_(g.mul_(g).mul_((1 - b2) * on))
        t = self.steps.clamp(min=1).view(-1, 1)
        step_size = (self.lr / (1 - b1**t)).to(p.dtype) * on
        bc2_sqrt = (1 - b2**t).sqrt().to(p.dtype)
        denom = self.v.sqrt().div_(bc2_sqrt).add_(self.eps)
        p.sub_(denom.reciprocal_().mul_(self.m).mul_(step_size))

    def zero_grad(self) -> None:
        for p in self.mnet.params():
            p.grad = None


def optimizer_template(model, cfg: TrainConfig) -> dict:
    """``state_dict()`` of a fresh torch optimizer over ``model``'s trainable parameters (its
    ``param_groups`` are copied into every saved client state)."""
    return make_optimizer(trainable_params(model), cfg).state_dict()


# ----------------------------------------------------------------------------- training


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host -> device copy that does not block the host (pinned staging on CUDA)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class ClientJob:
    """One client's local training: its state, optimizer state, sample indices and batch RNG."""

    state: dict[str, torch.Tensor]
    opt_state: dict | None
    idx: np.ndarray
    rng: np.random.Generator


def _client_batches(data: Tokenized, job: ClientJob, batch_size: int, total: int,
                    group: bool, pad_id: int):  # fmt: skip
    """Exactly the batch sequence :func:`fedtune.train.train_local` (or
    :func:`fedtune.kd_ops.distill`, epochs x batches) draws for this client: ``total`` steps."""
    steps = 0
    while steps < total:
        for batch in batches(data, job.idx, batch_size, pad_id, job.rng, group):
            yield batch
            steps += 1
            if steps >= total:
                return


def fuse(parts: list[tuple[int, dict]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate per-client batches ``(slot, batch)`` into one right-padded batch.

    Returns ``input_ids``/``attention_mask [B, L]`` (L = longest part), ``labels [B]`` and
    ``rows [B]`` (the slot of each row)."""
    length = max(b["input_ids"].shape[1] for _, b in parts)
    ids, mask = [], []
    for _, b in parts:
        extra = length - b["input_ids"].shape[1]
        ids.append(F.pad(b["input_ids"], (0, extra), value=pad_id))
        mask.append(F.pad(b["attention_mask"], (0, extra), value=0))
    rows = [torch.full((len(b["labels"]),), slot, dtype=torch.long) for slot, b in parts]
    return {
        "input_ids": torch.cat(ids),
        "attention_mask": torch.cat(mask),
        "labels": torch.cat([b["labels"] for _, b in parts]),
        "rows": torch.cat(rows),
    }


def length_buckets(batch: dict[str, torch.Tensor], min_rows: int) -> list[dict[str, torch.Tensor]]:
    """Split a fused batch into length-sorted sub-batches when that saves >= 5% of the padded
    tokens per halving (each client's batch has its own length, so the fused batch pads to
    the longest of all). Sub-batches keep >= ``min_rows`` rows; each is trimmed to its own
    longest row. Returns ``[batch]`` itself when no split pays."""
    lengths = batch["attention_mask"].sum(1)
    order = torch.argsort(lengths, stable=True)
    rows, best, best_cost = len(lengths), [order], len(lengths) * int(lengths.max())
    k = 2
    while rows // k >= min_rows:
        chunks = order.tensor_split(k)
        cost = sum(len(c) * int(lengths[c].max()) for c in chunks)
        if cost > 0.95 * best_cost:
            break
        best, best_cost, k = chunks, cost, 2 * k
    if len(best) == 1:
        return [batch]
    return [{key: (v[c, : int(lengths[c].max())] if v.dim() == 2 else v[c]) for key, v in batch.items()}
            for c in best]  # fmt: skip


def train_many(
    model,
    jobs: list[ClientJob],
    data: Tokenized,
    cfg: TrainConfig,
    pad_id: int,
    device,
    *,
    teacher: torch.Tensor | None = None,
    temperature: float = 1.0,
    epochs: int = 0,
    batch_size: int = 0,
) -> list[LocalResult]:
    """Train every job's state as :func:`fedtune.train.train_local` would, all at once.

    With ``teacher [S, C]`` (probabilities) it distils instead, as
    :func:`fedtune.kd_ops.distill` does with no weights: ``data.labels`` are then row positions
    in ``teacher`` and each client runs ``epochs`` passes of ``batch_size``. One fused step
    per local step index; returns one :class:`LocalResult` per job, in order."""
    n = len(jobs)
    mnet = multinet(model, n)
    net = mnet.net
    opt = StackedOptimizer(mnet, cfg, optimizer_template(model, cfg))
    for slot, job in enumerate(jobs):
        mnet.load(slot, job.state)
        opt.load(slot, job.opt_state if cfg.optimizer_state == "keep" else None)
    net.train()
    bs = batch_size or cfg.batch_size

    def total(job: ClientJob) -> int:
        return epochs * -(-len(job.idx) // bs) if teacher is not None else num_local_steps(
            len(job.idx), cfg)  # fmt: skip

    streams = [_client_batches(data, job, bs, total(job), cfg.group_by_length, pad_id)
               for job in jobs]  # fmt: skip
    if teacher is not None:
        teacher = teacher.to(device)
    loss_sum = torch.zeros(mnet.n, device=device)  # per-client, on device: no sync per step
    steps, samples = [0] * n, [0] * n
    while True:
        parts = []
        for slot, stream in enumerate(streams):
            b = next(stream, None)
            if b is not None:
                parts.append((slot, b))
                steps[slot] += 1
                samples[slot] += len(b["labels"])
        if not parts:
            break
        fused = fuse(parts, pad_id)  # on the host: bucketing below needs no device sync
        counts = to_device(torch.bincount(fused["rows"], minlength=mnet.n).float(), device)
        opt.zero_grad()
        for sub in length_buckets(fused, MIN_BUCKET_ROWS):
            batch = {k: to_device(v, device) for k, v in sub.items()}
            rows = batch["rows"]
            uniform = sub is fused and len({len(b["labels"]) for _, b in parts}) == 1
            slots = to_device(torch.tensor([s for s, _ in parts]), device) if uniform else None
            mnet.set_rows(rows, slots)
            key = ("train_many", cfg.autocast, len(parts), uniform, *batch["input_ids"].shape)
            with compute.step(key):
                with autocast(batch["input_ids"].device, cfg.autocast):
                    out = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                logits = out.logits.float()
                if teacher is None:
                    loss = F.cross_entropy(logits, batch["labels"], reduction="none")
                else:
                    loss = kd_loss_rows(logits, teacher[batch["labels"]], temperature)
                per_row = loss / counts[rows]  # summed over a client's rows: its mean loss
                per_row.sum().backward()  # gradients of the sub-batches add up
            loss_sum.index_add_(0, rows, per_row.detach())
        opt.step(counts > 0)
    mnet.set_rows(None)
    losses = loss_sum.cpu().tolist()
    return [
        LocalResult(
            state=mnet.state(slot),
            opt_state=opt.state_dict(slot) if cfg.optimizer_state == "keep" else None,
            loss=losses[slot] / max(steps[slot], 1),
            steps=steps[slot],
            samples=samples[slot],
        )
        for slot in range(n)
    ]


@torch.inference_mode()
def predict_many(
    model,
    states: list[dict[str, torch.Tensor]],
    data: Tokenized,
    idx: np.ndarray,
    batch_size: int,
    pad_id: int,
    device,
    amp: str = "off",
) -> list[torch.Tensor]:
    """Every state's logits ``[len(idx), C]`` (float32, CPU, ``idx`` order) on the same
    samples (KD's b2), computed as one pass whose batches hold ``batch_size`` samples of each
    of up to ``len(states)`` clients (length-sorted, so little padding)."""
    n = len(states)
    mnet = multinet(model, n)
    for slot, st in enumerate(states):
        mnet.load(slot, st)
    mnet.net.eval()
    idx = np.asarray(idx)
    order = np.argsort([len(data.ids[i]) for i in idx], kind="stable")
    per = max(1, batch_size // n)  # samples per fused batch: each is repeated for n clients
    outs: list[torch.Tensor] = []
    for batch in batches(data, idx[order], per, pad_id):
        b = len(batch["labels"])
        ids = to_device(batch["input_ids"].repeat(n, 1), device)
        mask = to_device(batch["attention_mask"].repeat(n, 1), device)
        slots = torch.arange(n, device=device)
        mnet.set_rows(slots.repeat_interleave(b), slots)
        with compute.step(("infer_many", amp, n, *ids.shape)), autocast(ids.device, amp):
            logits = mnet.net(input_ids=ids, attention_mask=mask).logits.float()
        outs.append(logits.view(n, b, -1))
    mnet.set_rows(None)
    mnet.net.train()
    logits = torch.cat(outs, dim=1).cpu()  # [n, S, C] in sorted order
    result = torch.empty_like(logits)
    result[:, torch.as_tensor(order)] = logits
    return list(result.unbind(0))


# ----------------------------------------------------------------------------- runtime hook


def batched_handler(ctx, fw, outgoing: dict):
    """``fw.handle_many`` when ``fed.engine`` is 'batched' and the framework accepts this
    round's messages in one call, else None (the runtime then calls ``Client.handle``)."""
    if ctx.cfg.fed.engine != "batched" or not hasattr(fw, "handle_many") or len(outgoing) < 1:
        return None
    accepts = getattr(fw, "accepts_many", lambda msgs: True)
    return fw.handle_many if accepts(list(outgoing.values())) else None


def handle_all(ctx, handle_many, clients: dict, received: dict, meters: dict) -> dict:
    """Let ``handle_many`` answer the ``received`` messages (``{cid: Message}``, already through
    the wire) in chunks of ``fed.concurrent_clients``; returns ``{cid: reply or None}``. The
    chunk's compute is metered once and apportioned to its clients by samples trained (their
    meters' FLOPs, seconds; peak memory is the chunk's)."""
    cids = list(received)
    size = ctx.cfg.fed.concurrent_clients or len(cids)
    replies = {}
    for c in range(0, len(cids), size):
        chunk = cids[c : c + size]
        meter = ComputeMeter(ctx.device, ctx.cfg.flops, ctx.flop_cache)
        with meter.measure():
            out = handle_many(ctx, [clients[cid] for cid in chunk], [received[i] for i in chunk])
        weights = [float(len(ctx.client_samples(cid))) for cid in chunk]
        total = sum(weights) or 1.0
        for cid, w, reply in zip(chunk, weights, out, strict=True):
            s = meter.stats
            meters[cid].stats.add(ComputeStats(int(round(s.flops * w / total)),
                                               s.seconds * w / total, s.peak_memory_bytes))  # fmt: skip
            replies[cid] = reply
    return replies
