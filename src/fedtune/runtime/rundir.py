"""The run directory: resolved config, per-round metrics, summary, final global adapter.

Layout::

    RUN_DIR/config.toml        resolved config (reloadable with ``fedtune run RUN_DIR/config.toml``)
    RUN_DIR/metrics.jsonl      one JSON line per round
    RUN_DIR/summary.json       written last and atomically: its presence marks a complete run
    RUN_DIR/adapter/           global LoRA + head as safetensors (PEFT format: loads with
                               AutoPeftModelFor... where the base model is available by its
                               hub name), the tokenizer, and config.json with the label names
    RUN_DIR/checkpoint/        the last round's full state, for ``fedtune run --resume RUN_DIR``
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig, to_toml
from ..data import default_data_dir
from ..errors import ConfigError
from ..fedopt.flora import RESIDUAL_FILE, save_residual
from ..messages import DOWN, UP, Ledger
from ..models import RESIDUAL, hub_name, load_trainable_state


def atomic_write(path: Path, text: str) -> None:
    """``path`` holds ``text`` or its old content, never a part, even after a power loss:
    the new content is on disk before it replaces the old (``summary.json`` marks a finished
    run, so it must not be visible before it is durable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    durable_replace(tmp, path)


def durable_replace(tmp: Path, path: Path) -> None:
    """Rename the fsynced ``tmp`` over ``path`` and fsync the folder, so the rename itself
    survives a crash."""
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_writable(out: str | Path, what: str = "run directory") -> None:
    """Refuse ``out`` unless it is (or can be made) a folder this process can write to, before
    anything slow runs: a file in its place, a file above it or a read-only place is found
    now, not after the last round. Probes the nearest existing folder by creating and removing
    a temporary folder in it (permission bits alone say nothing for root or read-only mounts)."""
    if not str(out).strip():  # Path("") is the working directory: never meant
        raise ConfigError(f"{what}: empty path")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what} {path}: {probe} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fedtune-probe-", dir=probe))
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot write in {probe} ({e.strerror})") from None


class RunDir:
    """A run directory. The round loop creates it once everything that can be checked before
    round 1 has been (config, data, model, the framework's own checks), so a run that fails
    on bad input leaves nothing behind that a rerun would refuse as an unfinished run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def check(out: str | Path) -> None:
        check_writable(out)
        path = Path(out)
        if (path / "summary.json").exists():
            raise ConfigError(f"run directory {path} already holds a run; choose another --out")
        if (path / "metrics.jsonl").exists() or (path / "config.toml").exists():
            raise ConfigError(
                f"run directory {path} holds an unfinished run; continue it with "
                f"--resume {path}, or choose another --out"
            )

    @staticmethod
    def check_resumable(out: str | Path) -> None:
        check_writable(out)
        path = Path(out)
        if not (path / "config.toml").is_file():
            raise ConfigError(f"cannot resume {path}: no config.toml (not a run directory)")
        if (path / "summary.json").exists():
            raise ConfigError(f"cannot resume {path}: the run has finished (summary.json)")

    @classmethod
    def create(cls, out: str | Path, cfg: RunConfig) -> RunDir:
        cls.check(out)
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / "config.toml", to_toml(cfg))
        return cls(path)

    def append_metrics(self, record: dict) -> None:
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def rewrite_metrics(self, history: list[dict]) -> None:
        """Replace ``metrics.jsonl`` with ``history`` (on resume: the checkpoint's rounds)."""
        atomic_write(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))

    def finish(self, summary: dict, ctx, state: dict[str, torch.Tensor]) -> None:
        save_adapter(self.path / "adapter", ctx, state)
        atomic_write(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")


def save_adapter(path: Path, ctx, state: dict[str, torch.Tensor]) -> None:
    """``state`` as a PEFT adapter that names the hub model as its base (not this machine's
    cache path), with the tokenizer and, for a classifier, ``config.json`` holding
    ``id2label`` / ``label2id`` (the class order exists nowhere else)."""
    model = ctx.model
    load_trainable_state(model, state)
    peft_cfg = model.peft_config["default"]
    local = peft_cfg.base_model_name_or_path
    peft_cfg.base_model_name_or_path = hub_name(ctx.cfg.model.name)
    try:
        # No embedding check: PEFT would look the base model up on the hub to see whether the
        # vocabulary changed (it never does here).
        model.save_pretrained(path, save_embedding_layers=False)
    finally:
        peft_cfg.base_model_name_or_path = local
    ctx.tokenizer.save_pretrained(path)
    residual = {n: t for n, t in state.items() if n.startswith(RESIDUAL)}
    if residual:  # FLoRA's merged stacks: dense additions to the base model's weights
        save_residual(path / RESIDUAL_FILE, residual)
    config = model.get_base_model().config
    if ctx.task.model_kind == "classify":
        config.id2label = dict(enumerate(ctx.data.label_names))
        config.label2id = {n: i for i, n in enumerate(ctx.data.label_names)}
    config.save_pretrained(path)


# Task metrics a summary reports for the first and last evaluation.
TASK_METRICS = (
    "accuracy",
    "macro_f1",
    "test_loss",
    "perplexity",
    "bleu",
    "chrf",
    "rouge_l",
    "exact_match",
    "sample",
)


def privacy_summary(history: list[dict]) -> dict:
    """The last round's privacy figures (``dp_epsilon`` None: no finite guarantee, no noise)."""
    keys = (
        "dp_epsilon",
        "dp_delta",
        "dp_noise_multiplier",
        "dp_adjacency",
        "activation_epsilon",
        "sample_epsilon",
    )
    out = {}
    for k in keys:
        last = next((r for r in reversed(history) if k in r), None)
        if last is not None:
            out[k] = last[k]
    return out


def summarize(cfg: RunConfig, ctx, history: list[dict], ledger: Ledger, n_exchanged: int) -> dict:
    """The ``summary.json`` of a run (all frameworks share this schema). A round-0 record
    (the base model, generation tasks) is reported as ``initial``, not averaged over."""
    initial = [r for r in history if r["round"] == 0]
    history = [r for r in history if r["round"] > 0]
    evals = [r for r in history if "accuracy" in r]

    def mean(key: str) -> float:
        vals = [r[key] for r in history if key in r]
        return float(np.mean(vals)) if vals else 0.0

    kinds: dict[str, dict[str, float]] = {UP: {}, DOWN: {}}
    for r in history:
        for d in (UP, DOWN):
            for k, v in r["bytes_by_kind"][d].items():
                kinds[d][k] = kinds[d].get(k, 0.0) + v / len(history)
    last = next((r for r in reversed(history) if "test_loss" in r), {})

    def task_metrics(r: dict) -> dict:
        return {k: r[k] for k in TASK_METRICS if k in r}

    return {
        "framework": cfg.fed.framework,
        "task": cfg.data.task,
        "model": cfg.model.name,
        "dataset": cfg.data.path or str(default_data_dir() or cfg.data.hub_name),
        "num_clients": ctx.data.num_clients,
        "samples_per_client": list(ctx.data.client_sizes),
        "public_size": len(ctx.data.public),
        "test_size": len(ctx.data.test),
        "num_labels": ctx.data.num_labels,
        "rounds": len(history),
        "seed": cfg.seed,
        "final_accuracy": evals[-1]["accuracy"] if evals else None,
        "best_accuracy": max(r["accuracy"] for r in evals) if evals else None,
        "final_macro_f1": evals[-1]["macro_f1"] if evals else None,
        "final": task_metrics(last),  # the last evaluation's task metrics (every task)
        "initial": task_metrics(initial[0]) if initial else None,  # round 0: the base model
        "trainable_params_exchanged": n_exchanged,
        "bytes_up_per_client_per_round": mean("bytes_up_per_client"),
        "bytes_down_per_client_per_round": mean("bytes_down_per_client"),
        "bytes_per_client_per_round_by_kind": kinds,
        "total_bytes": ledger.total(),
        "client_flops_per_round": mean("client_flops"),
        "client_seconds_per_round": mean("client_seconds"),
        "client_peak_memory_bytes": max(
            (r["client_peak_memory_bytes"] for r in history), default=0
        ),
        "server_flops_per_round": mean("server_flops"),
        "clients_dropped": sum(len(r.get("dropped", [])) for r in history),
        "clients_late": sum(len(r.get("late", [])) for r in history),
        "updates_rejected": sum(r.get("rejected", 0) for r in history),
        "rounds_skipped": sum(bool(r.get("skipped")) for r in history),
        "server_seconds_per_round": mean("server_seconds"),
        **privacy_summary(history),
        "device": str(ctx.device),
        "machine": f"{platform.node()} {platform.machine()} torch {torch.__version__}",
        "flops_mode": cfg.flops,
        "peak_memory_method": "the party's own: parameters its steps read, optimizer state, "
        "largest step's inputs and live tensors (measured on replays of each step shape)",
    }
