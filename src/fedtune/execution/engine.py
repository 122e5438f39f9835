"""Batched engine: the jobs of many clients as one step of one network.

``fed.engine = "batched"`` makes the batched executor (:mod:`.executors`) hand the round's
:class:`~fedtune.execution.jobs.Train` jobs of many clients to :func:`train_many` and their
:class:`~fedtune.execution.jobs.Predict` jobs on the same samples to :func:`predict_many`
(FedLLM's a2, KD's b1, b2 and b8). Step ``t`` of the fused
loop concatenates step ``t``'s batch of every client that still has steps, runs ONE
forward/backward through the shared backbone with each row using its own client's adapter
(:mod:`.multilora`), and applies every client's optimizer step at once:

* the loss is the SUM over clients of each client's mean loss, so the gradient reaching client
  ``n``'s adapter is exactly its solo gradient (rows never interact in a transformer);
* Adam/AdamW/SGD are elementwise, so one update over the stacked ``[N, ...]`` tensors equals N
  separate updates, given a per-client step counter (clients may have different histories) and
  a per-client mask (a client with fewer local steps stops early: its tensors are untouched);
* gradient clipping uses each client's own norm.

So batched training equals training the clients one after another (tests/test_engine.py), up
to float rounding and the dropout RNG stream. Each client's batches are drawn by the same
:func:`.train.job_batches` as the sequential path.
No host synchronisation happens inside a step (losses accumulate on the device).
"""

from __future__ import annotations

import weakref
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from .. import compute, seeds
from ..context import Context
from ..data import batches, join_batches
from ..errors import ConfigError
from . import multilora
from .jobs import Predict, Train
from .stacked import StackedOptimizer, optimizer_template
from .train import LocalResult, job_batches, shape_of

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


# ----------------------------------------------------------------------------- training


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host -> device copy that does not block the host (pinned staging on CUDA)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def fuse(parts: list[tuple[int, dict]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate per-client batches ``(slot, batch)`` into one right-padded batch.

    Returns every batch tensor joined (``input_ids``/``attention_mask [B, L]``, L = longest
    part; ``labels [B]``; generation's targets ``[B, R]``), ``rows [B]`` (the slot of each row)
    and ``pos [B]`` (the fused row order)."""
    rows = [torch.full((len(b["labels"]),), slot, dtype=torch.long) for slot, b in parts]
    return {
        **join_batches([b for _, b in parts], pad_id),
        "rows": torch.cat(rows),
        "pos": torch.arange(sum(len(b["labels"]) for _, b in parts)),
    }


def rows_of(batch: dict[str, torch.Tensor], idx) -> dict[str, torch.Tensor]:
    """The rows ``idx`` (a slice or an index tensor) of every tensor of ``batch``."""
    return {k: v[idx] for k, v in batch.items()}


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
    return [
        {key: (v[c, : int(lengths[c].max())] if v.dim() == 2 else v[c]) for key, v in batch.items()}
        for c in best
    ]


def train_many(ctx: Context, jobs: list[Train]) -> list[LocalResult]:
    """Run every :class:`~fedtune.execution.jobs.Train` job as :func:`.train.train` would, all at
    once: one fused step per local step index. Returns one ``LocalResult`` per job, in order.

    Each job keeps its own loss. When every loss is a mean over rows (``rows`` gives them), a
    fused step runs each length-sorted sub-batch forward and backward on its own, each row's
    loss divided by its client's row count (so a client's rows sum to its mean loss): the
    memory of one sub-batch at a time. Otherwise it runs all sub-batches forward, then each
    client's loss on its own rows, and back-propagates their sum once."""
    model, cfg, pad_id, device = ctx.model, ctx.cfg.train, ctx.data.pad_id, ctx.device
    if any(job.drifts for job in jobs):  # the config check keeps such runs sequential
        raise ConfigError(
            "fedopt's drift terms (prox_mu, scaffold, lora=ffa) need fed.engine=sequential"
        )
    n = len(jobs)
    mnet = multinet(model, n)
    opt = StackedOptimizer(mnet, cfg, optimizer_template(model, cfg))
    for slot, job in enumerate(jobs):
        mnet.load(slot, job.state)
        opt.load(slot, job.opt_state if cfg.optimizer_state == "keep" else None)
    mnet.net.train()
    seeds.seed_torch(seeds.batched(jobs[0].stream))  # one dropout stream for the fused job
    losses = [job.loss.to(device) for job in jobs]
    streams = [job_batches(job, cfg, pad_id) for job in jobs]
    loss_sum = torch.zeros(n, device=device)  # per-client, on device: no sync per step
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
        subs = length_buckets(fused, MIN_BUCKET_ROWS)
        sizes = [len(b["labels"]) for _, b in parts]
        uniform = len(subs) == 1 and len(set(sizes)) == 1
        key = (
            "train_many",
            cfg.autocast,
            tuple((losses[s].name, len(b["labels"])) for s, b in parts),
            uniform,
            tuple(shape_of(sub) for sub in subs),
        )
        opt.zero_grad()

        def fused_step(acc, subs=subs, parts=parts, sizes=sizes, uniform=uniform, fused=fused):
            if all(losses[s].rows is not None for s, _ in parts):
                counts = torch.bincount(fused["rows"], minlength=mnet.n).float()
                rowwise_step(ctx, mnet, subs, parts, uniform, losses, counts, acc)
                return
            logits = fused_logits(ctx, mnet, subs, parts, uniform)
            whole = {k: to_device(v, device) for k, v in fused.items()}
            total, start = 0, 0
            for (slot, _), size in zip(parts, sizes, strict=True):
                rows = slice(start, start + size)
                loss = losses[slot](logits[rows], rows_of(whole, rows))
                acc[slot] += loss.detach()
                total, start = total + loss, start + size
            total.backward()

        compute.step(
            key, lambda: fused_step(loss_sum), lambda: fused_step(loss_sum.clone()), mnet.params()
        )
        for slot, b in parts:  # each party's memory: its own step on the plain model
            party_memory(ctx, slot, losses[slot], b)
        active = torch.zeros(mnet.n, dtype=torch.bool)
        active[[s for s, _ in parts]] = True
        opt.step(to_device(active, device))
    mnet.set_rows(None)
    for slot in range(n):  # each party keeps its own optimizer state
        compute.hold(opt.state_dict(slot)["state"], slot)
    mean = loss_sum.cpu().tolist()
    return [
        LocalResult(
            state=mnet.state(slot),
            opt_state=opt.state_dict(slot) if cfg.optimizer_state == "keep" else None,
            loss=mean[slot] / max(steps[slot], 1),
            steps=steps[slot],
            samples=samples[slot],
        )
        for slot in range(n)
    ]


def party_memory(ctx: Context, slot: int, loss_fn, batch: dict) -> None:
    """Measure what party ``slot`` of a fused step would need for its own step on ``batch``:
    the sequential executor's step (same key) on the plain model, replayed, never run."""
    model, amp = ctx.model, ctx.cfg.train.autocast
    key = (loss_fn.name, amp, *shape_of(batch))  # host shapes: no copy unless it is replayed

    def own_step():
        b = {k: to_device(v, ctx.device) for k, v in batch.items()}
        loss_fn(ctx.task.logits(model, b, amp), b).backward()

    grads = (p for p in model.parameters() if p.requires_grad)  # walked only by a replay
    compute.party_step(slot, key, own_step, grads)


def rowwise_step(ctx, mnet, subs, parts, uniform, losses, counts, loss_sum) -> None:
    """Forward and backward one sub-batch at a time with per-row losses (see train_many).
    ``counts [N]``: rows of each client slot in the fused step (host)."""
    counts = to_device(counts, ctx.device)
    shared = len({type(losses[s]) for s, _ in parts}) == 1 and losses[parts[0][0]].shared
    for sub in subs:
        batch, logits = sub_logits(ctx, mnet, sub, parts, uniform)
        if shared:  # one loss for every row (e.g. cross-entropy): one call
            rows, values = batch["rows"], losses[parts[0][0]].rows(logits, batch)
        else:  # each client's own loss on its own rows (grouped on the host: no device sync)
            groups = [(s, torch.nonzero(sub["rows"] == s).squeeze(1)) for s, _ in parts]
            groups = [(s, to_device(i, ctx.device)) for s, i in groups if len(i)]
            values = torch.cat([losses[s].rows(logits[i], rows_of(batch, i)) for s, i in groups])
            rows = torch.cat([torch.full_like(i, s) for s, i in groups])
        per_row = values / counts[rows]  # a client's rows sum to its mean loss
        per_row.sum().backward()  # the sub-batches' gradients add up
        loss_sum.index_add_(0, rows, per_row.detach())


def sub_logits(ctx: Context, mnet, sub: dict, parts: list, uniform: bool):
    """One sub-batch on the device and its logits, each row with its client's adapters
    (``uniform``: one sub-batch of equal per-client parts, so layers gather per client)."""
    batch = {k: to_device(v, ctx.device) for k, v in sub.items()}
    slots = to_device(torch.tensor([s for s, _ in parts]), ctx.device) if uniform else None
    mnet.set_rows(batch["rows"], slots)
    return batch, ctx.task.logits(mnet.net, batch, ctx.cfg.train.autocast)


def fused_logits(ctx: Context, mnet, subs: list[dict], parts: list, uniform: bool):
    """Logits ``[B, ...]`` of a fused batch, in fused row order, from its sub-batches
    (generation's ``[b, R, V]`` are zero-padded to the widest R: those positions have no
    target)."""
    out, pos = [], []
    for sub in subs:
        batch, logits = sub_logits(ctx, mnet, sub, parts, uniform)
        out.append(logits)
        pos.append(batch["pos"])
    if len(out) == 1:
        return out[0]
    if out[0].dim() == 3:
        width = max(x.shape[1] for x in out)
        out = [F.pad(x, (0, 0, 0, width - x.shape[1])) for x in out]
    return torch.cat(out)[torch.argsort(torch.cat(pos))]


@torch.inference_mode()
def predict_many(ctx: Context, jobs: list[Predict]) -> list:
    """Every job's logits ``[len(idx), C]`` (float32, CPU, ``idx`` order) on the SAME samples
    (KD's b2), computed as one pass whose batches hold ``eval_batch_size / N`` samples of each
    of the N clients (length-sorted, so little padding)."""
    model, cfg, pad_id, device = ctx.model, ctx.cfg.train, ctx.data.pad_id, ctx.device
    n, data, idx = len(jobs), jobs[0].data, np.asarray(jobs[0].idx)
    mnet = multinet(model, n)
    for slot, job in enumerate(jobs):
        mnet.load(slot, job.state)
    mnet.net.eval()
    order = np.argsort([len(data.ids[i]) for i in idx], kind="stable")
    per = max(1, cfg.eval_batch_size // n)  # samples per fused batch: each repeated n times
    outs: list[torch.Tensor] = []
    reduce = jobs[0].reduce or ctx.task.scores

    def alone(batch):  # one party's own pass over the batch (measured, never run)
        b = {k: to_device(v, device) for k, v in batch.items()}
        return reduce(ctx.task.logits(model, b, cfg.autocast), b)

    for batch in batches(data, idx[order], per, pad_id):
        b = len(batch["labels"])
        fused = {
            k: to_device(v.repeat(n, *([1] * (v.dim() - 1))), device) for k, v in batch.items()
        }
        slots = torch.arange(n, device=device)
        mnet.set_rows(slots.repeat_interleave(b), slots)
        amp = cfg.autocast
        key = ("infer_many", amp, n, *shape_of(fused))
        out = compute.step(key, lambda f=fused, a=amp: reduce(ctx.task.logits(mnet.net, f, a), f))
        for slot in range(n):  # each party alone: the plain model on the batch
            compute.party_step(slot, ("infer", amp, *shape_of(batch)), partial(alone, batch))
        outs.append(out.view(n, b, *out.shape[1:]))
    mnet.set_rows(None)
    mnet.net.train()
    logits = torch.cat(outs, dim=1).cpu()  # [n, S, ...] in sorted order
    result = torch.empty_like(logits)
    result[:, torch.as_tensor(order)] = logits
    return list(result.unbind(0))
