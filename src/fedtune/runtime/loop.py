"""The round loop: one for every runtime. Runtimes are transports.

Read :func:`run` top to bottom: each round samples clients, drives the framework's server
generator, hands its messages to the transport (in-process or Flower), evaluates the global
state, appends one line to ``metrics.jsonl`` and writes a checkpoint that ``resume=True``
continues from. Client faults (dropout, deadline, attack simulation) come from faults.py; a
round with too few clients left is retried or skipped (``fed.on_too_few``).

A transport moves one exchange of messages to the sampled clients and back
(:class:`Transport`); how the clients compute is its business (an executor in-process, the
SuperNodes on Flower).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from .. import frameworks
from ..compute import ComputeMeter
from ..config import RunConfig
from ..context import Context, ServerContext
from ..messages import Message, Notices, Wire
from . import checkpoint, faults
from .records import (
    RoundResult,
    RoundState,
    evaluate_global,
    format_round,
    initial_record,
    round_record,
    sample_clients,
)
from .rundir import RunDir, summarize


class Transport(Protocol):
    """How messages reach the clients and come back. ``wire`` counts every byte."""

    name: str
    wire: Wire

    def prepare(self, cfg: RunConfig, ctx: Context | None) -> ServerContext:
        """The server's context: the model and the server's data (``ctx``: a prepared process
        context to use instead of loading ``cfg``'s); the clients' sample counts in it come
        from wherever the clients are."""
        ...

    def start(self, ctx: ServerContext, fw: frameworks.Framework, server: frameworks.Server):
        """Make the clients reachable (build them in-process; greet the SuperNodes)."""
        ...

    def begin_round(self, rs: RoundState) -> None: ...

    def exchange(self, rs: RoundState, outgoing: dict[int, Message]) -> dict[int, Message]:
        """Deliver ``outgoing`` and return the replies received. A client that does not
        answer (or answers too late, or unreadably) is recorded in ``rs.lost`` with the
        reason; its compute goes to ``rs.meters``."""
        ...

    def notify(self, rs: RoundState, notices: Notices) -> None:
        """Deliver messages that need no reply, now or with the client's next message."""
        ...

    def end_round(self, rs: RoundState) -> None: ...

    def local_clients(self) -> dict[int, Any] | None:
        """The client objects when they live in this process (for ``client_eval``)."""
        ...

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume the clients' side."""
        ...

    def load_state_dict(self, d: dict, after_round: int) -> None: ...

    def summary(self) -> dict:
        """Extra ``summary.json`` entries (e.g. the SuperNodes of a Flower run)."""
        ...

    def close(self) -> None: ...


@dataclass
class RunResult:
    """What :func:`run` returns: ``summary.json``'s content and every round's record."""

    summary: dict
    history: list[dict]


def run(
    cfg: RunConfig,
    transport: Transport,
    out: str | Path | None = None,
    *,
    ctx: Context | None = None,
    log: Callable[[str], None] | None = print,
    resume: bool = False,
    on_round: Callable[[dict], None] | None = None,
) -> RunResult:
    """Run ``cfg`` over ``transport``; write the run directory ``out`` when given.

    ``ctx`` reuses a prepared process context (custom data or model); ``resume=True`` continues the
    unfinished run in ``out`` from its last checkpoint; ``on_round(record)`` is called after
    every round with its ``metrics.jsonl`` line."""
    t_start = time.perf_counter()
    fw = frameworks.get(cfg.fed.framework)
    if out is not None:  # refuse to mix with a finished run before the slow model load
        RunDir.check_resumable(out) if resume else RunDir.check(out)
    history: list[dict] = []
    done = 0  # rounds already run (by the run being resumed)
    try:
        ctx = transport.prepare(cfg, ctx)
        server = fw.server(ctx)  # the framework's own checks of the config
        transport.start(ctx, fw, server)
        rundir = None  # created only now: a run that fails on bad input leaves nothing
        if out is not None:
            rundir = RunDir(Path(out)) if resume else RunDir.create(out, cfg)
        if resume and rundir is not None:
            state = checkpoint.load(rundir.path)
            if state is not None:
                done, history = checkpoint.restore(state, cfg, server, transport)
            rundir.rewrite_metrics(history)  # drop lines of rounds after the checkpoint
            if log is not None:
                log(f"resuming {out} after round {done} of {cfg.fed.rounds}")
        load_seconds = time.perf_counter() - t_start
        if done == 0 and cfg.eval.at_start and ctx.data.generate is not None:
            history.append(initial_record(ctx, server))  # round 0: the base model
            if rundir is not None:
                rundir.append_metrics(history[-1])
            if log is not None:
                log(format_round(history[-1], cfg.fed.rounds))
        bar = tqdm(
            range(done + 1, cfg.fed.rounds + 1),
            desc=fw.name,
            unit="round",
            disable=not ctx.progress,
            initial=done,
            total=cfg.fed.rounds,
        )
        for rnd in bar:
            t0 = time.perf_counter()
            result, attempts = run_round_with_retries(ctx, server, transport, rnd, log)
            record = round_record(rnd, result, transport.wire.ledger)
            record["attempts"] = attempts
            record["round_seconds"] = time.perf_counter() - t0
            if rnd % cfg.fed.eval_every == 0 or rnd == cfg.fed.rounds:
                record.update(evaluate_global(ctx, server, rnd))
                clients = transport.local_clients()
                if fw.client_eval is not None and clients is not None:
                    record.update(fw.client_eval(ctx, server, clients))
            history.append(record)
            if rundir is not None:
                rundir.append_metrics(record)
                every = cfg.fed.checkpoint_every
                if every and (rnd % every == 0 or rnd == cfg.fed.rounds):
                    state = checkpoint.capture(rnd, cfg, server, transport, history)
                    checkpoint.save(rundir.path, state)
            if on_round is not None:
                on_round(record)
            line = format_round(record, cfg.fed.rounds)
            if ctx.progress:
                bar.write(line)
            elif log is not None:
                log(line)
    finally:
        transport.close()
    ledger = transport.wire.ledger
    summary = summarize(cfg, ctx, history, ledger, server.params_exchanged())
    summary.update(
        load_seconds=load_seconds,
        wall_seconds=time.perf_counter() - t_start,
        runtime=transport.name,
        **transport.summary(),
    )
    if rundir is not None:
        rundir.finish(summary, ctx, server.eval_state())
    return RunResult(summary, history)


def run_round_with_retries(ctx: ServerContext, server, transport: Transport, rnd: int, log):
    """Run round ``rnd``; when too few clients are left, retry it with a fresh sample (up to
    ``fed.max_retries`` times) or skip it, per ``fed.on_too_few``. Returns the last
    :class:`RoundResult` and the number of attempts."""
    cfg, fed = ctx.cfg, ctx.cfg.fed
    attempts = 1 + (fed.max_retries if fed.on_too_few == "retry" else 0)
    n = ctx.data.num_clients
    for attempt in range(attempts):
        sampled = sample_clients(n, fed.fraction_fit, fed.min_clients, cfg.seed, rnd, attempt)
        result = run_round(ctx, server, transport, rnd, sampled, attempt)
        if result.completed:
            break
        left = len(sampled) - len(result.lost)
        action = "retrying" if attempt + 1 < attempts else "skipping the round"
        if log is not None:
            lost = dict(sorted(result.lost.items()))
            log(
                f"round {rnd}: only {left} of {len(sampled)} clients left (lost: {lost}), "
                f"fewer than fed.min_clients={fed.min_clients}; {action}"
            )
    return result, attempt + 1


def run_round(
    ctx: ServerContext, server, transport: Transport, rnd: int, sampled: list[int], attempt: int = 0
) -> RoundResult:
    """One attempt at a communication round, with the configured client faults (faults.py).

    A client that drops out gets the round's first message and never answers; a client over
    the deadline has its reply discarded; a reply that fails to decode is discarded. The server
    knows a lost client is gone and sends it nothing more this round. When fewer than
    ``fed.min_clients`` clients are left after an exchange, the round is abandoned."""
    cfg, fed = ctx.cfg, ctx.cfg.fed

    def meter() -> ComputeMeter:
        return ComputeMeter(ctx.device, cfg.flops, ctx.flop_cache)

    rs = RoundState(
        rnd,
        attempt,
        sampled,
        {c for c in sampled if faults.drops_out(fed.dropout, cfg.seed, rnd, c, attempt)},
        {cid: meter() for cid in sampled},
        meter(),
    )
    transport.begin_round(rs)
    gen = server.round(rnd, sampled)
    with rs.server_meter.measure():
        outgoing = next(gen)
    while True:
        notices = isinstance(outgoing, Notices)
        outgoing = {cid: m for cid, m in outgoing.items() if cid not in rs.lost}
        rs.exchange += 1
        if notices:  # no replies to wait for
            transport.notify(rs, Notices(outgoing))
            replies: dict[int, Message] = {}
        else:
            replies = transport.exchange(rs, outgoing)
        for cid in replies.keys() & set(fed.poison_clients):  # attack simulation, off by default
            replies[cid] = faults.poison(replies[cid], outgoing[cid], fed.poison_scale)
        if faults.too_few(len(sampled) - len(rs.lost), fed.min_clients):
            gen.close()
            return result_of(rs, {}, completed=False)
        try:
            with rs.server_meter.measure():
                outgoing = gen.send(replies)
        except StopIteration as stop:
            metrics = stop.value or {}
            break
    transport.end_round(rs)
    return result_of(rs, metrics)


def result_of(rs: RoundState, metrics: dict, completed: bool = True) -> RoundResult:
    stats = {cid: m.stats for cid, m in rs.meters.items()}
    return RoundResult(rs.sampled, metrics, stats, rs.server_meter.stats, rs.lost, completed)


def simulate(
    cfg: RunConfig,
    out: str | Path | None = None,
    *,
    ctx: Context | None = None,
    log: Callable[[str], None] | None = print,
    resume: bool = False,
) -> dict:
    """Run ``cfg`` in-process and return the summary dict (also written to ``out``)."""
    from .inprocess import InProcess

    return run(cfg, InProcess(), out, ctx=ctx, log=log, resume=resume).summary


__all__ = ["RunResult", "Transport", "run", "run_round", "sample_clients", "simulate"]
