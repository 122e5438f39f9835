"""Client-level differential privacy on averaged LoRA updates (DP-FedAvg).

A client's update is ``Δ_i = state_i - global`` over every exchanged tensor (LoRA A and B, the
head), flattened. Clipping scales it to L2 norm at most ``C``:
``clip(Δ, C) = Δ · min(1, C / ||Δ||)``.

* **central** (McMahan et al. 2018, "Learning differentially private recurrent language
  models"): the server clips each update and releases

      global' = global + (sum_{i in replied} clip(Δ_i, C) + N(0, (z C)^2 I)) / m

  with ``m`` the number of clients *sampled* for the round, fixed before anyone replies, so
  that one client's presence changes the sum by at most ``C`` (sensitivity ``C``; the mean is
  unweighted: a sample-count weight would scale a client's influence past ``C``). The
  accountant composes the rounds' sampled Gaussian mechanisms (:mod:`.accountant`).
  Guarantee: with respect to replacing one client's whole data, against anyone who sees the
  global models; the server itself is trusted (it sees the raw updates).
* **adaptive clipping** (Andrew et al. 2021, "Differentially private learning with adaptive
  clipping"): the server also releases the noisy fraction of unclipped updates
  ``b = (sum_i 1[||Δ_i|| <= C] + N(0, σ_b^2)) / m`` and moves
  ``C <- C · exp(-η (b - γ))``. The two releases together cost what one Gaussian mechanism of
  multiplier ``z`` costs when the update noise uses ``z_Δ = (z^-2 - (2 σ_b)^-2)^(-1/2)``
  (their Theorem 1), so the accountant still uses ``z``.
* **local**: each client clips its own update and adds ``N(0, (z C)^2 I)`` before it leaves
  the device; the server averages what it receives (post-processing). Guarantee: for each
  client, with respect to replacing its whole data, against everyone including the server,
  composed over the rounds that client took part in.

Noise comes from a generator seeded by the OS (``secrets``), not by the run's seed: anyone
who knows a seed could subtract seeded noise. ``privacy.reproducible_noise=true`` seeds it from
the run seed instead (tests, resume-identical runs; the guarantee then assumes the seed is
secret). Like Opacus's default mode, the Gaussian samples are floating point and do not defend
against Mironov's (2012) floating-point attack.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import torch

from .. import seeds

State = dict[str, torch.Tensor]


def delta_of(state: State, reference: State) -> State:
    """``state - reference`` for each tensor of ``state``, in float32 (a client's update)."""
    return {k: v.float() - reference[k].to(v.device).float() for k, v in state.items()}


def norm_of(delta: State) -> float:
    """The L2 norm of all tensors of ``delta`` together (float64 accumulation)."""
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in delta.values()))


def clip(delta: State, bound: float) -> tuple[State, float]:
    """``(delta · min(1, bound / ||delta||), ||delta||)``: the clipped update and its norm."""
    n = norm_of(delta)
    factor = min(1.0, bound / n) if n > 0 else 1.0
    return {k: v * factor for k, v in delta.items()}, n


def generator(reproducible: bool, stream: tuple[int, ...]) -> torch.Generator:
    """The noise generator: OS-seeded, or seeded from ``stream`` (:data:`seeds.DP_NOISE`)."""
    seed = seeds.torch_seed(stream) if reproducible else secrets.randbits(63)
    return torch.Generator().manual_seed(seed)


def gaussian(template: State, std: float, gen: torch.Generator) -> State:
    """Independent ``N(0, std^2)`` noise shaped like ``template`` (float32, drawn on CPU so
    that the stream does not depend on the device, then moved to each tensor's device)."""
    return {
        k: (torch.randn(v.shape, generator=gen) * std).to(v.device) for k, v in template.items()
    }


def add(a: State, b: State) -> State:
    return {k: a[k] + b[k] for k in a}


def scale(a: State, s: float) -> State:
    return {k: v * s for k, v in a.items()}


def apply(reference: State, delta: State) -> State:
    """``reference + delta`` in each reference tensor's dtype."""
    return {k: (ref.float() + delta[k]).to(ref.dtype) for k, ref in reference.items()}


def update_noise_multiplier(z: float, count_std: float) -> float:
    """Andrew et al.'s ``z_Δ = (z^-2 - (2 σ_b)^-2)^(-1/2)``: the update noise that, together
    with count noise ``σ_b``, costs a multiplier-``z`` Gaussian mechanism. Needs
    ``z < 2 σ_b``; ``z = 0`` (no noise) stays 0."""
    if z == 0:
        return 0.0
    if z >= 2 * count_std:
        raise ValueError(
            f"noise multiplier {z:.4g} needs privacy.count_noise above {z / 2:.4g} "
            f"(it is {count_std:.4g}) for adaptive clipping"
        )
    return (z**-2 - (2 * count_std) ** -2) ** -0.5


def clipped_sum(
    reference: State, states: Sequence[State], bound: float
) -> tuple[State, list[float]]:
    """``sum_i clip(Δ_i, bound)`` over every tensor of ``reference`` and each update's norm
    before clipping. A state may hold only some tensors (split learning: a client uploads the
    LoRA of its own blocks); its update is clipped as one vector."""
    total = {k: torch.zeros(v.shape, device=v.device) for k, v in reference.items()}
    norms = []
    for s in states:
        d, n = clip(delta_of(s, reference), bound)
        for k, v in d.items():
            total[k] += v
        norms.append(n)
    return total, norms


def noisy_mean(
    reference: State, total: State, sampled: int | dict[str, int], std: float, gen
) -> State:
    """``reference + (total + N(0, std^2)) / sampled`` (``sampled[t]`` per tensor: the sampled
    clients that own it; an int: all own every tensor)."""
    total = add(total, gaussian(reference, std, gen))
    count = sampled if isinstance(sampled, dict) else dict.fromkeys(reference, sampled)
    return apply(reference, {k: v / count[k] for k, v in total.items()})


def privatize_local(
    state: State, reference: State, bound: float, z: float, gen: torch.Generator
) -> tuple[State, float]:
    """Local DP: the client's upload ``reference + clip(Δ) + N(0, (z·bound)^2)`` and ``||Δ||``."""
    d, n = clip(delta_of(state, reference), bound)
    return apply(reference, add(d, gaussian(reference, z * bound, gen))), n


def next_clip(bound: float, unclipped: int, sampled: int, cfg, count_std: float, gen) -> float:
    """Andrew et al.'s geometric update of the clip bound from the noisy unclipped fraction."""
    noisy = (unclipped + float(torch.randn((), generator=gen)) * count_std) / sampled
    return bound * math.exp(-cfg.clip_lr * (noisy - cfg.target_quantile))
