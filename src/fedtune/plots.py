"""PNG plots of finished runs (matplotlib, Agg backend): the comparison's figures.

Imported lazily by the commands that draw (``compare``, ``reproduce``, ``plot``), so the rest of
fedtune never needs matplotlib. Every figure is built from :mod:`fedtune.report`'s groups, so
the plots and the report's tables always show the same aggregates.

* ``accuracy_vs_round.png`` - test accuracy per round, one line per framework and setting;
* ``accuracy_vs_bytes.png`` - the same accuracy against cumulative bytes per client (log x);
* ``comm_vs_compute.png`` - bytes per client per round (log) against client compute per round,
  one point per framework and setting (the paper's Fig. 4);
* ``accuracy_vs_setting.png`` - final accuracy under each framework's varied factor, mean ± std
  over seeds (the paper's Fig. 3), drawn when some framework was run with several settings.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .report import (  # noqa: E402
    HEADLINE,
    PER_ROUND,
    Group,
    Run,
    aggregate,
    curve,
    framework_order,
    group_runs,
    title,
)

COLORS = {"fedllm": "tab:blue", "kd": "tab:orange", "split": "tab:green"}
MARKERS = ("o", "s", "^", "D", "v", "P")
LINESTYLES = ("-", "--", ":", "-.")


def _style(groups: list[Group]) -> dict[int, dict]:
    """Colour by framework; marker and line style by the setting's position in its framework."""
    styles, seen = {}, {}
    for i, g in enumerate(groups):
        k = seen[g.framework] = seen.get(g.framework, -1) + 1
        styles[i] = {
            "color": COLORS.get(g.framework, f"C{3 + len(seen)}"),
            "marker": MARKERS[k % len(MARKERS)],
            "linestyle": LINESTYLES[k % len(LINESTYLES)],
        }
    return styles


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def _legend(ax, n: int) -> None:
    ax.legend(fontsize="small" if n <= 6 else "x-small", loc="best", framealpha=0.85)


def accuracy_curves(groups: list[Group], out: Path, x: str) -> str:
    """The per-round quality (accuracy; generation: held-out perplexity) against the round
    (``x="round"``) or the cumulative bytes per client (``"bytes"``)."""
    metric, label = PER_ROUND.get(groups[0].runs[0].task, PER_ROUND["classification"])
    styles = _style(groups)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, g in enumerate(groups):
        c = curve(g)
        xs = c["round"] if x == "round" else c["cum_bytes"]
        every = max(1, len(xs) // 10)  # 100 rounds: a marker every 10th point, not a smear
        ax.plot(xs, c["value"], label=g.label, markersize=4, markevery=every, **styles[i])
        if len(g.runs) > 1 and len(groups) <= 3:  # the spread over seeds; more bands blur
            lo, hi = c["value"] - c["value_std"], c["value"] + c["value_std"]
            ax.fill_between(xs, lo, hi, color=styles[i]["color"], alpha=0.12, linewidth=0)
    if x == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.set_xlabel("round")
        ax.set_title(f"{label.capitalize()} per round")
        name = f"{metric}_vs_round.png"
    else:
        ax.set_xscale("symlog" if metric == "perplexity" else "log")  # round 0 sent 0 bytes
        ax.set_xlabel("cumulative bytes per client, up + down (log)")
        ax.set_title(f"{label.capitalize()} against communication")
        name = f"{metric}_vs_bytes.png"
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3, which="both")
    _legend(ax, len(groups))
    return _save(fig, out / name)


def comm_vs_compute(groups: list[Group], out: Path) -> str:
    """The paper's Fig. 4: communication (log) against client computation, per round."""
    rows = [aggregate(g) for g in groups]
    use_flops = any(r["client_flops"] > 0 for r in rows)
    styles = _style(groups)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(rows):
        xv = r["client_flops"] if use_flops else r["client_seconds"]
        st = styles[i]
        ax.scatter(
            [xv],
            [r["bytes_total"]],
            color=st["color"],
            marker=st["marker"],
            s=60,
            label=r["label"],
            zorder=3,
        )
        if r["setting"]:  # the value beside the point: several settings share a colour
            text = ", ".join(str(v) for _, v in r["setting"])
            ax.annotate(
                text,
                (xv, r["bytes_total"]),
                xytext=(6, 4),
                textcoords="offset points",
                fontsize="small",
                color=st["color"],
            )
    ax.set_yscale("log")
    if use_flops and all(r["client_flops"] > 0 for r in rows):
        ax.set_xscale("log")
    ax.set_xlabel("client FLOPs per round" if use_flops else "client seconds per round")
    ax.set_ylabel("bytes per client per round, up + down (log)")
    ax.set_title("Communication against client computation (Fig. 4)")
    ax.grid(True, alpha=0.3, which="both")
    ax.margins(0.15)  # room around the extreme points
    _legend(ax, len(groups))
    return _save(fig, out / "comm_vs_compute.png")


def accuracy_vs_setting(groups: list[Group], out: Path) -> str:
    """The paper's Fig. 3: final accuracy (mean ± std over seeds) under each framework's varied
    factor, one panel per framework."""
    frameworks = [f for f in dict.fromkeys(g.framework for g in groups)]
    frameworks.sort(key=framework_order)
    fig, axes = plt.subplots(
        1, len(frameworks), figsize=(3.6 * len(frameworks), 3.8), sharey=True, squeeze=False
    )
    for ax, fw in zip(axes[0], frameworks, strict=True):
        rows = [aggregate(g) for g in groups if g.framework == fw]
        keys = [k for k, _ in rows[0]["setting"]]
        ticks = [", ".join(str(v) for _, v in r["setting"]) or "default" for r in rows]
        xs = np.arange(len(rows))
        ax.errorbar(
            xs,
            [r["accuracy_mean"] for r in rows],
            yerr=[r["accuracy_std"] for r in rows],
            color=COLORS.get(fw, "k"),
            marker="o",
            capsize=4,
        )
        ax.set_xticks(xs, ticks)
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_xlabel(", ".join(keys) or "setting")
        ax.set_title(title(fw))
        ax.grid(True, alpha=0.3)
    headline = HEADLINE.get(groups[0].runs[0].task, HEADLINE["classification"])[1]
    axes[0][0].set_ylabel(f"final test {headline}")
    fig.suptitle("Accuracy under the varied factor (Fig. 3)")
    return _save(fig, out / "accuracy_vs_setting.png")


def write_plots(runs: list[Run], out: str | Path) -> list[str]:
    """Draw every figure for ``runs`` into ``out``; returns the file names written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    if not groups:
        return []
    names = [
        accuracy_curves(groups, out, "round"),
        accuracy_curves(groups, out, "bytes"),
        comm_vs_compute(groups, out),
    ]
    if any(g.setting for g in groups):
        names.append(accuracy_vs_setting(groups, out))
    return names
