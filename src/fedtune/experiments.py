"""Many runs in one process: the three-way comparison (the paper's grid is in :mod:`.paper`).

``fedtune compare`` and ``fedtune reproduce paper`` build a list of :class:`RunSpec` (a name
and a config), run them one after another in this process with :func:`run_all` (so the shared
backbone is loaded once per model config, see :func:`fedtune.models.load_model`), then write
``report.md`` and the PNG plots with :func:`write_outputs`.

Output layout::

    DIR/runs/<name>/      one run directory per spec (config.toml, metrics.jsonl, summary.json)
    DIR/report.md         tables, Table I, embedded plots
    DIR/*.png             the plots (see fedtune.plots)
    DIR/report.json       the report's title and notes, for ``fedtune plot``

Resumable: a run directory with ``summary.json`` is finished and skipped; an interrupted one
continues from its checkpoint when its config is the same, else it is deleted and run again.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import config
from .config import RunConfig
from .errors import ConfigError
from .report import find_runs, write_report


@dataclass(frozen=True)
class RunSpec:
    name: str  # run directory name under DIR/runs
    cfg: RunConfig


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds 0,1,42``: distinct integers >= 0 (a repeated seed would name one run
    directory twice and silently run once)."""
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds: no seed given")
    if min(seeds) < 0:
        raise ConfigError(f"--seeds: seeds must be >= 0, got {min(seeds)}")
    _distinct(seeds, "--seeds")
    return seeds


def parse_frameworks(text: str) -> tuple[str, ...]:
    """``--frameworks fedllm,kd``: distinct registered names (checked when the configs are
    built), at least one."""
    names = tuple(f.strip() for f in text.split(",") if f.strip())
    if not names:
        raise ConfigError("--frameworks: no framework given")
    _distinct(names, "--frameworks")
    return names


def _distinct(values: tuple, flag: str) -> None:
    twice = [v for i, v in enumerate(values) if v in values[:i]]
    if twice:
        raise ConfigError(f"{flag}: {twice[0]} is given twice")


def configs_dir() -> Path:
    """The repository's ``configs/`` (source checkout), else ``./configs``."""
    here = Path(__file__).resolve().parents[2] / "configs"
    return here if here.is_dir() else Path("configs")


# ----------------------------------------------------------------------------- run lists


def compare_specs(
    base: RunConfig, seeds: tuple[int, ...], frameworks: tuple[str, ...] = ()
) -> list[RunSpec]:
    """The same config under each framework (default: every registered one) and seed:
    ``<framework>-s<seed>``."""
    if not frameworks:
        from . import frameworks as registry

        frameworks = tuple(registry.names())
    specs = []
    for fw in frameworks:
        for seed in seeds:
            cfg = config.with_overrides(base, fed={"framework": fw}, seed=seed)
            specs.append(RunSpec(f"{fw}-s{seed}", cfg))
    return specs


# ----------------------------------------------------------------------------- running


def same_config(path: Path, cfg: RunConfig) -> bool:
    """Whether the run at ``path`` was made with ``cfg`` (``progress`` aside), i.e. whether
    its checkpoint may be resumed (``checkpoint.restore`` checks the same key)."""
    try:
        old = config.load(path / "config.toml")
    except ConfigError:
        return False
    return config.resume_key(old) == config.resume_key(cfg)


def run_all(specs: list[RunSpec], out: str | Path, log=print) -> list[Path]:
    """Run every spec into ``out/runs/<name>``, skipping finished runs. Returns the run dirs.

    An unfinished run with the same config is resumed from its checkpoint (``--resume``);
    a finished run with a different config is an error rather than silently reused."""
    from .runtime import simulate  # torch and transformers only when something runs
    from .runtime.records import quality

    root = Path(out) / "runs"
    paths = []
    t0 = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        path = root / spec.name
        paths.append(path)
        head = f"[{i}/{len(specs)}] {spec.name}"
        if (path / "summary.json").exists():
            if not same_config(path, spec.cfg):
                raise ConfigError(
                    f"{path} holds a finished run with another config; use another --out"
                )
            log(f"{head}: finished earlier, skipped")
            continue
        resume = (path / "config.toml").is_file() and same_config(path, spec.cfg)
        if resume:
            log(f"{head}: unfinished run, resumed from its last checkpoint")
        elif path.exists():
            log(f"{head}: unfinished run directory, deleted and rerun")
            shutil.rmtree(path)
        log(f"{head}: running ({time.perf_counter() - t0:.0f} s elapsed)")
        summary = simulate(spec.cfg, path, log=log, resume=resume)
        log(f"{head}: {quality(summary.get('final', {}))} in {summary['wall_seconds']:.0f} s")
    log(f"{len(specs)} runs done in {time.perf_counter() - t0:.0f} s")
    return paths


def write_outputs(run_paths: list[str | Path], out: str | Path, notes=None, title=None, log=print):
    """Plots (when matplotlib is installed) and ``report.md`` for the finished runs.

    The title and ``notes`` (lines for the report's setup section) are kept in
    ``out/report.json``, so that ``fedtune plot`` redraws the same report; ``None`` reuses them."""
    runs = find_runs(run_paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta_file = out / "report.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    if notes is not None or title is not None:
        meta = {"title": title or meta.get("title"), "notes": list(notes or meta.get("notes", []))}
        meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    notes, title = list(meta.get("notes", [])), meta.get("title")
    try:
        from .plots import write_plots
    except ImportError:
        plots = []
        notes.append("matplotlib is not installed: no plots (pip install matplotlib).")
    else:
        plots = write_plots(runs, out)
    kw = {"title": title} if title else {}
    path = write_report(runs, out, plots, notes=notes, **kw)
    log(f"{len(runs)} runs: report {path}" + (f", plots {', '.join(plots)}" if plots else ""))
    return path
