"""Federated frameworks: a registry of plug-ins with one small interface.

A framework is registered once (the PEFT pattern)::

    register("fedllm", Server, Client, title="FedLLM")            # no options
    register("kd", Server, Client, config=KDConfig, title="KD-FedLLM")  # section [kd]

and from then on the CLI, the config (``fed.framework``, the ``[kd]`` section and its
``--help``), the report and the plots read it from here. Built-in frameworks live in one
package each (``fedllm``, ``kd/``, ``split/``) and register themselves when first looked up.

The interface (see :class:`Server`, :class:`Client`):

* ``Server(ctx)`` holds the global state (``ctx.data``: the test and public sets and the
  clients' sample counts). ``round(rnd, clients)`` is a generator: it yields
  ``{cid: Message}`` to send, receives ``{cid: Message}`` replies (any subset of the clients it
  sent to: dropout, deadline, unreadable replies are simply absent) and returns the round's
  metrics; it may yield several times per round (KD's upload and broadcast phases). It reports
  replies that fail validation as ``rejected`` / ``rejected_reasons`` instead of raising.
* ``Client(ctx)`` (``ctx.cid`` is its id; ``ctx.data`` its own data only) answers one message
  with ``handle(msg, link)``. It is either a generator
  that yields :mod:`~fedtune.execution.jobs` (Train / Predict) and returns the reply, so an
  executor can run many clients' jobs together; or a plain method (split learning, whose steps
  interleave with the network). ``link.call(msg)`` reaches a :class:`Serving` server.
* Both have ``state_dict()`` / ``load_state_dict(d)``: everything needed to resume after a
  round, as a tree of dicts / lists / tensors / small JSON-able values.

Frameworks never know which runtime (in-process, Flower) or executor runs them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..errors import ConfigError

BUILTIN = ("fedtune.frameworks.fedllm", "fedtune.frameworks.kd", "fedtune.frameworks.split")


class Server(Protocol):
    def round(self, rnd: int, clients: list[int]) -> Generator[dict, dict, dict]: ...

    def eval_state(self) -> dict:
        """The trainable state that is evaluated and saved (LoRA + head)."""
        ...

    def params_exchanged(self) -> int:
        """Trainable parameters a client exchanges per round, for ``summary.json``."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, d: dict) -> None: ...


@runtime_checkable
class Serving(Protocol):
    """A server that also answers per-batch requests from clients (split learning): runtimes
    give such a server a per-batch channel (in-process: a direct call; Flower: a stream)."""

    def serve(self, msg: Any) -> Any: ...

    def refuse(self, sender: str, why: str) -> None:
        """``sender``'s request was refused before ``serve`` saw it, or its stream was cut:
        undo what it did this round."""
        ...


class Client(Protocol):
    def handle(self, msg: Any, link: Any) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, d: dict) -> None: ...


@dataclass(frozen=True)
class Framework:
    """A registered framework. ``client_eval(ctx, server, clients)`` (optional) adds metrics at
    evaluation rounds from the clients' own models, where the runtime holds them in-process."""

    name: str
    server: Callable[..., Server]
    client: Callable[..., Client]
    config: type | None = None
    title: str = ""
    client_eval: Callable[..., dict] | None = None


_REGISTRY: dict[str, Framework] = {}
_loaded = False


def register(
    name: str,
    server: Callable[..., Server],
    client: Callable[..., Client],
    *,
    config: type | None = None,
    title: str = "",
    client_eval: Callable[..., dict] | None = None,
) -> Framework:
    """Register a framework under ``name`` (``fed.framework=name``); ``config`` is the frozen
    dataclass of its ``[name]`` config section. Registering a name again replaces it."""
    fw = Framework(name, server, client, config, title or name, client_eval)
    _REGISTRY[name] = fw
    return fw


def unregister(name: str) -> None:
    """Remove a registered framework (tests and plug-ins that clean up after themselves)."""
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN:
            importlib.import_module(module)


def get(name: str) -> Framework:
    """The framework registered under ``name``."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown framework {name!r}; available: {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list[str]:
    """Registered names: the built-ins in :data:`BUILTIN` order (whatever order they were
    imported in), then the others in registration order."""
    _load_builtins()

    def rank(item: tuple[int, str]) -> tuple[int, int]:
        return (_builtin_rank(_REGISTRY[item[1]]), item[0])

    return [name for _, name in sorted(enumerate(_REGISTRY), key=rank)]


def _builtin_rank(fw: Framework) -> int:
    """The position of ``fw``'s package in :data:`BUILTIN`, ``len(BUILTIN)`` for plug-ins."""
    module = fw.server.__module__
    hits = [i for i, b in enumerate(BUILTIN) if module == b or module.startswith(b + ".")]
    return hits[0] if hits else len(BUILTIN)


def sections() -> dict[str, type]:
    """``{name: config section class}`` of the frameworks that have options."""
    _load_builtins()
    return {n: _REGISTRY[n].config for n in names() if _REGISTRY[n].config is not None}


def builtin_names() -> list[str]:
    """The frameworks that ship with fedtune (``BUILTIN``)."""
    return [n for n in names() if _builtin_rank(_REGISTRY[n]) < len(BUILTIN)]


def titles() -> dict[str, str]:
    """Display names, e.g. ``{"kd": "KD-FedLLM"}``."""
    _load_builtins()
    return {n: _REGISTRY[n].title for n in names()}
