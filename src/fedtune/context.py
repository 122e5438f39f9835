"""The context a party works in: config, the process's shared model, device, and its own data.

One process loads the backbone once (:func:`build_context`) and gives each party a view of the
same :class:`Context` with only its own data:

* ``ctx.server()`` -> :data:`ServerContext`: the test set, the public set and the clients'
  sample counts (:class:`~fedtune.data.ServerData`), never a client's samples;
* ``ctx.client(cid)`` -> :data:`ClientContext`: client ``cid``'s private samples and the public
  texts (:class:`~fedtune.data.ClientData`); ``ctx.cid`` is its id.

The simulation builds one context holding all the data (:class:`~fedtune.data.FedData`) and
hands out views; a deployed server or SuperNode loads only its own data
(:func:`~fedtune.data.prepare_server`, :func:`~fedtune.data.prepare_client`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

import torch
from torch import nn

from . import tasks
from .config import RunConfig
from .data import ClientData, FedData, ServerData, prepare
from .errors import ConfigError
from .models import init_trainable_state, load_model
from .tasks import Task

D = TypeVar("D", FedData, ServerData, ClientData)


@dataclass
class Context(Generic[D]):
    """``model`` is the single LoRA-wrapped backbone of the process; ``init_state`` the seeded
    initial trainable state (LoRA A/B + head) every party starts from; ``task`` what is being
    fine-tuned (:mod:`fedtune.tasks`: outputs, loss, metrics)."""

    cfg: RunConfig
    model: nn.Module
    tokenizer: object
    data: D
    device: torch.device
    init_state: dict[str, torch.Tensor]
    task: Task = field(default_factory=lambda: tasks.get("classification"))
    progress: bool = False
    flop_cache: dict = field(default_factory=dict)  # step key -> StepCost, per model
    cid: int = -1  # the client's id in a ClientContext
    # the model is this party's alone (a deployed node), so it may free what it never runs
    owns_model: bool = False

    def server(self) -> ServerContext:
        """The server's view of a process context (or the server's own context)."""
        if isinstance(self.data, ServerData):
            return replace(self, cid=-1)
        if isinstance(self.data, FedData):
            return replace(self, data=self.data.server_view(), cid=-1)
        raise ConfigError("a client's context holds no server data")

    def client(self, cid: int) -> ClientContext:
        """Client ``cid``'s view of a process context (or a client's own context)."""
        if isinstance(self.data, ClientData):
            return replace(self, cid=cid)
        if isinstance(self.data, FedData):
            return replace(self, data=self.data.client_view(cid), cid=cid)
        raise ConfigError("the server's context holds no client data")


ServerContext = Context[ServerData]
ClientContext = Context[ClientData]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_context(cfg: RunConfig, data: FedData | ServerData | ClientData | None = None) -> Context:
    """Load (or reuse) the shared model, prepare the data and the seeded initial state.

    Pass ``data`` to bring your own :class:`~fedtune.data.FedData` (or only a server's
    :class:`~fedtune.data.ServerData` or a client's :class:`~fedtune.data.ClientData`)
    instead of loading all of ``cfg.data``."""
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    device = resolve_device(cfg.device)
    from .models import load_tokenizer

    if data is None:
        data = prepare(cfg.data, load_tokenizer(cfg.model.name), cfg.model.max_length, cfg.seed)
    task = tasks.get(cfg.data.task)
    model, tok = load_model(cfg.model, data.num_labels, device, task)
    init = init_trainable_state(model, cfg.seed, cfg.model.lora_init, cfg.model.head_init)
    # A step's measured cost depends only on the model and the step's key, so every run on
    # this process's model (compare's frameworks and seeds, a sweep) shares one cache.
    costs = model.__dict__.setdefault("_fedtune_step_costs", {})
    return Context(cfg, model, tok, data, device, init, task, cfg.progress, costs)
