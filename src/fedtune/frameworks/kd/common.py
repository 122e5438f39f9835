"""What KD-FedLLM's server and clients share: the public selection and the logit checks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ... import codec, seeds
from ...context import Context
from ...data import Tokenized, subset
from ...errors import ConfigError, MessageError
from ...execution.train import outputs
from ...messages import Message
from .ops import unpack_logits


def public_candidates(ctx: Context) -> np.ndarray:
    """Positions in ``ctx.data.public`` of the public samples in use (``[N]``, sorted)."""
    pub, n = np.arange(len(ctx.data.public)), ctx.cfg.kd.public_samples
    if len(pub) == 0:
        raise ConfigError("config key data.public_size: KD-FedLLM needs a public set (> 0)")
    if n > len(pub):
        raise ConfigError(f"config key kd.public_samples: {n} > public set size {len(pub)}")
    return public_subset(pub, n, ctx.cfg.seed)


def public_subset(public_idx: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded uniform subset of ``n`` public indices (``[n]``, sorted); 0 = all of them.

    Not the first ``n``: dataset files are often grouped by class (Banking77's train.csv is),
    so a prefix would hold a handful of classes. The subsets are nested (the first ``n`` of
    one seeded permutation), so a public-size sweep compares growing sets, not different ones."""
    if n == 0 or n >= len(public_idx):
        return np.asarray(public_idx)
    order = seeds.rng((seed, seeds.PUBLIC_SUBSET)).permutation(len(public_idx))
    return np.sort(np.asarray(public_idx)[order[:n]])


def distill_batch_size(ctx: Context) -> int:
    return ctx.cfg.kd.distill_batch_size or ctx.cfg.train.batch_size


def public_logits(ctx: Context, state: dict[str, torch.Tensor], idx: np.ndarray) -> torch.Tensor:
    """``state``'s logits ``[len(idx), C]`` on public samples ``idx`` (positions in the
    public set)."""
    return outputs(ctx, state, ctx.data.public, idx)


def received_logits(
    msg: Message, rows: int, num_classes: int, sender: str, topk: int = 0
) -> torch.Tensor:
    """Unpack and check a LOGITS message: ``[rows, C]``, ``topk`` (the run's ``kd.topk``)
    entries per row sent. The codec rejects malformed tensors and non-finite values, so
    every row has a finite logit; -inf (a class not sent) only ever comes from top-k."""
    values, sparse = msg.tensors.get("values"), "indices" in msg.tensors
    if values is None or values.dim() != 2 or sparse != bool(topk):
        raise MessageError(f"logits from {sender} are not {'top-k' if topk else 'whole'} rows")
    if values.shape[-1] != (topk or num_classes):
        raise MessageError(f"logits from {sender}: {values.shape[-1]} per row, not {topk}")
    try:  # the codec checks names, dtypes, shapes, indices and values; we add who sent them
        codec.check_names(msg.tensors)
        logits = unpack_logits(msg.tensors, num_classes)
    except MessageError as e:
        raise MessageError(f"logits from {sender} are malformed: {e}") from None
    if logits.shape != (rows, num_classes):
        raise MessageError(
            f"logits from {sender}: shape {list(logits.shape)}, expected [{rows}, {num_classes}]"
        )
    return logits


def selection_view(data: Tokenized, idx: np.ndarray) -> Tokenized:
    """The public samples ``data[idx]`` as a dataset whose labels are their row positions
    ``0..S-1``: a distillation job's batches then know their rows of the teacher ``[S, C]``."""
    return replace(subset(data, idx), labels=np.arange(len(idx)))
