"""Generation: a causal LM fine-tuned to write the response after the prompt (instruction
tuning, data-to-text). The loss is the next-token cross-entropy on the response tokens only:
prompt tokens and padding contribute nothing (:func:`fedtune.data.response_targets` marks
where the loss falls). No head is trained; LoRA sits on the attention projections (or any
``model.target_modules``) and the frozen LM head turns hidden states into vocabulary logits.

Shapes: ``B`` rows, ``L`` tokens, ``R`` response positions per row (padded), ``V`` vocabulary.
Outputs are computed only at the ``R`` response positions, not at all ``L``: the logits of a
batch are ``[B, R, V]``, which for a 49k vocabulary is most of a step's memory.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models import autocast, parts
from . import register


def token_nll(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's summed next-token negative log-likelihood over its response tokens: ``[B]``
    from ``logits [B, R, V]`` and ``batch["target_ids"] [B, R]`` (-100: no token)."""
    tgt = batch["target_ids"][:, : logits.shape[1]]
    nll = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="none")
    return nll.sum(-1)


class TokenCrossEntropy:
    """The mean next-token cross-entropy over the batch's response tokens (what HF's causal-LM
    loss computes with prompt labels set to -100)."""

    name = "train-lm"
    shared = True

    def to(self, device: torch.device) -> TokenCrossEntropy:
        return self

    @property
    def rows(self):
        """Row ``i``'s token-loss sum / the batch's tokens per row: their mean is the loss."""
        return lambda logits, batch: token_nll(logits, batch) / batch["tokens_per_row"]

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = (batch["target_ids"] != -100).sum().clamp(min=1)
        return token_nll(logits, batch).sum() / tokens


def metrics(scores: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """Held-out token loss (nats per response token) and perplexity from ``scores [N, 2]``
    (each row's NLL sum and token count); the labels are not used."""
    nll, tokens = scores[:, 0].double().sum().item(), scores[:, 1].sum().item()
    loss = nll / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "test_tokens": tokens}


class Generation:
    name = "generation"
    model_kind = "causal"
    peft_task_type = "CAUSAL_LM"
    head_name = ""  # nothing beside LoRA is trained: the LM head stays frozen

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor], amp: str) -> torch.Tensor:
        """Vocabulary logits at the response positions: ``[B, R, V]`` float32."""
        p = parts(model)
        with autocast(batch["input_ids"].device, amp):
            hidden = p.body(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
            ).last_hidden_state
        return self.head(model, hidden, batch, amp)

    def loss(self) -> TokenCrossEntropy:
        return TokenCrossEntropy()

    def scores(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What evaluation keeps per row: ``[B, 2]`` = (NLL sum, response tokens)."""
        tokens = (batch["target_ids"][:, : logits.shape[1]] != -100).sum(-1)
        return torch.stack([token_nll(logits, batch), tokens.float()], dim=-1)

    def metrics(self, scores: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
        return metrics(scores, labels)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Every position is read: ``[B, L, H]`` unchanged (split learning sends them all)."""
        return hidden

    def head(
        self, model: nn.Module, pooled: torch.Tensor, batch: dict[str, torch.Tensor], amp: str
    ) -> torch.Tensor:
        """The LM head at the response positions: ``[B, L, H]`` -> ``[B, R, V]`` float32."""
        pos = batch["target_pos"]
        h = pooled.gather(1, pos.unsqueeze(-1).expand(-1, -1, pooled.shape[-1]))
        with autocast(pooled.device, amp):
            return parts(model).head(h).float()


register(Generation())
