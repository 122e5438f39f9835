"""Tasks: what fine-tuning means for the model's outputs, the loss, the metrics, and what split
learning keeps of the last hidden states. Everything else calls the task.

``ctx.task`` is the run's task (``data.task``). A task implements :class:`Task`; register one
with :func:`register`. Built in: ``classification`` (:mod:`.classification`) and
``generation`` (:mod:`.generation`, a causal LM).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError


class Task(Protocol):
    """``model_kind``: the HF model class (``classify``: a sequence classifier; ``causal``: a
    causal LM); ``peft_task_type``: PEFT's task type; ``head_name``: the module trained and
    exchanged beside the LoRA adapters (``model.train_head``), or ``""`` for none."""

    name: str
    model_kind: str
    peft_task_type: str
    head_name: str

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor], amp: str) -> torch.Tensor:
        """The model's float32 outputs for ``input_ids`` / ``attention_mask [B, L]``: one
        row per batch row (classification ``[B, C]``, generation ``[B, R, V]``)."""
        ...

    def scores(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What evaluation keeps of each row's outputs: ``[B, ...]`` (classification: the
        logits; generation: the row's NLL sum and token count)."""
        ...

    def loss(self):
        """The training loss on private data (a :class:`~fedtune.execution.jobs.Loss`)."""
        ...

    def metrics(self, scores: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
        """Test metrics (with ``loss``) from the :meth:`scores` of a whole test set."""
        ...

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What the head reads of the last hidden states ``[B, L, H]`` (split learning)."""
        ...

    def head(
        self, model: nn.Module, pooled: torch.Tensor, batch: dict[str, torch.Tensor], amp: str
    ) -> torch.Tensor:
        """The head on :meth:`pool`'s output (what :meth:`logits` returns); ``batch`` holds
        what it needs besides (generation: ``target_pos``)."""
        ...


_TASKS: dict[str, Task] = {}


def register(task: Task) -> None:
    _TASKS[task.name] = task


def get(name: str) -> Task:
    from . import classification, generation  # noqa: F401  (built-in tasks register)

    if name not in _TASKS:
        raise ConfigError(f"unknown task {name!r}; available: {', '.join(_TASKS)}")
    return _TASKS[name]
