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

``rank_policy=budget`` (:func:`choose_ranks`): each client declares the bytes per round it can
move; the server gives it the largest rank in 1, 2, 4, ... up to ``R`` whose a1 and a3
messages, encoded as on the wire, fit. Bandwidth is the budget that separates ranks: a rank
changes a client's FLOPs by the LoRA products alone, about 1% of a SmolLM2 step at rank 16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..aggregate import update_problem, weighted_average
from ..errors import ConfigError
from ..messages import PARAMETERS, SERVER, Message, client_name, encode

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


def received_rank(sent: State, full: State) -> int:
    """The rank ``r`` of an adapter a client received (its A factors' rows), 0 unless every
    tensor is exactly ``rank_slice(full, r)``-shaped with ``1 <= r <= R``."""
    a = [t for n, t in sent.items() if is_a(n)]
    r = a[0].shape[0] if a and a[0].dim() == 2 else 0
    top = next((t.shape[0] for n, t in full.items() if is_a(n)), 0)
    ok = 1 <= r <= top and not update_problem(sent, rank_slice(full, r))
    return r if ok else 0


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


def rank_bytes(init_state: State, r: int, num_samples: int) -> int:
    """Bytes a rank-``r`` client moves per round: a1's adapter down and a3's reply up, each
    encoded as on the wire (the reply's metadata with typical values)."""
    state, me = rank_slice(init_state, r), client_name(0)
    meta = {"num_samples": num_samples, "loss": 1 / 3, "steps": num_samples}
    down = encode(Message(PARAMETERS, 1, SERVER, me, state))
    return len(down) + len(encode(Message(PARAMETERS, 1, me, SERVER, state, meta)))


def choose_ranks(ctx) -> tuple[int, ...]:
    """Each client's LoRA rank: ``fedopt.client_ranks``, or (rank_policy=budget) the largest
    of 1, 2, 4, ... up to ``model.lora_r`` whose :func:`rank_bytes` fit its budget."""
    f, top = ctx.cfg.fedopt, ctx.cfg.model.lora_r
    if f.rank_policy != "budget":
        return tuple(f.client_ranks)
    choices = sorted({2**i for i in range(top.bit_length()) if 2**i <= top} | {top})
    cost: dict[tuple[int, int], int] = {}  # (rank, samples) -> bytes: clients share sizes

    def bytes_of(r: int, n: int) -> int:
        if (r, n) not in cost:
            cost[r, n] = rank_bytes(ctx.init_state, r, n)
        return cost[r, n]

    ranks = []
    for cid, budget in enumerate(f.client_bandwidth_budgets):
        n = int(ctx.data.client_sizes[cid])
        fits = [r for r in choices if bytes_of(r, n) <= budget]
        if not fits:
            need = bytes_of(1, n)
            raise ConfigError(
                f"config key fedopt.client_bandwidth_budgets: client {cid} has {budget:.3g} bytes "
                f"per round; rank 1 needs {need}"
            )
        ranks.append(max(fits))
    return tuple(ranks)
