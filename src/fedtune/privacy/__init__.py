"""Privacy: client-level differential privacy with an accountant (:mod:`.dp`,
:mod:`.accountant`), configured by the ``[privacy]`` section (:mod:`.config`).

Frameworks that average client updates (FedLLM; Split-FedLLM's client LoRA) hold one
:class:`ClientLevelDP` on the server: it aggregates under central DP, keeps the clip bound
(adaptive clipping) and the accountant's inputs, and reports ``dp_epsilon`` every round. Under
local DP the clients call :func:`privatize` on their own upload.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import seeds
from . import accountant, dp
from .config import PrivacyConfig

State = dict[str, torch.Tensor]

__all__ = ["ClientLevelDP", "PrivacyConfig", "privatize", "round_size"]


def round_size(cfg) -> int:
    """How many clients each round samples (:func:`fedtune.runtime.records.sample_clients`)."""
    n, f = cfg.data.num_clients, cfg.fed
    return min(n, max(f.min_clients, int(round(f.fraction_fit * n))))


def noise_multiplier(cfg) -> float:
    """``privacy.noise``, or the one calibrated to ``privacy.target_epsilon``."""
    p = cfg.privacy
    if p.dp == "off" or p.target_epsilon == 0:
        return p.noise
    s = None if p.dp == "local" else accountant.Sampling(cfg.data.num_clients, round_size(cfg))
    return accountant.calibrate(p.target_epsilon, cfg.fed.rounds, p.delta, s)


def privatize(cfg, state: State, reference: State, rnd: int, cid: int) -> tuple[State, float]:
    """Local DP, on the client: its upload ``reference + clip(Δ, C) + N(0, (z C)^2)`` with
    ``z`` from the client's own config (a server cannot turn the noise down), and ``||Δ||``."""
    p = cfg.privacy
    gen = dp.generator(p.reproducible_noise, (cfg.seed, rnd, seeds.DP_NOISE, cid))
    return dp.privatize_local(state, reference, p.clip, noise_multiplier(cfg), gen)


class ClientLevelDP:
    """The server's side of client-level DP for one run (``privacy.dp`` central or local)."""

    def __init__(self, cfg) -> None:
        self.cfg, self.p = cfg, cfg.privacy
        self.sampling = accountant.Sampling(cfg.data.num_clients, round_size(cfg))
        self.z = noise_multiplier(cfg)
        self.count_std = self.p.count_noise or self.sampling.sampled / 20
        self.z_update = self.z
        if self.p.adaptive_clip:
            try:
                self.z_update = dp.update_noise_multiplier(self.z, self.count_std)
            except ValueError as e:
                from ..errors import ConfigError

                raise ConfigError(f"config key privacy.count_noise: {e}") from None
        self.clip = self.p.clip
        self.rounds = 0  # central: rounds released
        self.taken: dict[int, int] = {}  # local: rounds each client took part in

    @property
    def central(self) -> bool:
        return self.p.dp == "central"

    def aggregate(
        self, rnd: int, reference: State, states: Sequence[State], sampled: int | dict[str, int]
    ) -> tuple[State, dict]:
        """Central DP-FedAvg of the accepted ``states`` over the ``sampled`` clients (per
        tensor, when clients own different tensors: :func:`.dp.central_mean`)."""
        gen = dp.generator(self.p.reproducible_noise, (self.cfg.seed, rnd, seeds.DP_NOISE))
        clip = self.clip
        new, norms = dp.central_mean(reference, states, sampled, clip, self.z_update, gen)
        unclipped = sum(n <= clip for n in norms)
        if self.p.adaptive_clip:
            m = self.sampling.sampled
            self.clip = dp.next_clip(clip, unclipped, m, self.p, self.count_std, gen)
        self.rounds += 1
        return new, {"dp_clip": clip, "dp_clipped": len(norms) - unclipped}

    def count_local(self, clients: Sequence[int]) -> None:
        """Local DP: these clients' privatized uploads were used this round."""
        for c in clients:
            self.taken[c] = self.taken.get(c, 0) + 1

    def epsilon(self) -> float:
        """Epsilon at ``privacy.delta`` so far (local: the largest over the clients)."""
        if self.central:
            return accountant.central_epsilon(self.z, self.rounds, self.sampling, self.p.delta)
        most = max(self.taken.values(), default=0)
        return accountant.local_epsilon(self.z, most, self.p.delta)

    def metrics(self) -> dict:
        eps = self.epsilon()
        return {
            "dp_epsilon": eps if math.isfinite(eps) else None,
            "dp_delta": self.p.delta,
            "dp_noise_multiplier": self.z,
            "dp_adjacency": self.sampling.adjacency,
        }

    def state_dict(self) -> dict:
        return {"clip": self.clip, "rounds": self.rounds, "taken": dict(self.taken)}

    def load_state_dict(self, d: dict) -> None:
        self.clip, self.rounds = float(d["clip"]), int(d["rounds"])
        self.taken = {int(k): int(v) for k, v in d["taken"].items()}
