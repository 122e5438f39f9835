"""Federated frameworks. Each module has the same small interface:

* ``NAME`` - the ``fed.framework`` value that selects it;
* ``Server(ctx)`` with
    - ``round(rnd, clients) -> Generator``: yields ``{cid: Message}`` to send to clients,
      receives ``{cid: Message}`` replies (possibly several exchanges per round, e.g. KD's
      upload and broadcast phases), and returns a dict of round metrics;
    - ``eval_state() -> dict[str, Tensor]``: the trainable state that is evaluated and saved;
    - optionally ``serve(msg) -> Message``: answers per-batch client requests (split learning);
* optionally ``extra_eval(ctx, server, clients) -> dict``: more metrics at evaluation rounds
  (e.g. KD's mean client accuracy);
* optionally ``Server.params_exchanged() -> int`` for ``summary.json`` (default: the size of
  ``eval_state()``);
* ``Client(ctx, cid)`` with ``handle(msg, link) -> Message | None``; ``link.call(msg)`` reaches
  ``Server.serve`` through the counted wire.

The runtime (in-process simulation, Flower) drives these objects and moves every message through
:class:`fedtune.messages.Wire`, so bytes are counted in one place for every runtime.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ConfigError

REGISTRY = {
    "fedllm": "fedtune.frameworks.fedllm",
    "kd": "fedtune.frameworks.kd",
    "split": "fedtune.frameworks.split",
}


def get(name: str) -> ModuleType:
    """The framework module registered under ``name``."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown framework {name!r}; available: {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name])
