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
from ..generate import eval_prompts, generate, score
from ..messages import DOWN, UP, Ledger, client_name


def sample_size(num_clients: int, fraction: float, min_clients: int) -> int:
    """How many clients a round samples: ``max(min_clients, round(fraction * N))``, at most N."""
    return min(num_clients, max(min_clients, int(round(fraction * num_clients))))


def sample_clients(
    num_clients: int, fraction: float, min_clients: int, seed: int, rnd: int, attempt: int = 0
):
    """Seeded client sampling: ``max(min_clients, round(fraction * N))`` distinct ids, sorted.
    A retried round (``attempt > 0``, see ``fed.on_too_few``) draws a fresh sample."""
    k = sample_size(num_clients, fraction, min_clients)
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
    exchange: int = 0  # exchanges of this attempt so far (the loop counts them)

    def dropping_now(self, at: int) -> set[int]:
        """The dropping clients that are silent in the current exchange (from the ``at``-th
        on: ``fed.dropout_exchange``)."""
        return self.dropping if self.exchange >= at else set()


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


def evaluate_global(ctx: ServerContext, server, rnd: int = -1) -> dict:
    """Test metrics of the server's global state (every runtime's evaluation rounds);
    generation tasks also generate and score at round ``rnd`` 0, the last round and every
    ``eval.generate_every`` rounds (:func:`generation_metrics`)."""
    t0 = time.perf_counter()
    state = server.eval_state()
    ev = evaluate(ctx, state, ctx.data.test)  # the task's metrics
    metrics = {k: v for k, v in ev.items() if k != "loss"}  # accuracy, F1; perplexity
    every = ctx.cfg.eval.generate_every
    if rnd in (0, ctx.cfg.fed.rounds) or (every and rnd > 0 and rnd % every == 0):
        metrics.update(generation_metrics(ctx, state))
    return {**metrics, "test_loss": ev["loss"], "eval_seconds": time.perf_counter() - t0}


def generation_metrics(ctx: ServerContext, state: dict) -> dict:
    """BLEU, chrF, ROUGE-L and exact match of greedy generations for the seeded
    ``eval.generate_samples`` test prompts (nothing for tasks without them), and the first
    prompt's generation (``sample``: a sentence to read by round)."""
    gen, e = ctx.data.generate, ctx.cfg.eval
    if gen is None or len(gen) == 0:
        return {}
    idx = eval_prompts(e.generate_samples, len(gen))
    prompts = [gen.prompts[i] for i in idx]
    hyps = generate(
        ctx.model, ctx.tokenizer, prompts, e.max_new_tokens, e.generate_batch_size, state
    )
    return {**score(hyps, [gen.refs[i] for i in idx]), "sample": hyps[0]}


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
    faulty = {c: why for c, why in result.lost.items() if why not in ("dropout", "deadline")}
    rejected.update({str(c): why for c, why in faulty.items()})  # unreadable, refused
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


def initial_record(ctx: ServerContext, server) -> dict:
    """Round 0: the base model's test metrics (generation tasks, ``eval.at_start``), so the
    gain of training is visible; nothing was exchanged or computed by a client."""
    zero = {"bytes_up_per_client": 0.0, "bytes_down_per_client": 0.0, "client_flops": 0}
    return {
        "round": 0,
        **zero,
        "bytes_by_kind": {UP: {}, DOWN: {}},
        "client_seconds": 0.0,
        "client_peak_memory_bytes": 0,
        "round_seconds": 0.0,
        **evaluate_global(ctx, server, 0),
    }


def format_round(r: dict, rounds: int) -> str:
    q = quality(r)
    if r["round"] == 0:
        return f"round 0/{rounds} | {q}"
    acc = q + " | " if q else ""
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


def quality(r: dict) -> str:
    """The task metrics of a record, for its console line ('' when it was not evaluated)."""
    parts = []
    if "accuracy" in r:
        parts.append(f"acc {r['accuracy']:.4f} f1 {r['macro_f1']:.4f}")
    if "perplexity" in r:
        parts.append(f"ppl {r['perplexity']:.3f}")
    if "bleu" in r:
        parts.append(f"bleu {r['bleu']:.1f} rougeL {r['rouge_l']:.1f} em {r['exact_match']:.1f}")
    return " ".join(parts)
