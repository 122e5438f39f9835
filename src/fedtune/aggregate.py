"""Server-side aggregation of client tensors (plain functions, shared by all frameworks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import MessageError


def weighted_average(
    states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """FedAvg: ``sum_k w_k * state_k / sum_k w_k`` for every tensor name.

    All states must have the same names and shapes; weights are typically sample counts.
    Accumulates in float64 so that averaging identical states returns them exactly."""
    if not states:
        raise ValueError("weighted_average needs at least one state")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    out: dict[str, torch.Tensor] = {}
    for name, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for state, w in zip(states, weights, strict=True):
            acc += state[name].to(torch.float64) * (w / total)
        out[name] = acc.to(ref.dtype)
    return out


def check_update(
    update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], sender: str
) -> None:
    """Reject an update whose tensor names, shapes or dtypes differ from ``reference``,
    or that holds NaN/Inf. Raises MessageError naming the sender and the problem."""
    missing = sorted(set(reference) - set(update))
    unknown = sorted(set(update) - set(reference))
    if missing or unknown:
        raise MessageError(
            f"update from {sender}: missing tensors {missing[:3]}, unknown tensors {unknown[:3]}"
        )
    for name, ref in reference.items():
        t = update[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise MessageError(
                f"update from {sender}: tensor {name!r} is {t.dtype}{list(t.shape)}, "
                f"expected {ref.dtype}{list(ref.shape)}"
            )
        if not torch.isfinite(t).all():
            raise MessageError(f"update from {sender}: tensor {name!r} holds NaN or Inf")
