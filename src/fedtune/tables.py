"""The report's tables: number formatting and the per-task results tables."""

from __future__ import annotations

import numpy as np


def fmt_si(x: float, unit: str = "") -> str:
    """``2.78 MB``, ``31.9 TFLOP``: three significant digits, decimal prefixes."""
    if x is None or not np.isfinite(x):
        return "n/a"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".strip()


def fmt_acc(mean: float, std: float, n: int = 2, digits: int = 4) -> str:
    """``0.8200 ± 0.0283``; a single seed has no spread to show."""
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def results_table(rows: list[dict]) -> list[str]:
    """One table per task: classification rows, then generation rows."""
    cls = [r for r in rows if r.get("task", "classification") != "generation"]
    gen = [r for r in rows if r.get("task") == "generation"]
    return [
        *(class_table(cls) if cls else []),
        *([""] if cls and gen else []),
        *(generation_table(gen) if gen else []),
    ]


COST_COLUMNS = (
    "bytes up / client / round",
    "bytes down / client / round",
    "client FLOPs / round",
    "client s / round",
    "client peak memory",
)


def _table(columns: tuple[str, ...], rows: list[dict], quality) -> list[str]:
    """A results table: framework, seeds, the task's ``columns`` (``quality(row)`` gives their
    cells) and the measured costs."""
    private = any(r.get("privacy") for r in rows)  # a column only when a run used DP
    names = ("framework", "seeds", *columns, *COST_COLUMNS, *(("epsilon",) if private else ()))
    lines = ["| " + " | ".join(names) + " |", "|" + " --- |" * len(names)]
    for r in rows:
        cells = (
            r["label"],
            ",".join(str(s) for s in r["seeds"]),
            *quality(r),
            fmt_si(r["bytes_up"], "B"),
            fmt_si(r["bytes_down"], "B"),
            fmt_si(r["client_flops"], "FLOP"),
            f"{r['client_seconds']:.3g}",
            fmt_si(r["client_peak_memory"], "B"),
            *((r.get("privacy") or "-",) if private else ()),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def generation_table(rows: list[dict]) -> list[str]:
    columns = ("final BLEU", "ROUGE-L", "chrF", "exact match", "perplexity")
    return _table(
        columns,
        rows,
        lambda r: (
            fmt_acc(r["accuracy_mean"], r["accuracy_std"], len(r["seeds"]), 1),
            f"{r['rouge_l_mean']:.1f}",
            f"{r['chrf_mean']:.1f}",
            f"{r['exact_match_mean']:.1f}",
            f"{r['perplexity_mean']:.3f}",
        ),
    )


def class_table(rows: list[dict]) -> list[str]:
    return _table(
        ("final accuracy (mean ± std)", "macro-F1"),
        rows,
        lambda r: (
            fmt_acc(r["accuracy_mean"], r["accuracy_std"], len(r["seeds"])),
            f"{r['macro_f1_mean']:.4f}",
        ),
    )
