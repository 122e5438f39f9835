"""What a round produces and how it is written: the sampled clients, the ``metrics.jsonl``
line of a round, its console line, and the evaluation of the global state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .. import seeds
from ..compute import ComputeMeter, ComputeStats
from ..context import ServerContext
from ..execution.train import evaluate
from ..messages import DOWN, UP, Ledger, client_name


def sample_clients(
    num_clients: int, fraction: float, min_clients: int, seed: int, rnd: int, attempt: int = 0
):
    """Seeded client sampling: ``max(min_clients, round(fraction * N))`` distinct ids, sorted.
    A retried round (``attempt > 0``, see ``fed.on_too_few``) draws a fresh sample."""
    k = min(num_clients, max(min_clients, int(round(fraction * num_clients))))
    if k == num_clients:
        return list(range(num_clients))
    rng = seeds.rng((seed, rnd, seeds.SAMPLING) + ((attempt,) if attempt else ()))
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


@dataclass
class RoundState:
    """One attempt at a round while it runs: who was sampled, who drops out (fault
    simulation), each party's compute meter, and the clients lost so far with the reason
    (``dropout``, ``deadline``, ``unreadable reply: ...``). The loop creates it; the transport
    fills in the meters and the losses."""

    rnd: int
    attempt: int
    sampled: list[int]
    dropping: set[int]
    meters: dict[int, ComputeMeter]
    server_meter: ComputeMeter
    lost: dict[int, str] = field(default_factory=dict)


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


def evaluate_global(ctx: ServerContext, server) -> dict:
    """Test metrics of the server's global state (every runtime's evaluation rounds)."""
    t0 = time.perf_counter()
    ev = evaluate(ctx, server.eval_state(), ctx.data.test)  # the task's metrics
    metrics = {k: v for k, v in ev.items() if k != "loss"}  # classification: accuracy, F1
    return {**metrics, "test_loss": ev["loss"], "eval_seconds": time.perf_counter() - t0}


def round_record(rnd: int, result: RoundResult, ledger: Ledger) -> dict:
    """The ``metrics.jsonl`` line of one round. Bytes and compute are means over the sampled
    clients that did not drop out (the dropped ones' unanswered downloads still count in the
    ledger's totals); ``dropped`` / ``late`` / ``rejected`` name the clients lost to faults."""
    totals = ledger.round_totals(rnd)
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
    faults_ = [
        f"{k} {len(r[k]) if isinstance(r[k], list) else r[k]}"
        for k in ("dropped", "late", "rejected")
        if r.get(k)
    ]
    skipped = "SKIPPED | " if r.get("skipped") else ""
    return (
        f"round {r['round']}/{rounds} | {skipped}{acc}{loss}"
        f"up {r['bytes_up_per_client'] / 1e6:.3f} MB down {r['bytes_down_per_client'] / 1e6:.3f} MB"
        f" | client {r['client_flops'] / 1e12:.3f} TFLOP {r['client_seconds']:.1f} s"
        f" | {r['round_seconds']:.1f} s" + (f" | {' '.join(faults_)}" if faults_ else "")
    )
