"""Round checkpoints for ``fedtune run --resume RUN_DIR`` (plain functions any runtime can call).

A checkpoint is ONE file, ``RUN_DIR/checkpoint/state.safetensors``: every tensor of the run's
state as a safetensors entry, and everything else (round, history, ledger, optimizer
hyper-parameters, RNG states) as JSON in the file's metadata. It is written to a temporary file,
fsynced and renamed over the previous one, so a crash (even SIGKILL) at any instant leaves
either the previous complete checkpoint or the new complete one. Nothing is pickled.

What it holds (see :func:`capture`): the round it was taken after; the server's
``state_dict()`` and the transport's (in-process: every client's ``state_dict()``; Flower: the
run key under which the SuperNodes keep their clients' state) (global adapter and head, KD server model and optimizer,
split server optimizers, client optimizer states / local models); the Wire's byte ledger (so
``summary.json`` totals match an uninterrupted run); the metrics history (``metrics.jsonl`` is
rewritten from it on resume, dropping lines of rounds after the checkpoint); and the RNG states.
Every random draw in fedtune is seeded per (seed, round, client), so the RNG states are a
belt-and-braces restore rather than a requirement.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import RunConfig, resume_key
from ..errors import ConfigError
from ..messages import Ledger
from .rundir import durable_replace

VERSION = 2  # 2: transport state, aggregator state, KD selections in the public set
FILE = Path("checkpoint") / "state.safetensors"
_KEY = "fedtune_checkpoint"


# ----------------------------------------------------------------------------- tree codec


def encode_tree(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of a tree of dicts / lists / tuples / scalars / tensors / numpy arrays.

    Tensors and arrays move into ``tensors`` (CPU copies) and are referenced by name; dicts with
    non-string keys (optimizer states) and tuples are tagged so :func:`decode_tree` restores them
    exactly."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": name}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_tree(v, tensors) for k, v in obj.items()}
        return {
            "__items__": [
                [encode_tree(k, tensors), encode_tree(v, tensors)] for k, v in obj.items()
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def decode_tree(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_tree`."""
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy()
    if "__tuple__" in obj:
        return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in obj["__items__"]}
    return {k: decode_tree(v, tensors) for k, v in obj.items()}


# ----------------------------------------------------------------------------- ledger and RNG


def ledger_rows(ledger: Ledger) -> list[list]:
    """``[[round, client, direction, kind, bytes, count], ...]``"""
    return [[*key, n, ledger.count[key]] for key, n in ledger.bytes.items()]


def restore_ledger(ledger: Ledger, rows: list[list]) -> None:
    ledger.bytes.clear()
    ledger.count.clear()
    for r, client, direction, kind, n, count in rows:
        key = (int(r), client, direction, kind)
        ledger.bytes[key], ledger.count[key] = int(n), int(count)


def rng_states() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


# ----------------------------------------------------------------------------- save / load


def capture(rnd: int, cfg: RunConfig, server, transport, history: list) -> dict:
    """The run's state after round ``rnd``, as a tree for :func:`save`. ``transport`` gives
    the clients' side (:meth:`~fedtune.runtime.loop.Transport.state_dict`) and the ledger."""
    return {
        "version": VERSION,
        "round": rnd,
        "config": resume_key(cfg),
        "server": server.state_dict(),
        "clients": transport.state_dict(),
        "ledger": ledger_rows(transport.wire.ledger),
        "history": history,
        "rng": rng_states(),
    }


def restore(state: dict, cfg: RunConfig, server, transport) -> tuple[int, list]:
    """Load a :func:`capture` tree into a fresh server, the transport's clients and its
    ledger. Returns ``(round it was taken after, metrics history)``."""
    if state.get("version") != VERSION:
        raise ConfigError(f"checkpoint version {state.get('version')} is not {VERSION}")
    if json.dumps(state["config"], sort_keys=True) != json.dumps(resume_key(cfg), sort_keys=True):
        raise ConfigError("the checkpoint was written under another config than config.toml")
    server.load_state_dict(state["server"])
    transport.load_state_dict(state["clients"], int(state["round"]))
    restore_ledger(transport.wire.ledger, state["ledger"])
    restore_rng(state["rng"])
    return int(state["round"]), list(state["history"])


def save(run_dir: str | Path, state: dict) -> Path:
    """Write ``state`` atomically to ``run_dir/checkpoint/state.safetensors``."""
    path = Path(run_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(encode_tree(state, tensors), separators=(",", ":"))
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata={_KEY: meta})
    with open(tmp, "rb") as f:  # durable before it becomes visible
        os.fsync(f.fileno())
    durable_replace(tmp, path)
    return path


def load(run_dir: str | Path) -> dict | None:
    """The last complete checkpoint of ``run_dir`` as a tree, or None when there is none."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {})[_KEY]
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        return decode_tree(json.loads(meta), tensors)
    except Exception as e:  # safetensors / JSON errors: a damaged file, not a crash
        raise ConfigError(f"checkpoint {path} is unreadable: {type(e).__name__}") from None
