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
from ..messages import DOWN, UP, Ledger
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
    ledger. Returns ``(round it was taken after, metrics history)``. Everything is checked
    first (:func:`validate`): a damaged or foreign checkpoint is a one-line ConfigError and
    nothing of it is used."""
    rnd, history = validate(state, cfg, server, transport)
    server.load_state_dict(state["server"])
    transport.load_state_dict(state["clients"], rnd)
    restore_ledger(transport.wire.ledger, state["ledger"])
    restore_rng(state["rng"])
    return rnd, history


def validate(state: Any, cfg: RunConfig, server, transport) -> tuple[int, list]:
    """Check a loaded checkpoint against the run about to continue from it: its version, the
    config it was written under, the round, the history, the ledger and the RNG states, and
    the server's and clients' states against the fresh ones (:func:`check_like`: tensor names,
    shapes and dtypes), every float tensor finite. Returns ``(round, history)``."""
    if not isinstance(state, dict):
        raise ConfigError("the checkpoint holds no state (not a fedtune checkpoint)")
    if state.get("version") != VERSION:
        raise ConfigError(f"checkpoint version {state.get('version')} is not {VERSION}")
    missing = sorted(
        {"round", "config", "server", "clients", "ledger", "history", "rng"} - set(state)
    )
    if missing:
        raise ConfigError(f"the checkpoint has no {', '.join(missing)}")
    try:  # a config that is not even JSON (a tensor in its place) is another config too
        same = json.dumps(state["config"], sort_keys=True) == json.dumps(
            resume_key(cfg), sort_keys=True
        )
    except (TypeError, ValueError):
        same = False
    if not same:
        raise ConfigError("the checkpoint was written under another config than config.toml")
    rnd = state["round"]
    if not isinstance(rnd, int) or isinstance(rnd, bool) or not 0 <= rnd <= cfg.fed.rounds:
        raise ConfigError(f"the checkpoint's round {rnd!r} is not in [0, {cfg.fed.rounds}]")
    history = state["history"]
    if not isinstance(history, list) or not all(_is_record(r, rnd) for r in history):
        raise ConfigError(f"the checkpoint's history is not a list of rounds up to {rnd}")
    clients, fresh = state["clients"], transport.state_dict()
    if isinstance(clients, dict) and ("run_key" in clients) != ("run_key" in fresh):
        how = "`fedtune flower run --resume`" if "run_key" in clients else "`fedtune run --resume`"
        raise ConfigError(f"the checkpoint was written by another runtime; resume it with {how}")
    check_like(state["server"], server.state_dict(), "server")
    check_like(clients, fresh, "clients")
    _check_ledger(state["ledger"], rnd)
    _check_rng(state["rng"])
    return rnd, list(history)


def _is_record(r: Any, rnd: int) -> bool:
    x = r.get("round") if isinstance(r, dict) else None
    return isinstance(x, int) and 0 <= x <= rnd


def check_like(value: Any, like: Any, where: str) -> None:
    """``value`` (loaded) has the structure of ``like`` (a fresh party's ``state_dict()``):
    a tensor of the same shape and dtype, an array of the same dtype kind and rank, a dict
    with the same keys (any keys where ``like`` is empty: state that grows while training,
    e.g. optimizer states), a list of the same length; where ``like`` is None (not yet
    trained) anything goes. Every float tensor or array must be finite."""
    if not _finite(value):
        raise ConfigError(f"checkpoint {where}: a tensor holds NaN or Inf")
    if like is None:
        for k, v in _children(value):
            check_like(v, None, f"{where}.{k}")
        return
    if isinstance(like, torch.Tensor):
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"checkpoint {where}: expected a tensor, got {type(value).__name__}")
        if value.shape != like.shape or value.dtype != like.dtype:
            got, want = _desc(value), _desc(like)
            raise ConfigError(f"checkpoint {where}: {got}, expected {want}")
        return
    if isinstance(like, np.ndarray):
        ok = isinstance(value, np.ndarray) and value.dtype.kind == like.dtype.kind
        if not ok or value.ndim != like.ndim:
            raise ConfigError(f"checkpoint {where}: expected a {like.ndim}-D {like.dtype} array")
        return
    if isinstance(like, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"checkpoint {where}: expected a table, got {type(value).__name__}")
        if like and set(value) != set(like):
            extra, gone = (
                sorted(map(str, set(value) - set(like))),
                sorted(map(str, set(like) - set(value))),
            )
            what = f"missing {gone[0]!r}" if gone else f"unexpected {extra[0]!r}"
            raise ConfigError(f"checkpoint {where}: {what}")
        for k, v in value.items():
            check_like(v, like.get(k), f"{where}.{k}")
        return
    if isinstance(like, list | tuple):
        if not isinstance(value, list | tuple) or (like and len(value) != len(like)):
            raise ConfigError(f"checkpoint {where}: expected a list of {len(like)}")
        for i, v in enumerate(value):
            check_like(v, like[i] if like else None, f"{where}[{i}]")
        return
    kinds = (
        (bool,)
        if isinstance(like, bool)
        else (int, float)
        if isinstance(like, int | float)
        else (type(like),)
    )
    if not isinstance(value, kinds):
        raise ConfigError(
            f"checkpoint {where}: expected a {type(like).__name__}, got {value!r:.40}"
        )


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return bool(torch.isfinite(value).all())
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return bool(np.isfinite(value).all())
    return True


def _children(value: Any):
    if isinstance(value, dict):
        return value.items()
    if isinstance(value, list | tuple):
        return enumerate(value)
    return ()


def _desc(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def _check_ledger(rows: Any, rnd: int) -> None:
    def ok(row: Any) -> bool:
        if not isinstance(row, list) or len(row) != 6:
            return False
        r, client, direction, kind, n, count = row
        ints = all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (r, n, count))
        names = all(isinstance(x, str) for x in (client, direction, kind))
        return ints and names and r <= rnd and direction in (UP, DOWN)

    if not isinstance(rows, list) or not all(ok(row) for row in rows):
        raise ConfigError("the checkpoint's byte ledger is malformed")


def _check_rng(states: Any) -> None:
    """The RNG states load into scratch generators (the process's own are untouched)."""
    try:
        if not isinstance(states, dict):
            raise TypeError
        t = states["torch"]
        ok = isinstance(t, torch.Tensor) and t.dtype == torch.uint8
        if not ok or t.shape != torch.get_rng_state().shape:
            raise ValueError
        np.random.RandomState().set_state(states["numpy"])
        random.Random().setstate(states["python"])
    except (KeyError, TypeError, ValueError, IndexError, OverflowError):
        raise ConfigError("the checkpoint's RNG states are malformed") from None


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
    if path.exists() and not path.is_file():
        raise ConfigError(f"checkpoint {path} is not a file")
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {})[_KEY]
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        return decode_tree(json.loads(meta), tensors)
    except Exception as e:  # safetensors / JSON errors: a damaged file, not a crash
        raise ConfigError(f"checkpoint {path} is unreadable: {type(e).__name__}") from None
