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
  ``Server.serve`` through the counted wire;
* ``Server.state_dict()`` / ``load_state_dict(d)`` and the same on ``Client``: everything needed
  to resume after a round, as a tree of dicts / lists / tensors / small JSON-able values
  (checkpointed by :mod:`fedtune.checkpoint`).

Faults: the replies a ``round`` generator receives may be any subset of the clients it sent to
(dropout, deadline); it aggregates what it got and reports ``rejected`` / ``rejected_reasons``
for replies that fail validation (:func:`fedtune.aggregate.screen_updates`) instead of raising.
A runtime may also abandon a round (``gen.close()``) when too few clients are left.

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
