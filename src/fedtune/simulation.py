"""In-process simulation runtime: the server and every client in one process, one shared model.

Read :func:`simulate` top to bottom: each round samples clients, drives the framework's server
generator, moves every message through the counting :class:`~fedtune.messages.Wire`, meters each
client's compute, evaluates the global state and appends one line to ``metrics.jsonl``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import engine, frameworks
from .compute import ComputeMeter, ComputeStats, paused
from .config import RunConfig
from .context import Context, build_context
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


def sample_clients(num_clients: int, fraction: float, min_clients: int, seed: int, rnd: int):
    """Seeded client sampling: ``max(min_clients, round(fraction * N))`` distinct ids, sorted."""
    k = min(num_clients, max(min_clients, int(round(fraction * num_clients))))
    if k == num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, rnd, 7919])
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


def run_round(ctx: Context, server, clients: dict, wire: Wire, rnd: int, sampled: list[int]):
    """One communication round. Returns ``(server_metrics, client_stats, server_stats)``."""
    cfg = ctx.cfg
    meters = {cid: ComputeMeter(ctx.device, cfg.flops, ctx.flop_cache) for cid in sampled}
    server_meter = ComputeMeter(ctx.device, cfg.flops, ctx.flop_cache)
    gen = server.round(rnd, sampled)
    with server_meter.measure():
        outgoing = next(gen)
    fw = frameworks.get(cfg.fed.framework)
    while True:
        replies: dict[int, Message] = {}
        if many := engine.batched_handler(ctx, fw, outgoing):  # fed.engine=batched
            replies = engine.deliver(ctx, many, clients, outgoing, wire, meters)
            outgoing = {}
        for cid, msg in outgoing.items():
            received = wire.transfer(msg)
            link = Link(wire, server, meters[cid], server_meter)
            with meters[cid].measure():
                reply = clients[cid].handle(received, link)
            if reply is not None:
                replies[cid] = wire.transfer(reply)
        try:
            with server_meter.measure():
                outgoing = gen.send(replies)
        except StopIteration as stop:
            metrics = stop.value or {}
            break
    return metrics, {cid: m.stats for cid, m in meters.items()}, server_meter.stats


def simulate(
    cfg: RunConfig,
    out: str | Path | None = None,
    *,
    ctx: Context | None = None,
    log=print,
) -> dict:
    """Run ``cfg`` in-process and return the summary dict (also written to ``out``).

    ``ctx`` lets a caller reuse a prepared context (custom data or model)."""
    t_start = time.perf_counter()
    fw = frameworks.get(cfg.fed.framework)
    if out is not None:
        RunDir.check(out)  # refuse to mix with a finished run before the slow model load
    ctx = ctx or build_context(cfg)
    rundir = RunDir.create(out, cfg) if out is not None else None  # only once inputs are valid
    server = fw.Server(ctx)
    clients = {cid: fw.Client(ctx, cid) for cid in range(len(ctx.data.client_idx))}
    wire = Wire()
    history: list[dict] = []
    load_seconds = time.perf_counter() - t_start
    bar = tqdm(range(1, cfg.fed.rounds + 1), desc=fw.NAME, unit="round", disable=not ctx.progress)
    for rnd in bar:
        t0 = time.perf_counter()
        sampled = sample_clients(
            len(clients), cfg.fed.fraction_fit, cfg.fed.min_clients, cfg.seed, rnd
        )
        metrics, client_stats, server_stats = run_round(ctx, server, clients, wire, rnd, sampled)
        record = round_record(rnd, sampled, metrics, client_stats, server_stats, wire)
        record["round_seconds"] = time.perf_counter() - t0
        if rnd % cfg.fed.eval_every == 0 or rnd == cfg.fed.rounds:
            t1 = time.perf_counter()
            d = ctx.data
            ev = evaluate(ctx.model, server.eval_state(), d.test, cfg.train.eval_batch_size,
                          d.pad_id, ctx.device, cfg.train.autocast)  # fmt: skip
            record.update({"accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"],
                           "test_loss": ev["loss"], "eval_seconds": time.perf_counter() - t1})  # fmt: skip
            if hasattr(fw, "extra_eval"):
                record.update(fw.extra_eval(ctx, server, clients))
        history.append(record)
        if rundir is not None:
            rundir.append_metrics(record)
        line = format_round(record, cfg.fed.rounds)
        if ctx.progress:
            bar.write(line)
        elif log is not None:
            log(line)
    exchanged = (
        server.params_exchanged()
        if hasattr(server, "params_exchanged")
        else num_params(server.eval_state())
    )
    summary = summarize(cfg, ctx, history, wire.ledger, exchanged)
    summary["load_seconds"] = load_seconds
    summary["wall_seconds"] = time.perf_counter() - t_start
    if rundir is not None:
        rundir.finish(summary, ctx.model, server.eval_state())
    return summary


def round_record(rnd, sampled, metrics, client_stats: dict[int, ComputeStats], server_stats, wire):
    """The ``metrics.jsonl`` line of one round (bytes and compute are per-client means)."""
    totals = wire.ledger.round_totals(rnd)
    per_client = {}
    for cid in sampled:
        t = totals.get(client_name(cid), {})
        s = client_stats[cid]
        per_client[str(cid)] = {
            "bytes_up": sum(t.get(UP, {}).values()),
            "bytes_down": sum(t.get(DOWN, {}).values()),
            "flops": s.flops,
            "seconds": s.seconds,
            "peak_memory_bytes": s.peak_memory_bytes,
        }
    by_kind: dict[str, dict[str, float]] = {UP: {}, DOWN: {}}
    for cid in sampled:
        for direction, kinds in totals.get(client_name(cid), {}).items():
            for kind, n in kinds.items():
                by_kind[direction][kind] = by_kind[direction].get(kind, 0) + n / len(sampled)

    def mean(key):
        return float(np.mean([c[key] for c in per_client.values()]))

    return {
        "round": rnd,
        "clients": sampled,
        **{k: v for k, v in metrics.items()},
        "bytes_up_per_client": mean("bytes_up"),
        "bytes_down_per_client": mean("bytes_down"),
        "bytes_by_kind": by_kind,
        "client_flops": mean("flops"),
        "client_seconds": mean("seconds"),
        "client_peak_memory_bytes": max(c["peak_memory_bytes"] for c in per_client.values()),
        "server_flops": server_stats.flops,
        "server_seconds": server_stats.seconds,
        "per_client": per_client,
    }


def format_round(r: dict, rounds: int) -> str:
    acc = f"acc {r['accuracy']:.4f} f1 {r['macro_f1']:.4f} | " if "accuracy" in r else ""
    loss = f"loss {r['train_loss']:.4f} | " if "train_loss" in r else ""
    return (
        f"round {r['round']}/{rounds} | {acc}{loss}"
        f"up {r['bytes_up_per_client'] / 1e6:.3f} MB down {r['bytes_down_per_client'] / 1e6:.3f} MB"
        f" | client {r['client_flops'] / 1e12:.3f} TFLOP {r['client_seconds']:.1f} s"
        f" | {r['round_seconds']:.1f} s"
    )
