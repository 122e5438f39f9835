"""The per-process context every framework works in: config, shared model, data, device."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .config import RunConfig
from .data import FedData, prepare
from .models import init_trainable_state, load_model


@dataclass
class Context:
    """Shared by the server and all simulated clients of one process.

    ``model`` is the single LoRA-wrapped backbone; ``init_state`` is the seeded initial
    trainable state (LoRA A/B + head) every party starts from."""

    cfg: RunConfig
    model: nn.Module
    tokenizer: object
    data: FedData
    device: torch.device
    init_state: dict[str, torch.Tensor]
    progress: bool = False
    flop_cache: dict = field(default_factory=dict)  # step key -> FLOPs (compute.step)

    def client_samples(self, cid: int) -> np.ndarray:
        return self.data.client_idx[cid]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_context(cfg: RunConfig, data: FedData | None = None) -> Context:
    """Load (or reuse) the shared model, prepare the data and the seeded initial state.

    Pass ``data`` to bring your own :class:`~fedtune.data.FedData` instead of ``cfg.data``."""
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    device = resolve_device(cfg.device)
    from .models import load_tokenizer

    if data is None:
        data = prepare(cfg.data, load_tokenizer(cfg.model.name), cfg.model.max_length, cfg.seed)
    model, tok = load_model(cfg.model, data.num_labels, device)
    init = init_trainable_state(model, cfg.seed)
    return Context(cfg, model, tok, data, device, init, progress=cfg.progress)
