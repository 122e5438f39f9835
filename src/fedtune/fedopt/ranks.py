"""Clients with different LoRA ranks (``fedopt.client_ranks``): HetLoRA and FlexLoRA.

The global adapter has rank ``R = model.lora_r`` (the largest client rank). A client of rank
``r`` gets and returns the first ``r`` ranks only: ``A [r, in] = A_global[:r]`` and
``B [out, r] = B_global[:, :r]``; it trains them zero-padded to ``R``. The padded rows stay
exactly zero: their gradients are ``dL/dA[j] ∝ B[:, j]ᵀ (...) = 0`` and
``dL/dB[:, j] ∝ (A[j] x) = 0``, and Adam, weight decay and clipping keep a zero that has zero
gradient at zero. So every executor (the batched one too) trains a rank-``r`` client exactly.

* ``hetlora`` (Cho et al. 2024): the server zero-pads the uploads to ``R`` and averages them
  (``fed.aggregator``) coordinate-wise; rank ``j`` of the global adapter is trained by the
  clients of rank ``> j`` only and averaged with the zeros of the others.
* ``flexlora`` (Bai et al. 2024): per LoRA module, the server averages the full products
  ``ΔW = Σ w_i B_i A_i / Σ w_i`` and factors their SVD ``ΔW = U S Vᵀ`` back to rank ``R``:
  ``B = U_R S_R^½``, ``A = S_R^½ V_Rᵀ``. A client of rank ``r`` gets the first ``r`` of them,
  the best rank-``r`` approximation of ``ΔW`` (Eckart-Young): its squared Frobenius error is
  the sum of the discarded ``σ²``.

Bytes are counted as sent: a rank-``r`` client moves ``r / R`` of the LoRA bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..aggregate import weighted_average

State = dict[str, torch.Tensor]


def is_a(name: str) -> bool:
    return ".lora_A." in name


def is_b(name: str) -> bool:
    return ".lora_B." in name


def rank_slice(state: State, r: int) -> State:
    """The first ``r`` ranks of every LoRA factor (A's rows, B's columns); others as they are."""
    out = {}
    for n, t in state.items():
        out[n] = t[:r] if is_a(n) else t[:, :r] if is_b(n) else t
    return out


def rank_pad(state: State, like: State) -> State:
    """``state`` zero-padded to the shapes of ``like`` (the rank-``R`` tensors)."""
    out = {}
    for n, t in state.items():
        full = like[n]
        if t.shape == full.shape:
            out[n] = t
            continue
        z = torch.zeros_like(full)
        if is_a(n):
            z[: t.shape[0]] = t
        else:
            z[:, : t.shape[1]] = t
        out[n] = z
    return out


def svd_factors(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B [out, r], A [r, in], σ)``: the rank-``r`` truncated SVD of ``delta [out, in]``
    split evenly (``B = U_r S_r^½``, ``A = S_r^½ V_rᵀ``), and all singular values."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = s[:r].sqrt()
    return (u[:, :r] * root).to(delta.dtype), (root[:, None] * vh[:r]).to(delta.dtype), s


def flexlora(reference: State, states: Sequence[State], weights: Sequence[float]) -> State:
    """FlexLoRA's aggregate of zero-padded client states: each module's ``(B, A)`` from the
    SVD of the weighted mean of the clients' products; other tensors (the head) averaged."""
    out = weighted_average(
        [{n: s[n] for n in s if not (is_a(n) or is_b(n))} for s in states], weights
    )
    total = float(sum(weights))
    for a_name in (n for n in reference if is_a(n)):
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        r = reference[a_name].shape[0]
        delta = sum(
            (w / total) * (s[b_name].double() @ s[a_name].double())
            for s, w in zip(states, weights, strict=True)
        )
        b, a, _ = svd_factors(delta, r)
        out[a_name], out[b_name] = a.to(reference[a_name].dtype), b.to(reference[b_name].dtype)
    return out
