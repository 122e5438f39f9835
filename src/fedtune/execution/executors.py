"""Executors: run the jobs that clients ask for, one by one or many in lock-step.

A client's work in an exchange is ``start()``, a call of its ``handle(msg, link)``: either a
generator that yields :mod:`~fedtune.execution.jobs` and returns the reply, or the reply itself
(a client that computes inline, such as split learning's per-batch steps). An executor runs the
work of all clients of one exchange and returns ``{cid: reply or None}``, metering each client's
compute with its own :class:`~fedtune.compute.ComputeMeter`.

* :class:`Sequential` - each client's work start to end, jobs run by :mod:`.train`;
* :class:`Batched` (``fed.engine=batched``) - advances every client to its next job, runs all
  pending Train jobs as one fused loop and all Predict jobs on the same samples as one fused
  pass (:mod:`.engine`), in chunks of ``fed.concurrent_clients``; a chunk's measured compute is
  apportioned to its clients by the rows each processed; each client's peak memory is that of
  its own steps, measured on the plain model (:func:`fedtune.compute.party_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Protocol

import numpy as np

from ..compute import ComputeMeter, ComputeStats
from ..context import Context
from ..messages import Message
from .jobs import Generate, Job, Predict, Train
from .train import generate_job, predict, train

Work = Generator[Job, Any, Message | None]
Start = Callable[[], "Work | Message | None"]


class Executor(Protocol):
    def run(
        self, work: dict[int, Start], meters: dict[int, ComputeMeter]
    ) -> dict[int, Message | None]:
        """Run each client's work; returns its reply (None: no reply)."""
        ...


class Sequential:
    """Clients one after another; each job runs alone on the shared model."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def execute(self, job: Job) -> Any:
        return execute(self.ctx, job)

    def run(self, work: dict[int, Start], meters: dict[int, ComputeMeter]) -> dict:
        out = {}
        for cid, start in work.items():
            with meters[cid].measure():
                w = start()
                out[cid] = drive(w, self.execute) if isinstance(w, Generator) else w
        return out


def execute(ctx: Context, job: Job) -> Any:
    """Run one job alone on the shared model."""
    if isinstance(job, Train):
        return train(ctx, job)
    if isinstance(job, Generate):
        return generate_job(ctx, job)
    return predict(ctx, job)


def drive(work: Work, execute: Callable[[Job], Any]) -> Message | None:
    """Run a work generator to its end, answering each job with ``execute(job)``."""
    try:
        job = next(work)
        while True:
            job = work.send(execute(job))
    except StopIteration as stop:
        return stop.value


class Batched:
    """Many clients' jobs of the same kind in one fused loop (:mod:`.engine`)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.chunk = ctx, ctx.cfg.fed.concurrent_clients

    def run(self, work: dict[int, Start], meters: dict[int, ComputeMeter]) -> dict:
        out: dict[int, Message | None] = {}
        gens: dict[int, Work] = {}
        jobs: dict[int, Job] = {}
        for cid, start in work.items():
            with meters[cid].measure():
                w = start()
                if isinstance(w, Generator):
                    gens[cid] = w
                    self._advance(cid, w, None, jobs, out, first=True)
                else:
                    out[cid] = w
        while jobs:
            results = self._execute(jobs, meters)
            jobs = {}
            for cid, result in results.items():
                with meters[cid].measure():
                    self._advance(cid, gens[cid], result, jobs, out)
        return {cid: out[cid] for cid in work}  # in the order the work came

    @staticmethod
    def _one_by_one(ctx: Context, jobs: list[Job]) -> list:
        return [execute(ctx, job) for job in jobs]

    @staticmethod
    def _advance(cid, gen: Work, result, jobs: dict, out: dict, first: bool = False) -> None:
        try:
            jobs[cid] = next(gen) if first else gen.send(result)
        except StopIteration as stop:
            out[cid] = stop.value

    def _execute(self, jobs: dict[int, Job], meters: dict[int, ComputeMeter]) -> dict:
        """Results of one job per client: Train jobs fused, Predict jobs fused per sample set."""
        from . import engine  # the multi-client network is built only when it is used

        groups: dict[Any, list[int]] = {}
        for cid, job in jobs.items():
            if isinstance(job, Generate):  # decoding does not fuse: each on its own
                key = ("generate", cid)
            else:
                key = "train" if isinstance(job, Train) else predict_key(job)
            groups.setdefault(key, []).append(cid)
        results = {}
        for key, cids in groups.items():
            run = engine.train_many if key == "train" else engine.predict_many
            if key[0] == "generate":
                run = self._one_by_one
            size = self.chunk or len(cids)
            for c in range(0, len(cids), size):
                chunk = cids[c : c + size]
                meter = ComputeMeter(self.ctx.device, self.ctx.cfg.flops, meters[chunk[0]].cache)
                with meter.measure():
                    done = run(self.ctx, [jobs[i] for i in chunk])
                rows = [rows_processed(jobs[i], r) for i, r in zip(chunk, done, strict=True)]
                apportion(meter, {i: meters[i] for i in chunk}, rows)
                results.update(zip(chunk, done, strict=True))
        return results


def predict_key(job: Predict) -> tuple:
    """Predict jobs fuse when they ask for the same samples of the same data."""
    return ("predict", id(job.data), np.asarray(job.idx).tobytes(), id(job.reduce))


def rows_processed(job: Job, result) -> float:
    """The rows a job ran through the model: a fused step's cost is shared by them (a client
    doing 3 local steps on a large dataset costs what its 3 batches cost, not its size)."""
    if isinstance(job, Train):
        return float(result.samples)
    return float(len(job.idx))


def apportion(meter: ComputeMeter, meters: dict[int, ComputeMeter], weights: list[float]):
    """Split a chunk's FLOPs and seconds over its clients in proportion to ``weights``; each
    client's memory is its own (``meter.parties``, slot = position in the chunk)."""
    stats, total = meter.stats, sum(weights) or 1.0
    for slot, ((_, m), w) in enumerate(zip(meters.items(), weights, strict=True)):
        own = meter.parties.get(slot)
        m.stats.add(
            ComputeStats(
                int(round(stats.flops * w / total)),
                stats.seconds * w / total,
                own.total() if own is not None else stats.peak_memory_bytes,
            )
        )


def make_executor(ctx: Context) -> Executor:
    """The executor ``fed.engine`` names, running jobs on ``ctx``'s model and task."""
    return (Batched if ctx.cfg.fed.engine == "batched" else Sequential)(ctx)
