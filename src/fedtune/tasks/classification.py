"""Sequence classification: a head on the last non-pad token's hidden state (what Hugging Face's
``*ForSequenceClassification`` models do), cross-entropy, accuracy and macro-F1."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models import autocast, parts
from . import register


class CrossEntropy:
    """Mean cross-entropy of logits ``[B, C]`` against ``batch["labels"] [B]``."""

    name = "train"
    shared = True  # no per-client state: one call serves every client's rows

    def to(self, device: torch.device) -> CrossEntropy:
        return self

    @property
    def rows(self):
        return lambda logits, batch: F.cross_entropy(logits, batch["labels"], reduction="none")

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits, batch["labels"])


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last non-pad token: ``[B]`` from ``mask [B, L]`` (HF's rule)."""
    pos = torch.arange(mask.shape[-1], device=mask.device)
    return (pos * (mask != 0)).argmax(-1)


def metrics(logits: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 (over classes present in labels or predictions) and CE loss.

    ``logits [N, C]``, ``labels [N]``."""
    y = torch.as_tensor(labels, dtype=torch.long)
    pred = logits.argmax(-1)
    loss = F.cross_entropy(logits, y).item()
    acc = (pred == y).float().mean().item()
    c = logits.shape[1]
    tp = torch.bincount(y[pred == y], minlength=c).float()
    fp = torch.bincount(pred[pred != y], minlength=c).float()
    fn = torch.bincount(y[pred != y], minlength=c).float()
    present = (torch.bincount(y, minlength=c) + torch.bincount(pred, minlength=c)) > 0
    f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
    return {"accuracy": acc, "macro_f1": f1[present].mean().item(), "loss": loss}


class Classification:
    name = "classification"
    model_kind = "classify"
    peft_task_type = "SEQ_CLS"
    head_name = "score"  # HF's sequence-classification head

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor], amp: str) -> torch.Tensor:
        """Classifier logits ``[B, C]`` (float32) for ``input_ids [B, L]``."""
        with autocast(batch["input_ids"].device, amp):
            # use_cache=False: a classifier never decodes, and a KV cache would copy every
            # layer's keys and values.
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
            )
        return out.logits.float()

    def loss(self) -> CrossEntropy:
        return CrossEntropy()

    def scores(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return logits

    def metrics(self, logits: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
        return metrics(logits, labels)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``hidden [B, L, H]`` at each row's last non-pad position: ``[B, H]``."""
        return hidden[torch.arange(len(hidden), device=hidden.device), last_positions(mask)]

    def head(
        self, model: nn.Module, pooled: torch.Tensor, batch: dict[str, torch.Tensor], amp: str
    ) -> torch.Tensor:
        """The classification head on pooled states: ``[B, H]`` -> float32 logits ``[B, C]``.

        HF applies the head to every position and then pools; the head is linear per
        position, so pooling first gives the same logits."""
        with autocast(pooled.device, amp):
            return parts(model).head(pooled).float()


register(Classification())
