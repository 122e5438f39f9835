"""FedLLM's research directions (the paper's Section IV.A), configured by ``[fedopt]``.

* :class:`ServerOptimizer`: FedAvgM and the adaptive FedOpt family (FedAdam, FedYogi,
  FedAdagrad) on the round's pseudo-gradient ``Δ = aggregate - global`` (Reddi et al. 2021)::

      avgm:     v = β v + Δ;                              x += η v
      adam:     m = β1 m + (1-β1) Δ;  v = β2 v + (1-β2) Δ²;  x += η m / (√v + τ)
      yogi:     m as adam;            v = v - (1-β2) Δ² sign(v - Δ²)
      adagrad:  m = Δ (no momentum);  v = v + Δ²

  with ``m = v = 0`` before the first round and no bias correction, as in the paper.
* :func:`drift_step`: what a client adds to its gradients before each optimizer step, FedProx's
  ``mu (w - w_global)`` and SCAFFOLD's ``c - c_i``.
* SCAFFOLD's control variates (option II): :func:`client_control` after local training,
  :func:`server_control` after aggregation.
* FFA-LoRA: :func:`frozen_names`, the A factors that stay at the shared initialization;
  FedSA-LoRA: :func:`personal_names`, the B factors each client keeps.
* Clients of different LoRA ranks (HetLoRA, FlexLoRA): :mod:`.ranks`; FLoRA's stacking, exact
  for equal ranks too: :mod:`.flora`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .config import FedOptConfig

State = dict[str, torch.Tensor]
CONTROL = "scaffold."  # prefix of the control variates' tensors in a message

__all__ = [
    "CONTROL",
    "FedOptConfig",
    "ServerOptimizer",
    "client_control",
    "drift_step",
    "frozen_names",
    "personal_names",
    "server_control",
    "server_optimizer",
    "split_control",
    "with_control",
]


class ServerOptimizer:
    """One server optimizer for a run; its moments are saved with the server's checkpoint."""

    def __init__(self, cfg: FedOptConfig, like: State | None = None) -> None:
        """Moments start at zero for the tensors of ``like`` (so that a checkpoint's are
        checked against their shapes), or for each tensor as it first steps."""
        self.cfg = cfg
        like = like or {}
        self.m: State = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in like.items()}
        self.v: State = {} if cfg.server_opt == "avgm" else dict(self.m)

    @torch.no_grad()
    def step(self, global_state: State, aggregate: State) -> State:
        """The new values of ``aggregate``'s tensors: the optimizer's step from ``global_state``
        along ``Δ = aggregate - global_state`` (float32 moments, per tensor name)."""
        c, out = self.cfg, {}
        for n, target in aggregate.items():
            x = global_state[n]
            d = (target - x).float()
            m = self.m.get(n, torch.zeros_like(d))
            v = self.v.get(n, torch.zeros_like(d))
            if c.server_opt == "avgm":
                m = c.server_momentum * m + d
                new = x + c.server_lr * m
            else:
                m = (
                    d
                    if c.server_opt == "adagrad"
                    else c.server_beta1 * m + (1 - c.server_beta1) * d
                )
                d2 = d * d
                if c.server_opt == "adagrad":
                    v = v + d2
                elif c.server_opt == "adam":
                    v = c.server_beta2 * v + (1 - c.server_beta2) * d2
                else:  # yogi: v moves toward Δ² by at most (1 - β2) Δ² a round
                    v = v - (1 - c.server_beta2) * d2 * torch.sign(v - d2)
                new = x + c.server_lr * m / (v.sqrt() + c.server_tau)
                self.v[n] = v
            self.m[n] = m
            out[n] = new.to(x.dtype)
        return out

    def state_dict(self) -> dict:
        return {"m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, d: dict, device) -> None:
        self.m = {n: t.to(device) for n, t in d["m"].items()}
        self.v = {n: t.to(device) for n, t in d["v"].items()}


def server_optimizer(cfg, like: State) -> ServerOptimizer | None:
    """The run's server optimizer over the tensors of ``like``, or None (plain aggregation)."""
    return ServerOptimizer(cfg.fedopt, like) if cfg.fedopt.server_opt != "none" else None


@torch.no_grad()
def drift_step(
    named: Iterable[tuple[str, torch.nn.Parameter]],
    mu: float = 0.0,
    anchor: State | None = None,
    correction: State | None = None,
) -> None:
    """Add the drift terms to the gradients of ``named`` parameters (after backward, before
    the optimizer step): ``mu (w - anchor)``, the gradient of FedProx's ``mu/2 ||w - anchor||²``,
    and SCAFFOLD's ``correction = c - c_i``."""
    for n, p in named:
        if p.grad is None:
            continue
        if mu and anchor is not None and n in anchor:
            p.grad.add_(p.detach() - anchor[n].to(p.device), alpha=mu)
        if correction is not None and n in correction:
            p.grad.add_(correction[n].to(p.device, p.grad.dtype))


@torch.no_grad()
def client_control(
    start: State, trained: State, c: State, c_i: State, steps: int, lr: float
) -> tuple[State, State]:
    """SCAFFOLD option II after ``steps`` local SGD steps of rate ``lr`` from ``start`` to
    ``trained``: ``c_i+ = c_i - c + (start - trained) / (steps lr)``. Returns ``c_i+`` and
    the change ``c_i+ - c_i`` that the client uploads."""
    scale = 1.0 / (max(steps, 1) * lr)
    new = {n: c_i[n] - c[n] + (start[n] - trained[n]).float() * scale for n in c}
    return new, {n: new[n] - c_i[n] for n in c}


@torch.no_grad()
def server_control(c: State, changes: list[State], num_clients: int | dict[str, int]) -> State:
    """SCAFFOLD's server update ``c += (|S| / N) mean_S(Δc_i) = (1 / N) sum_S Δc_i``, per
    tensor over the changes that hold it (split learning: N = the clients owning the tensor)."""
    out = {}
    for n, t in c.items():
        total = num_clients if isinstance(num_clients, int) else num_clients[n]
        out[n] = t + sum(d[n] for d in changes if n in d) / total
    return out


def with_control(state: State, control: State) -> State:
    """A message's tensors: the adapter and SCAFFOLD's control variates (``scaffold.*``)."""
    return {**state, **{CONTROL + n: t for n, t in control.items()}}


def split_control(tensors: State) -> tuple[State, State]:
    """Inverse of :func:`with_control`: the adapter, and the control variates by name."""
    state = {n: t for n, t in tensors.items() if not n.startswith(CONTROL)}
    return state, {n[len(CONTROL) :]: t for n, t in tensors.items() if n.startswith(CONTROL)}


def frozen_names(state: State) -> list[str]:
    """FFA-LoRA: the LoRA A factors (``... .lora_A. ...``), frozen at the shared init."""
    return [n for n in state if ".lora_A." in n]


def personal_names(state: State) -> list[str]:
    """FedSA-LoRA: the LoRA B factors (``... .lora_B. ...``), each client's own."""
    return [n for n in state if ".lora_B." in n]
