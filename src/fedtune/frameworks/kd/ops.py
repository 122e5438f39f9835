"""Knowledge-distillation building blocks for KD-FedLLM (plain functions, no state).

* logit compression for the wire: :func:`pack_logits` / :func:`unpack_logits`;
* knowledge processing: :func:`aggregate_knowledge` (entropy filter + mean / sample-count /
  confidence weighting of softened client probabilities);
* public-set selection: :func:`prune_public` (entropy or margin of the global model) and
  :func:`alignment_weights` (toward the clients' aggregate label histogram);
* the loss :class:`Distill` (server b5, client b8), run by the training loop as a job's loss.

Shapes: ``S`` public samples in this round's selection, ``C`` classes, ``K`` clients.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ... import codec

# ----------------------------------------------------------------------------- wire format


def pack_logits(
    logits: torch.Tensor, topk: int = 0, dtype: str = "float32"
) -> dict[str, torch.Tensor]:
    """Logits ``[S, C]`` as wire tensors: :func:`fedtune.codec.encode` with the top-k *largest*
    logits (the tail carries little knowledge) and int8 centred per row (softmax ignores the
    dropped row offset). ``values [S, k]`` (k = ``topk`` or C), ``indices [S, k]`` (top-k;
    uint8 when C <= 256), ``scale [S]`` (int8)."""
    return codec.encode(logits, dtype, topk, select="largest", center=True)


def unpack_logits(tensors: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    """Inverse of :func:`pack_logits`: float32 logits ``[S, C]`` (up to a per-row constant).

    Missing top-k classes are ``-inf``: ``softmax`` gives them exactly 0 and renormalises the
    kept probability mass (the teacher says nothing about the tail). Raises
    :class:`~fedtune.errors.MessageError` on malformed tensors."""
    return codec.decode(tensors, num_classes, fill=float("-inf"))


# ----------------------------------------------------------------------------- knowledge


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``H(softmax(logits)) / ln C`` in [0, 1] per row: ``[S, C] -> [S]`` (-inf entries ok)."""
    p = logits.float().softmax(-1)
    return -torch.special.xlogy(p, p).sum(-1) / math.log(logits.shape[-1])


def aggregate_knowledge(
    client_logits: list[torch.Tensor],
    temperature: float,
    how: str = "mean",
    num_samples: list[int] | None = None,
    entropy_threshold: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global knowledge (b4): a weighted mean of softened client probabilities.

    ``client_logits``: K tensors ``[S, C]``. A client's prediction on a sample is dropped when
    its normalized entropy (at T = 1, i.e. the client's own confidence) exceeds
    ``entropy_threshold``. Weights: 1 (``mean``), the client's sample count (``samples``) or
    ``1 - H / ln C`` per sample (``confidence``). ``median``: per sample and class the median
    probability of the surviving clients (mean of the two middle ones for an even count), rows
    renormalized to sum 1: a minority of malicious clients cannot move it far.

    Returns ``teacher [S, C]`` (rows sum to 1; uniform where every client was dropped) and
    ``kept [S]`` (bool: at least one client survived the filter)."""
    logits = torch.stack([x.float() for x in client_logits])  # [K, S, C]
    probs = (logits / temperature).softmax(-1)
    ent = torch.stack([normalized_entropy(x) for x in logits])  # [K, S]
    if how == "median":
        return median_knowledge(probs, ent <= entropy_threshold + 1e-6)
    w = torch.ones_like(ent)
    if how == "samples":
        w = w * torch.tensor(num_samples, dtype=torch.float32).unsqueeze(-1)
    elif how == "confidence":
        w = (1 - ent).clamp(min=1e-6)
    w = w * (ent <= entropy_threshold + 1e-6)  # entropy filter (the epsilon keeps ties)
    total = w.sum(0)  # [S]
    kept = total > 0
    teacher = (w.unsqueeze(-1) * probs).sum(0) / total.clamp(min=1e-12).unsqueeze(-1)
    teacher[~kept] = 1.0 / logits.shape[-1]
    return teacher, kept


def sharpen(teacher: torch.Tensor, s: float) -> torch.Tensor:
    """``teacher [S, C]`` (rows sum to 1) sharpened: ``p^(1/s)`` per row, renormalized
    (DS-FL's entropy reduction aggregation, Itahara et al. 2021). ``s = 1``: unchanged; as
    ``s -> 0`` each row tends to its argmax."""
    if s == 1.0:
        return teacher
    return (teacher.clamp(min=1e-30).log() / s).softmax(-1)


def median_knowledge(probs: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate-wise median of ``probs [K, S, C]`` over the clients where ``keep [K, S]``,
    renormalized per row. Returns ``teacher [S, C]`` and ``kept [S]`` as
    :func:`aggregate_knowledge`; a row with no surviving client (or all-zero medians, possible
    with top-k logits) is uniform and not kept."""
    k, _, c = probs.shape
    x = probs.masked_fill(~keep.unsqueeze(-1), math.inf).sort(dim=0).values  # dropped ones last
    n = keep.sum(0)  # [S] surviving clients per sample
    lo = ((n - 1).clamp(min=0) // 2).view(1, -1, 1).expand(1, -1, c)
    hi = (n // 2).clamp(max=k - 1).view(1, -1, 1).expand(1, -1, c)
    med = (x.gather(0, lo) + x.gather(0, hi)).squeeze(0) / 2  # [S, C]
    total = med.sum(-1)
    kept = (n > 0) & torch.isfinite(total) & (total > 0)
    teacher = torch.where(
        kept.unsqueeze(-1),
        med / total.clamp(min=1e-12).unsqueeze(-1),
        torch.full_like(med, 1.0 / c),
    )
    return teacher, kept


def prune_public(global_logits: torch.Tensor, method: str, keep: float) -> np.ndarray:
    """Positions (sorted) of the ``ceil(keep * N)`` most informative rows of ``[N, C]`` logits:
    highest entropy or smallest margin between the global model's top-2 probabilities."""
    n = global_logits.shape[0]
    if method == "none":
        return np.arange(n)
    if method == "entropy":
        score = normalized_entropy(global_logits)
    else:
        top2 = global_logits.float().softmax(-1).topk(2, dim=-1).values
        score = -(top2[:, 0] - top2[:, 1])  # small margin = informative
    k = max(1, math.ceil(keep * n))
    order = torch.argsort(score, descending=True, stable=True)[:k]
    return np.sort(order.numpy())


def label_distribution(labels: np.ndarray, num_classes: int, weights=None) -> np.ndarray:
    """Normalized (weighted) class histogram ``[C]``."""
    h = np.bincount(labels, weights=weights, minlength=num_classes).astype(np.float64)
    return h / max(h.sum(), 1e-12)


def tv_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Total-variation distance between two distributions ``[C]``: 0 (equal) to 1 (disjoint)."""
    return 0.5 * float(np.abs(p - q).sum())


def alignment_weights(labels: np.ndarray, target_hist: np.ndarray) -> np.ndarray:
    """Per-sample weights ``[S]`` (mean 1) that move the public label distribution toward
    ``target_hist [C]``: ``w_i = target[y_i] / public[y_i]``. Classes absent from the public set
    cannot be created; classes absent from the clients get weight 0."""
    c = len(target_hist)
    target = np.asarray(target_hist, dtype=np.float64) / max(float(np.sum(target_hist)), 1e-12)
    public = label_distribution(labels, c)
    w = target[labels] / public[labels]
    if w.sum() <= 0:  # no overlap at all: leave the set unchanged
        return np.ones(len(labels))
    return w * len(w) / w.sum()


# ----------------------------------------------------------------------------- distillation


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

    shared = False  # each client has its own teacher

    @property
    def rows(self):
        """Per-row KL when the loss is their plain mean (no row weights, no label term)."""
        if self.weights is not None or self.labels is not None:
            return None
        return lambda logits, batch: kd_loss_rows(
            logits, self.teacher[batch["labels"]], self.temperature
        )

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
