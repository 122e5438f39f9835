"""In-process simulation runtime: the server and every client in one process, one shared model.

Read :func:`simulate` top to bottom: each round samples clients, drives the framework's server
generator, moves every message through the counting :class:`~fedtune.messages.Wire`, meters each
client's compute, evaluates the global state, appends one line to ``metrics.jsonl`` and writes a
checkpoint (checkpoint.py) that ``resume=True`` continues from. Client faults (dropout,
deadline, attack simulation) come from faults.py; a round with too few clients left is retried
or skipped (``fed.on_too_few``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import checkpoint, engine, faults, frameworks
from .compute import ComputeMeter, ComputeStats, paused
from .config import RunConfig
from .context import Context, build_context
from .errors import MessageError
from .messages import DOWN, UP, Message, Wire, client_name
from .models import num_params
from .rundir import RunDir, summarize
from .train import evaluate


class Link:
    """A client's handle on the server for per-batch requests (split learning).

    ``call`` sends through the wire, pauses the client's meter while the server works (that
    work is metered as the server's), and returns the server's reply as received over the wire."""

    def __init__(
        self,
        wire: Wire,
        server,
        meter: ComputeMeter | None = None,
        server_meter: ComputeMeter | None = None,
    ) -> None:
        self.wire, self.server = wire, server
        self.meter, self.server_meter = meter, server_meter

    def call(self, msg: Message) -> Message:
        msg = self.wire.transfer(msg)
        with paused(self.meter):
            if self.server_meter is None:
                reply = self.server.serve(msg)
            else:
                with self.server_meter.measure():
                    reply = self.server.serve(msg)
        return self.wire.transfer(reply)


def sample_clients(
    num_clients: int, fraction: float, min_clients: int, seed: int, rnd: int, attempt: int = 0
):
    """Seeded client sampling: ``max(min_clients, round(fraction * N))`` distinct ids, sorted.
    A retried round (``attempt > 0``, see ``fed.on_too_few``) draws a fresh sample."""
    k = min(num_clients, max(min_clients, int(round(fraction * num_clients))))
    if k == num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, rnd, 7919] + ([attempt] if attempt else []))
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


@dataclass
class RoundResult:
    """What one attempt at a round produced. ``completed`` is False when too few clients were
    left to aggregate (the server's round was abandoned and its global state is unchanged)."""

    sampled: list[int]
    metrics: dict
    client_stats: dict[int, ComputeStats]
    server_stats: ComputeStats
    lost: dict[int, str] = field(default_factory=dict)  # cid -> dropout | deadline | unreadable
    completed: bool = True


def run_round(
    ctx: Context, server, clients: dict, wire: Wire, rnd: int, sampled: list[int], attempt: int = 0
) -> RoundResult:
    """One attempt at a communication round, with the configured client faults (faults.py).

    A client that drops out gets the round's first message and never answers; a client over
    the deadline has its reply discarded; a reply that fails to decode is discarded. The server
    knows a lost client is gone and sends it nothing more this round. When fewer than
    ``fed.min_clients`` clients are left after an exchange, the round is abandoned."""
    cfg, fed = ctx.cfg, ctx.cfg.fed
    meters = {cid: ComputeMeter(ctx.device, cfg.flops, ctx.flop_cache) for cid in sampled}
    server_meter = ComputeMeter(ctx.device, cfg.flops, ctx.flop_cache)
    dropping = {c for c in sampled if faults.drops_out(fed.dropout, cfg.seed, rnd, c, attempt)}
    lost: dict[int, str] = {}
    gen = server.round(rnd, sampled)
    with server_meter.measure():
        outgoing = next(gen)
    fw = frameworks.get(cfg.fed.framework)
    while True:
        replies: dict[int, Message] = {}
        received = {cid: wire.transfer(m) for cid, m in outgoing.items() if cid not in lost}
        for cid in sorted(received.keys() & dropping):
            lost[cid] = "dropout"  # it got the message and never answers
        todo = {cid: m for cid, m in received.items() if cid not in lost}
        if many := engine.batched_handler(ctx, fw, todo):  # fed.engine=batched
            answers = engine.handle_all(ctx, many, clients, todo, meters)
        else:
            answers = {}
            for cid, msg in todo.items():
                link = Link(wire, server, meters[cid], server_meter)
                with meters[cid].measure():
                    answers[cid] = clients[cid].handle(msg, link)
        for cid, reply in answers.items():
            if reply is None:
                continue
            if faults.misses_deadline(meters[cid].stats.seconds, cid, fed):
                lost[cid] = "deadline"
                continue
            if cid in fed.poison_clients:  # attack simulation, off by default
                reply = faults.poison(reply, todo[cid], fed.poison_scale)
            try:
                replies[cid] = wire.transfer(reply)
            except MessageError as e:
                lost[cid] = f"unreadable reply: {e}"
        if faults.too_few(len(sampled) - len(lost), fed.min_clients):
            gen.close()
            stats = {cid: m.stats for cid, m in meters.items()}
            return RoundResult(sampled, {}, stats, server_meter.stats, lost, completed=False)
        try:
            with server_meter.measure():
                outgoing = gen.send(replies)
        except StopIteration as stop:
            metrics = stop.value or {}
            break
    stats = {cid: m.stats for cid, m in meters.items()}
    return RoundResult(sampled, metrics, stats, server_meter.stats, lost)


def run_round_with_retries(ctx: Context, server, clients: dict, wire: Wire, rnd: int, log):
    """Run round ``rnd``; when too few clients are left, retry it with a fresh sample (up to
    ``fed.max_retries`` times) or skip it, per ``fed.on_too_few``. Returns the last
    :class:`RoundResult` and the number of attempts."""
    cfg, fed = ctx.cfg, ctx.cfg.fed
    attempts = 1 + (fed.max_retries if fed.on_too_few == "retry" else 0)
    for attempt in range(attempts):
        sampled = sample_clients(len(clients), fed.fraction_fit, fed.min_clients, cfg.seed, rnd,
                                 attempt)  # fmt: skip
        result = run_round(ctx, server, clients, wire, rnd, sampled, attempt)
        if result.completed:
            break
        left = len(sampled) - len(result.lost)
        action = "retrying" if attempt + 1 < attempts else "skipping the round"
        if log is not None:
            log(f"round {rnd}: only {left} of {len(sampled)} clients left (lost: "
                f"{dict(sorted(result.lost.items()))}), fewer than fed.min_clients="
                f"{fed.min_clients}; {action}")  # fmt: skip
    return result, attempt + 1


def simulate(
    cfg: RunConfig,
    out: str | Path | None = None,
    *,
    ctx: Context | None = None,
    log=print,
    resume: bool = False,
) -> dict:
    """Run ``cfg`` in-process and return the summary dict (also written to ``out``).

    ``ctx`` lets a caller reuse a prepared context (custom data or model). ``resume=True``
    continues the unfinished run in ``out`` from its last checkpoint (see checkpoint.py)."""
    t_start = time.perf_counter()
    fw = frameworks.get(cfg.fed.framework)
    if out is not None:  # refuse to mix with a finished run before the slow model load
        RunDir.check_resumable(out) if resume else RunDir.check(out)
    ctx = ctx or build_context(cfg)
    rundir = None  # created only once the inputs are valid
    if out is not None:
        rundir = RunDir(Path(out)) if resume else RunDir.create(out, cfg)
    server = fw.Server(ctx)
    clients = {cid: fw.Client(ctx, cid) for cid in range(len(ctx.data.client_idx))}
    wire = Wire(max_bytes=cfg.fed.max_message_bytes)
    history: list[dict] = []
    done = 0  # rounds already run (by the run being resumed)
    if resume and rundir is not None:
        state = checkpoint.load(rundir.path)
        if state is not None:
            done, history = checkpoint.restore(state, cfg, server, clients, wire.ledger)
        rundir.rewrite_metrics(history)  # drop lines of rounds after the checkpoint
        if log is not None:
            log(f"resuming {out} after round {done} of {cfg.fed.rounds}")
    load_seconds = time.perf_counter() - t_start
    bar = tqdm(range(done + 1, cfg.fed.rounds + 1), desc=fw.NAME, unit="round",
               disable=not ctx.progress, initial=done, total=cfg.fed.rounds)  # fmt: skip
    for rnd in bar:
        t0 = time.perf_counter()
        result, attempts = run_round_with_retries(ctx, server, clients, wire, rnd, log)
        record = round_record(rnd, result, wire)
        record["attempts"] = attempts
        record["round_seconds"] = time.perf_counter() - t0
        if rnd % cfg.fed.eval_every == 0 or rnd == cfg.fed.rounds:
            record.update(evaluate_global(ctx, server))
            if hasattr(fw, "extra_eval"):
                record.update(fw.extra_eval(ctx, server, clients))
        history.append(record)
        if rundir is not None:
            rundir.append_metrics(record)
            every = cfg.fed.checkpoint_every
            if every and (rnd % every == 0 or rnd == cfg.fed.rounds):
                state = checkpoint.capture(rnd, cfg, server, clients, wire.ledger, history)
                checkpoint.save(rundir.path, state)
        line = format_round(record, cfg.fed.rounds)
        if ctx.progress:
            bar.write(line)
        elif log is not None:
            log(line)
    summary = summarize(cfg, ctx, history, wire.ledger, params_exchanged(server))
    summary["load_seconds"] = load_seconds
    summary["wall_seconds"] = time.perf_counter() - t_start
    if rundir is not None:
        rundir.finish(summary, ctx.model, server.eval_state())
    return summary


def evaluate_global(ctx: Context, server) -> dict:
    """Test metrics of the server's global state (every runtime's evaluation rounds)."""
    t0, cfg, d = time.perf_counter(), ctx.cfg, ctx.data
    ev = evaluate(ctx.model, server.eval_state(), d.test, cfg.train.eval_batch_size, d.pad_id,
                  ctx.device, cfg.train.autocast)  # fmt: skip
    return {"accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"], "test_loss": ev["loss"],
            "eval_seconds": time.perf_counter() - t0}  # fmt: skip


def params_exchanged(server) -> int:
    """Trainable parameters that crossed the wire, for ``summary.json`` (frameworks/__init__)."""
    if hasattr(server, "params_exchanged"):
        return server.params_exchanged()
    return num_params(server.eval_state())


def round_record(rnd: int, result: RoundResult, wire: Wire) -> dict:
    """The ``metrics.jsonl`` line of one round. Bytes and compute are means over the sampled
    clients that did not drop out (the dropped ones' unanswered downloads still count in the
    ledger's totals); ``dropped`` / ``late`` / ``rejected`` name the clients lost to faults."""
    totals = wire.ledger.round_totals(rnd)
    dropped = sorted(c for c, why in result.lost.items() if why == "dropout")
    active = [c for c in result.sampled if c not in dropped] or result.sampled
    per_client = {}
    for cid in active:
        t = totals.get(client_name(cid), {})
        s = result.client_stats[cid]
        per_client[str(cid)] = {
            "bytes_up": sum(t.get(UP, {}).values()),
            "bytes_down": sum(t.get(DOWN, {}).values()),
            "flops": s.flops,
            "seconds": s.seconds,
            "peak_memory_bytes": s.peak_memory_bytes,
        }
    by_kind: dict[str, dict[str, float]] = {UP: {}, DOWN: {}}
    for cid in active:
        for direction, kinds in totals.get(client_name(cid), {}).items():
            for kind, n in kinds.items():
                by_kind[direction][kind] = by_kind[direction].get(kind, 0) + n / len(active)
    metrics = dict(result.metrics)
    rejected = dict(metrics.pop("rejected_reasons", {}))  # by the server's validation
    rejected.update({str(c): why for c, why in result.lost.items() if why.startswith("unread")})
    metrics.pop("rejected", None)

    def mean(key):
        return float(np.mean([c[key] for c in per_client.values()]))

    return {
        "round": rnd,
        "clients": result.sampled,
        **metrics,
        "skipped": not result.completed,
        "dropped": dropped,
        "late": sorted(c for c, why in result.lost.items() if why == "deadline"),
        "rejected": len(rejected),
        "rejected_reasons": rejected,
        "bytes_up_per_client": mean("bytes_up"),
        "bytes_down_per_client": mean("bytes_down"),
        "bytes_by_kind": by_kind,
        "client_flops": mean("flops"),
        "client_seconds": mean("seconds"),
        "client_peak_memory_bytes": max(c["peak_memory_bytes"] for c in per_client.values()),
        "server_flops": result.server_stats.flops,
        "server_seconds": result.server_stats.seconds,
        "per_client": per_client,
    }


def format_round(r: dict, rounds: int) -> str:
    acc = f"acc {r['accuracy']:.4f} f1 {r['macro_f1']:.4f} | " if "accuracy" in r else ""
    loss = f"loss {r['train_loss']:.4f} | " if "train_loss" in r else ""
    faults_ = [f"{k} {len(r[k]) if isinstance(r[k], list) else r[k]}"
               for k in ("dropped", "late", "rejected") if r.get(k)]  # fmt: skip
    skipped = "SKIPPED | " if r.get("skipped") else ""
    return (
        f"round {r['round']}/{rounds} | {skipped}{acc}{loss}"
        f"up {r['bytes_up_per_client'] / 1e6:.3f} MB down {r['bytes_down_per_client'] / 1e6:.3f} MB"
        f" | client {r['client_flops'] / 1e12:.3f} TFLOP {r['client_seconds']:.1f} s"
        f" | {r['round_seconds']:.1f} s" + (f" | {' '.join(faults_)}" if faults_ else "")
    )
