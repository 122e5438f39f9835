"""Server-side aggregation of client tensors, shared by every framework that averages.

* strategies: ``fed.aggregator`` names a registered :class:`Strategy`, built once per run by
  :func:`build` and called every round with the global state and the accepted client states.
  A strategy may keep state across rounds (a server optimizer's momentum), saved with the
  server's checkpoint. Built in: ``fedavg`` (:func:`weighted_average`), ``median``
  (:func:`coordinate_median`), ``trimmed_mean`` (:func:`trimmed_mean`); add one with
  :func:`register`, e.g. FedAvgM::

      class FedAvgM:
          def __init__(self, fed, beta=0.9): self.beta, self.m = beta, {}
          def __call__(self, ref, states, weights):
              avg = weighted_average(states, weights)
              for k in avg:
                  self.m[k] = self.beta * self.m.get(k, 0) + (ref[k] - avg[k])
              return {k: ref[k] - self.m[k] for k in avg}
          ...  # state_dict() -> {"m": self.m}; load_state_dict(d)

      register("fedavgm", FedAvgM)
* update validation: :func:`update_problem` says why an update must be rejected (names, shapes,
  dtypes, NaN/Inf, ``||update - global||`` above a bound), :func:`screen_updates` applies it to
  a round's replies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any, Protocol

import torch

State = dict[str, torch.Tensor]


def weighted_average(
    states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """FedAvg: ``sum_k w_k * state_k / sum_k w_k`` for every tensor name.

    All states must have the same names and shapes; weights are typically sample counts.
    Accumulates in float64 so that averaging identical states returns them exactly.

    LoRA: every tensor is averaged on its own, so the factors ``A [r, in]`` and ``B [out, r]``
    are averaged separately, as FedIT does. The aggregate's update (times alpha / r) is then
    ``B̄ Ā = (sum_i w_i B_i)(sum_j w_j A_j)``, not the mean of the clients' updates
    ``sum_i w_i B_i A_i`` (weights normalised to sum to 1). The gap is a weighted covariance
    of the factors::

        sum_i w_i B_i A_i - B̄ Ā = sum_i w_i (B_i - B̄)(A_i - Ā)

    (expand the right side; ``sum_i w_i (B_i - B̄) = 0``). It is zero when all clients share
    A or B, and second order in the round's local changes: clients start from the same A, B,
    so ``B_i - B̄`` and ``A_i - Ā`` are differences of their local steps."""
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


def _stack(states: Sequence[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    """``[K, *shape]`` float64 stack of one tensor across K states (on the first one's device)."""
    dev = states[0][name].device
    return torch.stack([s[name].to(dev, torch.float64) for s in states])


def coordinate_median(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median over K states (unweighted; for even K the mean of the two middle
    values, so that it is symmetric). Tolerates up to ``ceil(K/2) - 1`` arbitrary states."""
    if not states:
        raise ValueError("coordinate_median needs at least one state")
    out = {}
    for name, ref in states[0].items():
        x = _stack(states, name).sort(dim=0).values  # [K, ...]
        k = x.shape[0]
        out[name] = ((x[(k - 1) // 2] + x[k // 2]) / 2).to(ref.dtype)
    return out


def trimmed_mean(
    states: Sequence[dict[str, torch.Tensor]], trim_ratio: float
) -> dict[str, torch.Tensor]:
    """Coordinate-wise trimmed mean: per coordinate drop the ``floor(trim_ratio * K)`` largest
    and smallest of the K values and average the rest (unweighted). ``trim_ratio`` in [0, 0.5)."""
    if not states:
        raise ValueError("trimmed_mean needs at least one state")
    if not 0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    k = len(states)
    cut = int(trim_ratio * k)
    out = {}
    for name, ref in states[0].items():
        x = _stack(states, name).sort(dim=0).values
        out[name] = x[cut : k - cut].mean(0).to(ref.dtype)
    return out


class Strategy(Protocol):
    """Combines accepted client states into the next global state."""

    def __call__(
        self, reference: State, states: Sequence[State], weights: Sequence[float]
    ) -> State:
        """``reference``: the global state the clients started from (same names as every
        state); ``weights``: their sample counts. Returns the new global state."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, d: dict[str, Any]) -> None: ...


class Stateless:
    """A strategy from a plain function of ``(states, weights)``."""

    def __init__(self, fn: Callable[[Sequence[State], Sequence[float]], State]) -> None:
        self.fn = fn

    def __call__(self, reference: State, states: Sequence[State], weights) -> State:
        return self.fn(states, weights)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        pass


_STRATEGIES: dict[str, Callable[[Any], Strategy]] = {
    "fedavg": lambda fed: Stateless(weighted_average),
    "median": lambda fed: Stateless(lambda states, w: coordinate_median(states)),
    "trimmed_mean": lambda fed: Stateless(lambda states, w: trimmed_mean(states, fed.trim_ratio)),
}


def register(name: str, factory: Callable[[Any], Strategy]) -> None:
    """Register ``factory(fed_config) -> Strategy`` as ``fed.aggregator=name``."""
    _STRATEGIES[name] = factory


def unregister(name: str) -> None:
    _STRATEGIES.pop(name, None)


def names() -> list[str]:
    return list(_STRATEGIES)


def build(fed) -> Strategy:
    """The strategy ``fed.aggregator`` names, built from the ``fed`` config section."""
    if fed.aggregator not in _STRATEGIES:
        raise ValueError(f"unknown aggregator {fed.aggregator!r}; available: {', '.join(names())}")
    return _STRATEGIES[fed.aggregator](fed)


def aggregate(
    states: Sequence[State], weights: Sequence[float], how: str = "fedavg", trim_ratio: float = 0.2
) -> State:
    """Combine client states with a built-in stateless strategy by name (fedavg / median /
    trimmed_mean: none reads the reference, which is the first state here)."""
    strategy = build(SimpleNamespace(aggregator=how, trim_ratio=trim_ratio))
    return strategy(states[0] if states else {}, states, weights)


def finite(x) -> bool:
    """No NaN or Inf in ``x``: a tensor, or a dict / tuple of them (None and integer tensors
    pass; so does anything else, e.g. lists of token ids). The global state is never
    non-finite: a server checks what it is about to adopt."""
    if isinstance(x, torch.Tensor):
        return not x.is_floating_point() or bool(torch.isfinite(x).all())
    if isinstance(x, dict):
        return all(finite(v) for v in x.values())
    if isinstance(x, tuple):
        return all(finite(v) for v in x)
    return True


def update_norm(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """L2 norm of ``update - reference`` over all tensors (float64)."""
    total = 0.0
    for name, ref in reference.items():
        d = update[name].to(torch.float64) - ref.to(update[name].device, torch.float64)
        total += float((d * d).sum())
    return total**0.5


def update_problem(
    update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], max_norm: float = 0.0
) -> str | None:
    """Why ``update`` must be rejected against the global ``reference``, or None if it is fine.

    Checked in order: missing / unknown tensor names, shapes, dtypes, NaN/Inf, and (when
    ``max_norm > 0``) ``||update - reference||_2 > max_norm``. The reason is one short line."""
    missing = sorted(set(reference) - set(update))
    unknown = sorted(set(update) - set(reference))
    if missing or unknown:
        return f"missing tensors {missing[:3]}, unknown tensors {unknown[:3]}"
    for name, ref in reference.items():
        t = update[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            return f"tensor {name!r} is {t.dtype}{list(t.shape)}, expected {ref.dtype}{list(ref.shape)}"
        if not torch.isfinite(t).all():
            return f"tensor {name!r} holds NaN or Inf"
    if max_norm > 0:
        norm = update_norm(update, reference)
        if norm > max_norm:
            return f"update norm {norm:.4g} exceeds fed.max_update_norm={max_norm:.4g}"
    return None


def meta_problem(meta: dict, max_samples: float = math.inf) -> str | None:
    """Why a reply's metadata is unusable: ``num_samples`` must be a number in
    ``(0, max_samples]`` (the FedAvg weight: a client cannot claim more samples than the server
    knows it holds) and ``loss`` a finite number (or its decimal string); None when fine."""
    try:
        n, loss = float(meta["num_samples"]), float(meta["loss"])
    except (KeyError, TypeError, ValueError):
        return "metadata lacks a numeric num_samples or loss"
    if not (math.isfinite(n) and n > 0 and math.isfinite(loss)):
        return f"metadata num_samples={n} / loss={loss} out of range"
    if n > max_samples:
        return f"num_samples={n:.0f} exceeds the {max_samples:.0f} this client can have used"
    return None


def screen_updates(
    updates: dict[int, dict[str, torch.Tensor]],
    references: dict[int, dict[str, torch.Tensor]],
    max_norm: float = 0.0,
    metas: dict[int, dict] | None = None,
    max_ratio: float = 0.0,
    max_samples: dict[int, float] | None = None,
) -> tuple[list[int], dict[str, str]]:
    """Validate each client's update against its reference (what the server sent it) and,
    when given, its reply metadata (:func:`meta_problem`, with ``max_samples[cid]`` the most
    samples the server knows client ``cid`` can have used).

    With ``max_ratio > 0`` and at least 3 valid updates, an update whose norm
    ``||update - reference||`` is over ``max_ratio`` times the round's median norm is
    rejected too: the median of 3 or more is an honest client's unless most are malicious,
    so no scale needs tuning (``fed.max_update_ratio``; 2 clients cannot tell which is which).

    Returns ``(accepted client ids (sorted), {client id as str: reason} of the rejected)``."""
    accepted, rejected = [], {}
    for cid in sorted(updates):
        bound = (max_samples or {}).get(cid, math.inf)
        why = meta_problem(metas[cid], bound) if metas is not None else None
        why = why or update_problem(updates[cid], references[cid], max_norm)
        if why is None:
            accepted.append(cid)
        else:
            rejected[str(cid)] = why
    if max_ratio > 0 and len(accepted) >= 3:
        norms = {c: update_norm(updates[c], references[c]) for c in accepted}
        median = sorted(norms.values())[(len(norms) - 1) // 2]  # the lower median
        if median > 0:
            for c in [c for c in accepted if norms[c] > max_ratio * median]:
                accepted.remove(c)
                rejected[str(c)] = (
                    f"update norm {norms[c]:.4g} is over {max_ratio:g} x the round's median "
                    f"{median:.4g} (fed.max_update_ratio)"
                )
    return accepted, rejected
