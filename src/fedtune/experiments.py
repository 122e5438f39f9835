"""Many runs in one process: the three-way comparison and the paper's case-study grid.

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
from .report import FRAMEWORKS, find_runs, write_report

# The paper's case study (arXiv 2501.04436, section V): one factor varied per framework.
# framework -> (preset, config key, values, run-name prefix)
PAPER_GRID = {
    "fedllm": ("paper-fedllm.toml", "model.lora_r", (4, 8, 16), "r"),
    "kd": ("paper-kd.toml", "kd.public_samples", (1000, 2500, 5002), "pub"),
    "split": ("paper-split.toml", "split.samples_per_round", (500, 1000, 1667), "spr"),
}
PAPER_SEEDS = (0, 1, 42)
PAPER_SAMPLES_PER_CLIENT = 1667

# --quick: the demo-fedllm.toml recipe, sized for a 2-core CPU. The sample-count factors of the
# grid (public samples, samples per round) shrink by the same ratio as the client data.
QUICK = {
    "fed.rounds": 2,
    "data.samples_per_client": 48,
    "data.test_size": 200,
    "train.batch_size": 8,
    "train.autocast": "bf16",
    "train.group_by_length": True,
    "kd.client_eval": False,  # testing every KD client's model too would double KD's eval time
}
QUICK_SEEDS = (0,)  # one seed: 9 runs fit the 20-minute CPU budget (--seeds 0,1 for a spread)
SCALED_KEYS = ("kd.public_samples", "split.samples_per_round")

# Without a local GPT-2: the offline SmolLM2-135M (30 blocks); the split layer keeps the paper's
# cut at half the depth (GPT-2: 6 of 12 blocks).
FALLBACK_MODEL = "smollm2-135m"
FALLBACK_SPLIT_LAYER = 15


@dataclass(frozen=True)
class RunSpec:
    name: str  # run directory name under DIR/runs
    cfg: RunConfig


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds: no seed given")
    return seeds


def configs_dir() -> Path:
    """The repository's ``configs/`` (source checkout), else ``./configs``."""
    here = Path(__file__).resolve().parents[2] / "configs"
    return here if here.is_dir() else Path("configs")


# ----------------------------------------------------------------------------- run lists


def compare_specs(
    base: RunConfig, seeds: tuple[int, ...], frameworks: tuple[str, ...] = FRAMEWORKS
) -> list[RunSpec]:
    """The same config under each framework and seed: ``<framework>-s<seed>``."""
    specs = []
    for fw in frameworks:
        for seed in seeds:
            cfg = config.with_overrides(base, fed={"framework": fw}, seed=seed)
            specs.append(RunSpec(f"{fw}-s{seed}", cfg))
    return specs


def gpt2_available() -> bool:
    """Whether GPT-2 is in the local Hugging Face cache (this must work without network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    files = ("model.safetensors", "pytorch_model.bin")
    return isinstance(try_to_load_from_cache("gpt2", "config.json"), str) and any(
        isinstance(try_to_load_from_cache("gpt2", f), str) for f in files
    )


def paper_specs(
    quick: bool = False,
    seeds: tuple[int, ...] | None = None,
    model: str | None = None,
    overrides: list[str] | None = None,
    presets: Path | None = None,
) -> tuple[list[RunSpec], list[str]]:
    """The case-study grid and notes for the report (model choice, quick scaling)."""
    presets = presets or configs_dir()
    seeds = seeds or (QUICK_SEEDS if quick else PAPER_SEEDS)
    notes = []
    if model is None:
        model = "gpt2" if gpt2_available() else FALLBACK_MODEL
        if model == FALLBACK_MODEL:
            notes.append(
                f"GPT-2 is not in the local Hugging Face cache (no network): the offline "
                f"{FALLBACK_MODEL} stands in; Split-FedLLM cuts it at block "
                f"{FALLBACK_SPLIT_LAYER} of 30 (the paper: 6 of 12)."
            )
    common = [f"model.name={model}"]
    if model == FALLBACK_MODEL:
        common.append(f"split.split_layer={FALLBACK_SPLIT_LAYER}")
    scale = 1.0
    if quick:
        common += [f"{k}={_literal(v)}" for k, v in QUICK.items()]
        scale = QUICK["data.samples_per_client"] / PAPER_SAMPLES_PER_CLIENT
        notes.append(
            f"--quick: {QUICK['fed.rounds']} rounds, {QUICK['data.samples_per_client']} "
            f"samples per client, {QUICK['data.test_size']} test samples, batch "
            f"{QUICK['train.batch_size']}, bf16 autocast; public samples and samples per "
            f"round scaled by {scale:.4f} (= {QUICK['data.samples_per_client']}/"
            f"{PAPER_SAMPLES_PER_CLIENT}). Numbers show the method, not the paper's "
            f"accuracy."
        )
    specs = []
    for fw, (preset, key, values, prefix) in PAPER_GRID.items():
        for value in values:
            v = max(1, round(value * scale)) if key in SCALED_KEYS else value
            item = [*common, f"{key}={v}", *(overrides or [])]
            for seed in seeds:
                cfg = config.load(presets / preset, [*item, f"seed={seed}"])
                specs.append(RunSpec(f"{fw}-{prefix}{v}-s{seed}", cfg))
    return specs, notes


def _literal(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


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
        log(f"{head}: accuracy {summary['final_accuracy']:.4f} in {summary['wall_seconds']:.0f} s")
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
