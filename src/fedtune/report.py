"""Reads finished run directories, aggregates them over seeds and writes ``report.md``.

Pure data in, markdown out: no matplotlib here (plots live in :mod:`fedtune.plots`), so the
report can be built and tested anywhere. The pipeline, top to bottom:

1. :func:`find_runs` / :func:`load_run`: a run directory is ``config.toml`` + ``metrics.jsonl``
   + ``summary.json`` (see :mod:`fedtune.runtime.rundir`); only finished runs (with a summary) count.
2. :func:`group_runs`: runs of one framework that differ only in their seed form one group; the
   config keys that differ *between* a framework's groups are its "setting" (the varied factor
   of a sweep, e.g. ``model.lora_r``), found from the configs rather than declared anywhere.
3. :func:`aggregate` / :func:`curve`: per group, means (and the std of accuracy) over seeds.
4. :func:`build_report`: the markdown, with the paper's Table I rebuilt from the measured
   numbers (:mod:`fedtune.paper`).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .tables import fmt_acc, fmt_si, results_table  # noqa: F401 - fmt_* used by paper, plots

# Keys that never define a setting: the seed is what a group averages over; the rest is cosmetic.
IGNORED_KEYS = {"seed", "name", "progress"}

# Per task: the headline quality of a run (its final value; higher is better) and the metric
# drawn per round (measured at every evaluation round, round 0 included for generation).
HEADLINE = {"classification": ("accuracy", "accuracy"), "generation": ("bleu", "BLEU")}
PER_ROUND = {
    "classification": ("accuracy", "test accuracy"),
    "generation": ("perplexity", "held-out perplexity"),
}


def title(framework: str) -> str:
    """A framework's display name from the registry (``kd`` -> ``KD-FedLLM``)."""
    from . import frameworks

    return frameworks.titles().get(framework, framework)


def framework_order(framework: str) -> tuple:
    """Sort key: registered frameworks in registration order, then others by name."""
    from . import frameworks

    names = frameworks.names()
    return (names.index(framework) if framework in names else len(names), framework)


@dataclass
class Run:
    """One finished run directory: flattened config, summary and per-round metrics."""

    path: Path
    config: dict  # dotted keys: {"model.lora_r": 8, "fed.framework": "fedllm", ...}
    summary: dict
    metrics: list[dict]

    @property
    def framework(self) -> str:
        return self.summary.get("framework") or self.config.get("fed.framework", "?")

    @property
    def seed(self) -> int:
        return self.summary.get("seed", self.config.get("seed", 0))

    @property
    def task(self) -> str:
        return self.summary.get("task") or self.config.get("data.task", "classification")


@dataclass
class Group:
    """The runs of one framework and setting (they differ only in their seed)."""

    framework: str
    setting: tuple[tuple[str, object], ...]  # ((dotted key, value), ...), may be empty
    runs: list[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        """``FedLLM`` or ``FedLLM lora_r=4``: the short name used in tables and legends."""
        parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.setting]
        return " ".join([title(self.framework), *parts])


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


# What the report reads of every summary and every metrics line (fedtune writes them all).
SUMMARY_KEYS = ("framework", "rounds")
METRICS_KEYS = ("round", "bytes_up_per_client", "bytes_down_per_client")


def load_run(path: str | Path) -> Run:
    """A finished run directory; a one-line ConfigError for a file that is not what fedtune
    writes (the report would otherwise be built from garbage, or fail deep inside)."""
    path = Path(path)
    cfg_file, metrics_file = path / "config.toml", path / "metrics.jsonl"
    cfg = flatten(_parse(cfg_file, tomllib.loads)) if cfg_file.exists() else {}
    summary = _parse(path / "summary.json", json.loads)
    if not isinstance(summary, dict) or any(k not in summary for k in SUMMARY_KEYS):
        needs = ", ".join(SUMMARY_KEYS)
        raise ConfigError(f"{path / 'summary.json'} is not a run summary (needs {needs})")
    metrics = []
    lines = _parse(metrics_file, str).split("\n") if metrics_file.exists() else []
    for n, line in enumerate(lines, 1):
        if line.strip():
            m = _parse(f"{metrics_file}:{n}", json.loads, line)
            if not isinstance(m, dict) or not all(
                isinstance(m.get(k), int | float) for k in METRICS_KEYS
            ):
                needs = ", ".join(METRICS_KEYS)
                raise ConfigError(f"{metrics_file}:{n}: not a round record (needs {needs})")
            metrics.append(m)
    return Run(path, cfg, summary, metrics)


def _parse(where, loads, text: str | None = None):
    """``loads`` of the text (read from the file ``where`` when not given), as UTF-8."""
    kind = "TOML" if loads is tomllib.loads else "JSON" if loads is json.loads else "UTF-8 text"
    try:
        return loads(Path(where).read_text(encoding="utf-8") if text is None else text)
    except ValueError as e:  # JSON's, TOML's and UTF-8's errors are all ValueErrors
        raise ConfigError(f"{where} is not valid {kind} ({str(e).splitlines()[0]})") from None


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Finished runs at or below ``paths`` (a run directory, or a folder holding some)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "summary.json").exists():
            found.append(p)
        else:
            found += sorted(s.parent for s in p.rglob("summary.json"))
    return [load_run(p) for p in dict.fromkeys(found)]  # dedupe, keep order


# ----------------------------------------------------------------------------- aggregation


def _sort_key(value) -> tuple:
    return (0, value, "") if isinstance(value, int | float) else (1, 0, str(value))


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups in framework order, settings sorted by value within a framework."""
    groups: list[Group] = []
    frameworks = sorted({r.framework for r in runs}, key=framework_order)
    for fw in frameworks:
        mine = [r for r in runs if r.framework == fw]
        keys = sorted(
            k
            for k in set().union(*(r.config for r in mine))
            if k not in IGNORED_KEYS and len({r.config.get(k) for r in mine}) > 1
        )
        by_setting: dict[tuple, Group] = {}
        for r in mine:
            setting = tuple((k, r.config.get(k)) for k in keys)
            by_setting.setdefault(setting, Group(fw, setting)).runs.append(r)
        for setting in sorted(by_setting, key=lambda s: [_sort_key(v) for _, v in s]):
            group = by_setting[setting]
            group.runs.sort(key=lambda r: r.seed)
            groups.append(group)
    return groups


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def _std(values) -> float:
    """Sample std over seeds (ddof=1); 0 for a single seed."""
    values = [v for v in values if v is not None]
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate(group: Group) -> dict:
    """One table row: means over the group's seeds (peak memory: the max). ``accuracy_mean``
    / ``accuracy_std`` are the task's headline quality (:data:`HEADLINE`: accuracy, or BLEU
    for generation); generation rows also carry perplexity, ROUGE-L and exact match."""
    s = [r.summary for r in group.runs]
    task = group.runs[0].task
    key = HEADLINE.get(task, HEADLINE["classification"])[0]
    finals = [x.get("final") or {} for x in s]
    acc = (
        [x.get("final_accuracy") for x in s] if key == "accuracy" else [f.get(key) for f in finals]
    )
    up = _mean(x.get("bytes_up_per_client_per_round") for x in s)
    down = _mean(x.get("bytes_down_per_client_per_round") for x in s)
    return {
        "framework": group.framework,
        "label": group.label,
        "setting": group.setting,
        "config": group.runs[0].config,  # the group's runs differ only in their seed
        "seeds": [r.seed for r in group.runs],
        "rounds": _mean(x.get("rounds") for x in s),
        "accuracy_mean": _mean(acc),
        "accuracy_std": _std(acc),
        "macro_f1_mean": _mean(x.get("final_macro_f1") for x in s),
        "bytes_up": up,
        "bytes_down": down,
        "bytes_total": up + down,
        "client_flops": _mean(x.get("client_flops_per_round") for x in s),
        "client_seconds": _mean(x.get("client_seconds_per_round") for x in s),
        "client_peak_memory": max((x.get("client_peak_memory_bytes") or 0 for x in s), default=0),
        "task": task,
        "num_labels": s[0].get("num_labels"),
        "privacy": privacy_cell(s),
        **{f"{k}_mean": _mean(f.get(k) for f in finals) for k in GENERATION_METRICS},
    }


GENERATION_METRICS = ("perplexity", "bleu", "chrf", "rouge_l", "exact_match")


def privacy_cell(summaries: list[dict]) -> str:
    """The group's privacy guarantees for the table, each the largest epsilon over seeds
    (``inf``: DP without noise): client-level at its delta, DP-SGD's per sample, Split's
    activations; "" without any."""
    labels = {"dp_epsilon": "", "sample_epsilon": "samples ", "activation_epsilon": "activations "}
    parts = []
    for key, label in labels.items():
        if any(key in x for x in summaries):
            eps = [x.get(key) for x in summaries]
            cell = label + ("inf" if None in eps else f"{max(eps):.3g}")
            if key == "dp_epsilon":
                cell += f" (delta {summaries[0]['dp_delta']:g})"
            parts.append(cell)
    return "; ".join(parts)


def curve(group: Group) -> dict[str, np.ndarray]:
    """The task's per-round metric (:data:`PER_ROUND`: accuracy, or perplexity for
    generation) per evaluated round and the cumulative bytes (up + down) per client at that
    round, both averaged over seeds on the rounds every seed evaluated: ``round``,
    ``value``, ``value_std``, ``cum_bytes``."""
    metric = PER_ROUND.get(group.runs[0].task, PER_ROUND["classification"])[0]
    per_run = []
    for r in group.runs:
        total = np.cumsum(
            [m["bytes_up_per_client"] + m["bytes_down_per_client"] for m in r.metrics]
        )
        per_run.append(
            {m["round"]: (m[metric], total[i]) for i, m in enumerate(r.metrics) if metric in m}
        )
    rounds = sorted(set.intersection(*(set(p) for p in per_run)))  # a group has >= 1 run
    acc = np.array([[p[t][0] for t in rounds] for p in per_run]).reshape(len(per_run), -1)
    cum = np.array([[p[t][1] for t in rounds] for p in per_run]).reshape(len(per_run), -1)
    return {
        "round": np.array(rounds, dtype=int),
        "value": acc.mean(0),
        "value_std": acc.std(0, ddof=1) if len(per_run) > 1 else np.zeros(len(rounds)),
        "cum_bytes": cum.mean(0),
    }


def setup_lines(runs: list[Run]) -> list[str]:
    """Model, data and scale shared by the runs (from the summaries)."""

    def values(key: str) -> str:
        vals = dict.fromkeys(json.dumps(r.summary.get(key)) for r in runs)
        return ", ".join(v.strip('"') for v in vals)

    return [
        f"- model: {values('model')}; dataset: {values('dataset')}",
        f"- clients: {values('num_clients')}, samples per client: {values('samples_per_client')}, "
        f"public set: {values('public_size')}, test samples: {values('test_size')}",
        f"- rounds: {values('rounds')}; seeds: {', '.join(str(s) for s in sorted({r.seed for r in runs}))}",
        f"- measured on: {values('machine')} ({values('device')}); FLOPs: {values('flops_mode')}; "
        f"peak memory: {values('peak_memory_method')}",
        training_line(runs),
    ]


def training_line(runs: list[Run]) -> str:
    """The choices the paper leaves open or that differ from PEFT's defaults, as run."""

    def per_fw(key: str, words: dict) -> str:
        got = {r.framework: words.get(r.config.get(key), r.config.get(key)) for r in runs}
        if len(set(got.values())) == 1:  # the same for every framework: say it once
            return str(next(iter(got.values())))
        return "; ".join(f"{fw}: {v}" for fw, v in sorted(got.items()))

    pad = {
        True: "every batch to model.max_length (the paper's)",
        False: "each batch to its longest",
    }
    opt = {
        "keep": "kept with each client across rounds",
        "reset": "fresh every round (FedAvg baselines' choice; the paper does not say)",
    }
    return (
        f"- padding: {per_fw('data.pad_to_max_length', pad)}. LoRA A init: "
        f"{per_fw('model.lora_init', {})}. Client optimizer state: "
        f"{per_fw('train.optimizer_state', opt)}"
    )


def build_report(
    runs: list[Run],
    plots: list[str] | tuple[str, ...] = (),
    title: str = "fedtune: FedLLM vs KD-FedLLM vs Split-FedLLM",
    notes: list[str] | tuple[str, ...] = (),
) -> str:
    """The markdown report. ``plots`` are image file names (relative to the report) to embed;
    ``notes`` are extra lines for the setup section."""
    from . import paper  # the paper's claims; paper.py builds on this module

    if not runs:
        return f"# {title}\n\nNo finished runs found.\n"
    groups = group_runs(runs)
    rows = [aggregate(g) for g in groups]
    lines = [f"# {title}", "", "## Setup", "", *setup_lines(runs), *[f"- {n}" for n in notes]]
    lines += [
        "",
        "## Results",
        "",
        "Per framework and setting, over seeds: the final test quality (accuracy; generation: "
        "BLEU, mean ± sample std, with ROUGE-L, chrF, exact match and held-out perplexity), "
        "and per client and round: bytes on the wire (measured from the encoded messages), "
        "client FLOPs and seconds (means) and peak memory (max).",
        "",
        *results_table(rows),
    ]
    lines += [
        "",
        "## Table I: the paper's claims against the measurement",
        "",
        *paper.table_one_lines(rows),
    ]
    if plots:
        lines += ["", "## Plots"]
        for p in plots:  # one paragraph each, so that they stack
            lines += ["", f"![{Path(p).stem.replace('_', ' ')}]({p})"]
    lines += ["", "## Runs", ""]
    for g in groups:
        lines.append(f"- {g.label}: {', '.join(str(r.path) for r in g.runs)}")
    return "\n".join(lines) + "\n"


def write_report(runs: list[Run], out: str | Path, plots=(), **kw) -> Path:
    """Write ``out/report.md`` (run paths relative to ``out`` where possible)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = out.resolve()
    rel = [Run(_relative(r.path, base), r.config, r.summary, r.metrics) for r in runs]
    path = out / "report.md"
    path.write_text(build_report(rel, plots, **kw))
    return path


def _relative(path: Path, base: Path) -> Path:
    try:
        return path.resolve().relative_to(base)
    except ValueError:
        return path
