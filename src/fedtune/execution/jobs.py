"""Client work as jobs: what a client asks an executor to compute, and the losses it trains with.

A framework's ``Client.handle`` is a generator: it ``yield``s a :class:`Train` or
:class:`Predict` job, receives the job's result, and finally ``return``s its reply message::

    def handle(self, msg, link):
        result = yield Train(msg.tensors, self.opt_state, data, idx, ctx.task.loss(), stream)
        self.opt_state = result.opt_state
        return Message(PARAMETERS, ...)

The executor (:mod:`fedtune.execution.executors`) decides how jobs run: one by one
(sequential), or the same kind of job of many clients in lock-step through one batched network
(batched). Frameworks never know which.

A loss is any callable ``loss(logits [B, C], batch) -> scalar`` (the mean over the batch, or a
weighted mean); ``batch`` holds ``input_ids``/``attention_mask [B, L]`` and ``labels [B]``: the
task's (:mod:`fedtune.tasks`, e.g. cross-entropy) or a framework's (KD's distillation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..data import Tokenized
from ..models import RESIDUAL


class Loss(Protocol):
    """A training objective on the task's outputs. ``name`` keys the FLOP cache of a step.

    ``rows`` is None, or a function giving per-row losses ``[B]`` whose mean is the loss (the
    batched engine then runs sub-batches forward and backward one at a time); ``shared``: the
    loss is the same function for every client (one call can serve many clients' rows)."""

    name: str
    shared: bool

    @property
    def rows(self) -> Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] | None: ...

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
    ``private``: the client's own data, which ``privacy.dpsgd`` trains on with DP-SGD
    (:mod:`fedtune.privacy.dpsgd`). The drift terms of :mod:`fedtune.fedopt` (sequential
    executor only): ``prox_mu`` pulls the weights toward ``state`` (FedProx), ``correction``
    is added to every gradient (SCAFFOLD's ``c - c_i``), and the ``frozen`` tensors of
    ``state`` are not trained (FFA-LoRA's A) nor returned. The result is a
    :class:`~fedtune.execution.train.LocalResult`."""

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
    private: bool = False  # private data: trained with DP-SGD when privacy.dpsgd is on
    prox_mu: float = 0.0
    correction: dict[str, torch.Tensor] | None = None
    frozen: tuple[str, ...] = ()

    @property
    def drifts(self) -> bool:
        """Whether the job needs the sequential loop's per-step drift terms."""
        return (
            self.prox_mu > 0
            or self.correction is not None
            or bool(self.frozen)
            or any(n.startswith(RESIDUAL) for n in self.state)  # FLoRA: the party's own weights
        )


@dataclass
class Predict:
    """Per-row outputs (float32, CPU, ``idx`` order) of ``state`` on ``data[idx]``: the task's
    scores (classification: logits ``[len(idx), C]``), or ``reduce(logits, batch)`` of each
    batch's outputs when given (e.g. the top-k of every token's vocabulary logits: what a
    client keeps of ``[B, R, V]``). Jobs with the same ``reduce`` object fuse."""

    state: dict[str, torch.Tensor]
    data: Tokenized
    idx: np.ndarray
    reduce: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] | None = None


@dataclass
class Generate:
    """Greedy responses of ``state`` to the prompts of ``data[idx]`` (each row's first
    ``prompt_len`` tokens): the new token ids of each row, up to ``max_new_tokens`` and
    ending with the end-of-sequence token when the model emitted it."""

    state: dict[str, torch.Tensor]
    data: Tokenized
    idx: np.ndarray
    max_new_tokens: int


Job = Train | Predict | Generate
