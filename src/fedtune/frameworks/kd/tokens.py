"""KD-FedLLM on a generative task: knowledge is per token, on the public set's response tokens.

The public set holds prompts and responses; every party runs them teacher-forced and keeps,
at each response position, its logits over the vocabulary. Shapes: ``S`` public rows in the
selection, ``T`` their response tokens (rows concatenated in order), ``V`` the vocabulary,
``k`` = ``kd.topk`` (or V when 0).

* b2/b6 (:class:`TopK`): per row the top-k logits of each response position;
* b3/b7 (:func:`pack_tokens`): values ``[T, k]`` (float32/float16, or int8 with a per-token
  ``scale [T]``) and indices ``[T, k]`` (int16 up to V = 32767, else int32; none when k = V).
  Bytes: ``T * k * (value bytes + index bytes)`` (+ ``4 T`` for int8) + the safetensors header;
* b4 (:func:`aggregate_tokens`): top-k sets differ between clients. Each client's teacher for
  a token is the softmax of ITS k logits at temperature T (what it did not send has
  probability 0, as classification's top-k); the server averages these distributions on the
  union of their supports (a token missing from a client's top-k counts 0 for it) and keeps
  the k most probable of the mean, renormalized: the teacher stays k-sparse;
* b5/b8 (:class:`TokenDistill`): ``T^2 * KL(teacher || softmax(student / T))`` on the
  teacher's support, averaged over the batch's response tokens.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ... import codec
from ...data import Tokenized

CHUNK = 256  # tokens whose dense [CHUNK, V] mean is built at once in aggregate_tokens


def response_counts(data: Tokenized, idx: np.ndarray) -> np.ndarray:
    """Response tokens (loss positions) of each row ``data[idx]``: ``[len(idx)]``."""
    return np.array(
        [max(0, len(data.ids[i]) - max(int(data.prompt_len[i]), 1)) for i in idx], dtype=np.int64
    )


class TopK:
    """A Predict job's reduce: per row ``[width, 2, k]`` = the top-k logits of each response
    position and their indices (as float32, exact below 2^24), zero past the row's tokens
    (``k = V``: ``[width, 1, V]``, the logits themselves). ``width`` is the most response
    tokens of a row in the set, so every batch's rows have one shape."""

    def __init__(self, k: int, width: int) -> None:
        self.k, self.width = k, width

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        b, r, v = logits.shape
        k = self.k or v
        if k == v:
            out = logits.unsqueeze(2)  # [B, R, 1, V]
        else:
            top = logits.topk(k, dim=-1)
            out = torch.stack([top.values, top.indices.float()], dim=2)  # [B, R, 2, k]
        out = out * (batch["target_ids"][:, :r] != -100)[..., None, None]
        full = out.new_zeros((b, self.width, *out.shape[2:]))
        full[:, : min(r, self.width)] = out[:, : self.width]
        return full


def flatten(rows: torch.Tensor, counts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:class:`TopK` rows ``[S, width, 2|1, k]`` -> the real tokens' values ``[T, k]`` and
    indices ``[T, k]`` (int64; None for whole rows), ``T = counts.sum()``."""
    keep = torch.arange(rows.shape[1])[None, :] < torch.as_tensor(counts)[:, None]  # [S, width]
    flat = rows[keep]  # [T, 2|1, k]
    if flat.shape[1] == 1:
        return flat[:, 0], None
    return flat[:, 0], flat[:, 1].long()


def pack_tokens(values, indices, vocab: int, dtype: str) -> dict[str, torch.Tensor]:
    """b3/b7: per-token logits for the wire (:func:`fedtune.codec.encode_sparse`)."""
    return codec.encode_sparse(values, indices, vocab, dtype, center=True)


def unpack_tokens(tensors, vocab: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checked ``values [T, k]``, ``indices [T, k]`` (None: whole rows) of a LOGITS message."""
    return codec.decode_sparse(tensors, vocab)


def sparse_probs(values: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax over each token's own k logits: ``[T, k]`` (the tail gets probability 0)."""
    return (values.float() / temperature).softmax(-1)


def aggregate_tokens(
    clients: list[tuple[torch.Tensor, torch.Tensor | None]],
    temperature: float,
    weights: list[float],
    k: int,
    vocab: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """b4: the weighted mean of the clients' per-token distributions, its top-``k`` kept and
    renormalized (``k`` 0: the whole mean). Returns ``probs [T, k]`` and ``indices [T, k]``
    (None when whole rows are kept). Built ``CHUNK`` tokens at a time: a dense ``[T, V]`` for
    every token at once would not fit for a 49k vocabulary."""
    w = torch.tensor(weights, dtype=torch.float32) / float(sum(weights))
    n_tok = clients[0][0].shape[0]
    probs, index = [], []
    for s in range(0, n_tok, CHUNK):
        acc = torch.zeros((min(CHUNK, n_tok - s), vocab))
        for wi, (vals, idx) in zip(w, clients, strict=True):
            p = sparse_probs(vals[s : s + CHUNK], temperature) * wi
            if idx is None:
                acc += p
            else:
                acc.scatter_add_(1, idx[s : s + CHUNK], p)
        if k and k < vocab:
            top = acc.topk(k, dim=-1)
            probs.append(top.values / top.values.sum(-1, keepdim=True).clamp(min=1e-12))
            index.append(top.indices)
        else:
            probs.append(acc / acc.sum(-1, keepdim=True).clamp(min=1e-12))
    return torch.cat(probs), (torch.cat(index) if index else None)


class TokenDistill:
    """Per-token distillation toward a sparse teacher (KD b5, b8 on generation).

    ``probs [T, k]`` / ``indices [T, k]`` (None: whole vocabulary rows) hold the teacher of
    every response token of the selection; ``offsets [S]`` where each selection row's tokens
    start. The job's data is a selection view whose ``labels`` are row positions. With
    ``with_targets`` the token cross-entropy on the public responses is added (the server's
    ``kd.server_uses_public_labels``)."""

    name = "distill-lm"
    shared = False

    def __init__(self, probs, indices, offsets, temperature: float, with_targets=False) -> None:
        self.probs, self.indices, self.offsets = probs, indices, offsets
        self.temperature, self.with_targets = temperature, with_targets

    def to(self, device: torch.device) -> TokenDistill:
        idx = None if self.indices is None else self.indices.to(device)
        return TokenDistill(
            self.probs.to(device),
            idx,
            self.offsets.to(device),
            self.temperature,
            self.with_targets,
        )

    @property
    def rows(self):
        return lambda logits, batch: self.row_sums(logits, batch) / batch["tokens_per_row"]

    def row_sums(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each row's summed token KL (and CE): ``[B]`` from ``logits [B, R, V]``."""
        r = logits.shape[1]
        valid = batch["target_ids"][:, :r] != -100  # [B, R]
        flat = self.offsets[batch["labels"]][:, None] + torch.arange(r, device=logits.device)
        flat = torch.where(valid, flat, torch.zeros_like(flat))
        p = self.probs[flat]  # [B, R, k]
        log_q = F.log_softmax(logits.float() / self.temperature, dim=-1)
        if self.indices is not None:
            log_q = log_q.gather(-1, self.indices[flat])
        kl = (torch.special.xlogy(p, p) - p * log_q).sum(-1) * self.temperature**2
        out = (kl * valid).sum(-1)
        if self.with_targets:
            tgt = batch["target_ids"][:, :r]
            ce = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="none")
            out = out + ce.sum(-1)
        return out

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = (batch["target_ids"] != -100).sum().clamp(min=1)
        return self.row_sums(logits, batch).sum() / tokens
