"""Client work as jobs: what a client asks an executor to compute, and the losses it trains with.

A framework's ``Client.handle`` is a generator: it ``yield``s a :class:`Train` or
:class:`Predict` job, receives the job's result, and finally ``return``s its reply message::

    def handle(self, msg, link):
        result = yield Train(msg.tensors, self.opt_state, data, idx, CrossEntropy(), stream)
        self.opt_state = result.opt_state
        return Message(PARAMETERS, ...)

The executor (:mod:`fedtune.execution.executors`) decides how jobs run: one by one
(sequential), or the same kind of job of many clients in lock-step through one batched network
(batched). Frameworks never know which.

A loss is any callable ``loss(logits [B, C], batch) -> scalar`` (the mean over the batch, or a
weighted mean); ``batch`` holds ``input_ids``/``attention_mask [B, L]`` and ``labels [B]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..data import Tokenized


class Loss(Protocol):
    """A training objective on classifier logits. ``name`` keys the FLOP cache of a step."""

    name: str

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def to(self, device: torch.device) -> Loss:
        """The same loss with its tensors on ``device`` (moved once per job, not per step)."""
        ...


@dataclass
class Train:
    """Fine-tune ``state`` on ``data[idx]`` with ``loss``.

    Runs ``steps`` optimizer steps (passes over ``idx`` repeat as needed), or, when ``steps``
    is 0, ``epochs`` passes. Each pass shuffles ``idx`` with the generator of ``stream`` (or,
    with ``resample [len(idx)]`` probabilities, draws ``len(idx)`` positions with replacement);
    torch's dropout is seeded from ``stream`` too. ``batch_size`` 0 means ``train.batch_size``.
    The result is a :class:`~fedtune.execution.train.LocalResult`."""

    state: dict[str, torch.Tensor]
    opt_state: dict | None
    data: Tokenized
    idx: np.ndarray
    loss: Loss
    stream: tuple[int, ...]
    steps: int = 0
    epochs: int = 1
    batch_size: int = 0
    resample: np.ndarray | None = None


@dataclass
class Predict:
    """Logits ``[len(idx), C]`` (float32, CPU, ``idx`` order) of ``state`` on ``data[idx]``."""

    state: dict[str, torch.Tensor]
    data: Tokenized
    idx: np.ndarray


Job = Train | Predict


# ----------------------------------------------------------------------------- losses


class CrossEntropy:
    """Mean cross-entropy against ``batch["labels"]`` (FedLLM a2, KD b1)."""

    name = "train"

    def to(self, device: torch.device) -> CrossEntropy:
        return self

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits, batch["labels"])


def kd_loss_rows(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(teacher || softmax(student / T))`` per row: ``[B, C], [B, C] -> [B]``.
    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_q, teacher_probs, reduction="none").sum(-1)  # 0log0=0


class Distill:
    """Distillation toward ``teacher [S, C]`` probabilities (KD b5, b8).

    The job's data is a view whose ``labels`` are row positions in ``teacher``. ``weights [S]``
    weight each row's KL (weighted mean); ``labels [S]`` add cross-entropy on true labels."""

    name = "distill"

    def __init__(
        self,
        teacher: torch.Tensor,
        temperature: float,
        weights: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        self.teacher, self.temperature = teacher, temperature
        self.weights, self.labels = weights, labels

    def to(self, device: torch.device) -> Distill:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Distill(move(self.teacher), self.temperature, move(self.weights), move(self.labels))

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = batch["labels"]
        kl = kd_loss_rows(logits, self.teacher[rows], self.temperature)
        if self.weights is None:
            loss = kl.sum() / len(kl)
        else:
            w = self.weights[rows]
            loss = (w * kl).sum() / w.sum().clamp(min=1e-12)
        if self.labels is not None:
            loss = loss + F.cross_entropy(logits, self.labels[rows])
        return loss
