"""fedtune: federated fine-tuning of LLMs with FedLLM, KD-FedLLM and Split-FedLLM.

Quick use::

    import fedtune
    cfg = fedtune.config.load("configs/demo-fedllm.toml", ["fed.rounds=2"])
    summary = fedtune.run(cfg, out="runs/demo")

Building blocks: :mod:`fedtune.config`, :mod:`fedtune.models`, :mod:`fedtune.data`,
:mod:`fedtune.messages`, :mod:`fedtune.compute`, :mod:`fedtune.execution`,
:mod:`fedtune.frameworks`, :mod:`fedtune.runtime`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import config
from .config import RunConfig
from .errors import FedtuneError

__version__ = "0.1.0"


def run(cfg: RunConfig | dict[str, Any] | str | Path, out: str | Path | None = None, **kw) -> dict:
    """Run one federated experiment in-process and return its summary dict.

    ``cfg`` is a :class:`RunConfig`, a nested dict of config values, or a TOML path.
    With ``out``, the run directory (config, metrics.jsonl, summary.json, adapter) is written.
    Extra keyword arguments go to :func:`fedtune.runtime.simulate` (e.g. ``ctx=``)."""
    from .runtime import simulate

    if isinstance(cfg, str | Path):
        cfg = config.load(cfg)
    elif isinstance(cfg, dict):
        cfg = config.from_dict(cfg)
    return simulate(cfg, out, **kw)


__all__ = ["run", "config", "RunConfig", "FedtuneError", "__version__"]
