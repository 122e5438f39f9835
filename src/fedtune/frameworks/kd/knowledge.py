"""What KD-FedLLM's knowledge is for the run's task: per-sample class logits, or per-token
vocabulary logits on the public responses (generation, :mod:`.tokens`). The server and the
client run the same protocol (b1-b8) over either through :func:`knowledge`."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from ... import codec
from ...context import Context
from ...data import Tokenized
from ...errors import ConfigError, MessageError
from ...execution.jobs import Loss, Predict
from ...messages import Message
from ...models import vocab_size
from .common import received_logits, selection_view
from .ops import Distill, aggregate_knowledge, pack_logits, sharpen
from .sequences import SequenceKnowledge
from .tokens import (
    TokenDistill,
    TopK,
    aggregate_tokens,
    flatten,
    pack_tokens,
    response_counts,
    sparse_probs,
    unpack_tokens,
)


class Knowledge(Protocol):
    """``rows`` are positions in the public set, in the round's selection order."""

    def predict(self, state: dict[str, torch.Tensor], rows: np.ndarray) -> Predict:
        """The job computing a party's outputs on public ``rows`` (b2, b6)."""
        ...

    def pack(self, outputs: torch.Tensor, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Wire tensors of a party's outputs on ``rows`` (b3, b7)."""
        ...

    def unpack(self, msg: Message, rows: np.ndarray, sender: str) -> Any:
        """The checked knowledge a message holds for ``rows``; MessageError if malformed."""
        ...

    def aggregate(
        self, received: list, sizes: list[int], rows: np.ndarray
    ) -> tuple[Any, torch.Tensor]:
        """b4: the teacher from the clients' knowledge on ``rows``, and which rows ``[S]`` it
        kept (the entropy filter can drop some)."""
        ...

    def teacher(self, received: Any) -> Any:
        """b8: the teacher from the server's knowledge."""
        ...

    def accuracy(self, teacher: Any, labels: np.ndarray) -> float | None:
        """How often the teacher's prediction on a public row is its label ``labels [S]`` (a
        measurement; None where knowledge is not a class prediction)."""
        ...

    def train_data(self, teacher: Any, rows: np.ndarray) -> Tokenized:
        """What b5 and b8 train on; its ``labels`` are the teacher's row positions."""
        ...

    def loss(self, teacher: Any, rows: np.ndarray, weights=None, labels=None) -> Loss:
        """Distillation toward ``teacher`` on public ``rows`` (b5, b8)."""
        ...


class ClassKnowledge:
    """Logits ``[S, C]`` per public sample (classification); see :mod:`.ops`."""

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.kd = ctx, ctx.cfg.kd
        if self.kd.topk >= ctx.data.num_labels:
            raise ConfigError(
                f"config key kd.topk: must be < the number of classes "
                f"({ctx.data.num_labels}), got {self.kd.topk}"
            )

    def predict(self, state, rows) -> Predict:
        return Predict(state, self.ctx.data.public, rows)

    def pack(self, outputs, rows):
        return pack_logits(outputs, self.kd.topk, self.kd.logit_dtype)

    def unpack(self, msg, rows, sender):
        return received_logits(msg, len(rows), self.ctx.data.num_labels, sender, self.kd.topk)

    def aggregate(self, received, sizes, rows):
        kd = self.kd
        teacher, kept = aggregate_knowledge(
            received, kd.temperature, kd.aggregate, sizes, kd.entropy_threshold
        )
        return sharpen(teacher, kd.sharpen), kept

    def teacher(self, received):
        return (received / self.kd.temperature).softmax(-1)

    def accuracy(self, teacher, labels) -> float:
        return float((teacher.argmax(-1).numpy() == labels).mean())

    def train_data(self, teacher, rows) -> Tokenized:
        return selection_view(self.ctx.data.public, rows)

    def loss(self, teacher, rows, weights=None, labels=None) -> Loss:
        return Distill(teacher, self.kd.temperature, weights, labels)


class TokenKnowledge:
    """Top-k vocabulary logits of every public response token (generation); see
    :mod:`.tokens`. Pruning, alignment and the entropy, confidence and median aggregates are
    per-sample class notions: a ConfigError here."""

    def __init__(self, ctx: Context) -> None:
        kd, public = ctx.cfg.kd, ctx.data.public
        for key, value, default in (
            ("kd.prune", kd.prune, "none"),
            ("kd.align", kd.align, "none"),
            ("kd.entropy_threshold", kd.entropy_threshold, 1.0),
            ("kd.sharpen", kd.sharpen, 1.0),
        ):
            if value != default:
                raise ConfigError(f"config key {key}: classification only (generation: {default})")
        if kd.aggregate not in ("mean", "samples"):
            raise ConfigError("config key kd.aggregate: generation supports 'mean' or 'samples'")
        self.ctx, self.kd = ctx, kd
        self.vocab = vocab_size(ctx.model)
        if kd.topk >= self.vocab:
            raise ConfigError(f"config key kd.topk: must be < the vocabulary ({self.vocab})")
        self.counts = response_counts(public, np.arange(len(public)))  # [N] tokens per row
        self.reduce = TopK(kd.topk, int(self.counts.max(initial=1)))

    def predict(self, state, rows) -> Predict:
        return Predict(state, self.ctx.data.public, rows, self.reduce)

    def pack(self, outputs, rows):
        values, idx = flatten(outputs, self.counts[rows])
        return pack_tokens(values, idx, self.vocab, self.kd.logit_dtype)

    def unpack(self, msg, rows, sender):
        try:
            codec.check_names(msg.tensors)
            values, idx = unpack_tokens(msg.tensors, self.vocab)
        except MessageError as e:
            raise MessageError(f"logits from {sender} are malformed: {e}") from None
        want = (int(self.counts[rows].sum()), self.kd.topk or self.vocab)
        if tuple(values.shape) != want:
            raise MessageError(
                f"logits from {sender}: shape {list(values.shape)}, expected {list(want)}"
            )
        return values, idx

    def aggregate(self, received, sizes, rows):
        weights = sizes if self.kd.aggregate == "samples" else [1.0] * len(received)
        teacher = aggregate_tokens(received, self.kd.temperature, weights, self.kd.topk, self.vocab)
        return teacher, torch.ones(len(rows), dtype=torch.bool)  # every token is kept

    def teacher(self, received):
        values, idx = received
        return sparse_probs(values, self.kd.temperature), idx

    def accuracy(self, teacher, labels) -> None:
        return None  # the public rows' labels are groups, not what a token predicts

    def train_data(self, teacher, rows) -> Tokenized:
        return selection_view(self.ctx.data.public, rows)

    def loss(self, teacher, rows, weights=None, labels=None) -> Loss:
        counts = self.counts[rows]
        offsets = torch.as_tensor(np.concatenate([[0], np.cumsum(counts)[:-1]]))
        probs, idx = teacher
        return TokenDistill(probs, idx, offsets, self.kd.temperature, labels is not None)


def knowledge(ctx: Context) -> Knowledge:
    """The run's knowledge: per token when the public set holds prompt/response pairs, or
    generated sequences with ``kd.level = "sequence"``."""
    if ctx.cfg.kd.level == "sequence":
        return SequenceKnowledge(ctx)
    generative = ctx.data.public.prompt_len is not None
    return TokenKnowledge(ctx) if generative else ClassKnowledge(ctx)
