"""Privacy: client-level differential privacy with an accountant (:mod:`.dp`,
:mod:`.accountant`), configured by the ``[privacy]`` section (:mod:`.config`).

Frameworks that average client updates (FedLLM; Split-FedLLM's client LoRA) hold one
:class:`ClientLevelDP` on the server: it aggregates under central DP, keeps the clip bound
(adaptive clipping) and the accountant's inputs, and reports ``dp_epsilon`` every round. Under
local DP the clients call :func:`privatize` on their own upload.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence

import numpy as np
import torch

from .. import seeds
from . import accountant, dp
from .config import PrivacyConfig

State = dict[str, torch.Tensor]

__all__ = [
    "ClientLevelDP",
    "PrivacyConfig",
    "contribution",
    "largest_reported",
    "privatize",
    "round_size",
    "secure_aggregate",
    "secure_mean",
    "secure_session",
]


def round_size(cfg) -> int:
    """How many clients each round samples (:func:`fedtune.runtime.records.sample_size`)."""
    from ..runtime.records import sample_size  # late: the runtime imports the frameworks

    return sample_size(cfg.data.num_clients, cfg.fed.fraction_fit, cfg.fed.min_clients)


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
        tensor, when clients own different tensors: :func:`.dp.noisy_mean`): the server clips."""
        total, norms = dp.clipped_sum(reference, states, self.clip)
        unclipped = sum(n <= self.clip for n in norms)
        new, metrics = self.release(rnd, reference, total, unclipped, sampled)
        return new, {**metrics, "dp_clipped": len(norms) - unclipped}

    def release(
        self, rnd: int, reference: State, total: State, unclipped: int, sampled
    ) -> tuple[State, dict]:
        """The round's DP release from the sum of clipped updates (clipped by the server, or
        by the clients under secure aggregation, which sums their unclipped bits too): noise,
        divide by the sampled count, then (adaptive) move the clip bound."""
        gen = dp.generator(self.p.reproducible_noise, (self.cfg.seed, rnd, seeds.DP_NOISE))
        clip = self.clip
        new = dp.noisy_mean(reference, total, sampled, self.z_update * clip, gen)
        if self.p.adaptive_clip:
            m = self.sampling.sampled
            self.clip = dp.next_clip(clip, unclipped, m, self.p, self.count_std, gen)
        self.rounds += 1
        return new, {"dp_clip": clip}

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


def largest_reported(metas: Sequence[dict], key: str) -> float | None:
    """The largest epsilon the clients reported under ``key`` (DP-SGD's ``sample_epsilon``,
    Split's ``activation_epsilon``: each client accounts for its own samples). None when a
    reply lacks a finite, non-negative number: the run then states no bound."""
    eps = [m.get(key) for m in metas]
    ok = [e for e in eps if isinstance(e, int | float) and not isinstance(e, bool)]
    ok = [e for e in ok if 0 <= e < math.inf]
    return max(ok) if eps and len(ok) == len(eps) else None


def secure_extras(cfg) -> int:
    """Values after the update in a secure-aggregation vector: the weight (and, central DP,
    the client's unclipped bit, which adaptive clipping counts)."""
    return 2 if cfg.privacy.dp == "central" else 1


def contribution(cfg, state: State, reference: State, server_meta: dict, weight: float, rnd, cid):
    """What a client feeds into the secure sum (uint64 [D + extras], fixed point): its update
    clamped to ``±secagg_clamp``, times its FedAvg weight, then the weight. Central DP: clipped
    to the bound the server sent, weight 1, then the unclipped bit; local DP: privatized first."""
    from ..errors import MessageError
    from . import secagg

    p, names = cfg.privacy, sorted(reference)
    if p.dp == "central":
        bound = server_meta.get("clip")
        if not isinstance(bound, int | float) or not 0 < bound < math.inf:
            raise MessageError("secure aggregation: the server sent no valid clip bound")
        d, n = dp.clip(dp.delta_of(state, reference), float(bound))
        weight, extras = 1.0, [1.0, float(n <= bound)]
    else:
        if p.dp == "local":
            state, _ = privatize(cfg, state, reference, rnd, cid)
        d, extras = dp.delta_of(state, reference), [weight]
    v, _ = secagg.clamp(secagg.flat(d, names), p.secagg_clamp)
    return secagg.encode(np.concatenate([weight * v, extras]), p.secagg_bits)


def secure_session(cfg, state: State, reference: State, server_meta: dict, weight: float, rnd, cid):
    """A client's session of this round's secure sum over its :func:`contribution` (its
    trained ``state`` against the ``reference`` it received); None when the server's request
    is unusable (the client then does not answer)."""
    from ..errors import MessageError
    from . import secagg

    try:
        x = contribution(cfg, state, reference, server_meta, weight, rnd, cid)
    except MessageError:
        return None
    return secagg.ClientSession(cfg.privacy, rnd, cid, x)


def secure_mean(cfg, dpc, rnd: int, reference: State, result, claimed: float, sampled: int):
    """The new global state from a secure sum (:class:`.secagg.SumResult`) and the round's
    metrics; None when the sum fails its checks. ``claimed``: the weight the contributing
    clients announced (their sample counts; central DP: their number)."""
    from . import secagg

    p, names = cfg.privacy, sorted(reference)
    metrics: dict = {"secagg_clients": len(result.clients)}
    if result.total is None:
        return None, {**metrics, "secagg_failed": result.failed}
    s = secagg.decode(result.total, p.secagg_bits)
    d = len(s) - secure_extras(cfg)
    weight = s[d]
    n, slack = len(result.clients), len(result.clients) * 2.0**-p.secagg_bits
    out = abs(weight - claimed) > slack or np.abs(s[:d]).max(initial=0) > p.secagg_clamp * weight
    if dpc is not None and dpc.central:  # the summed unclipped bits: a count of the clients
        out = out or not -slack <= s[d + 1] <= n + slack
    if out:
        return None, {**metrics, "secagg_failed": "the secure sum is out of range"}
    total = secagg.unflat(s[:d], reference, names)
    if dpc is not None and dpc.central:
        unclipped = int(round(s[d + 1]))
        new, m = dpc.release(rnd, reference, total, unclipped, sampled)
        return new, {**metrics, **m, "dp_clipped": n - unclipped}
    if dpc is not None:
        dpc.count_local(result.clients)
    return dp.apply(reference, dp.scale(total, 1.0 / weight)), metrics


def secure_aggregate(
    cfg, dpc, rnd: int, reference: State, replies: dict, sizes: dict[int, float], sampled: int
) -> Generator[dict, dict, tuple[State | None, dict, dict[int, dict]]]:
    """The aggregation step under secure aggregation, after the round's first replies (each
    client's keys and metadata, kind ``secagg``): check them (a client cannot claim more than
    its ``sizes[cid]`` samples), run the secure sum's steps 2-4 (:func:`.secagg.server_sum`)
    and decode it (:func:`secure_mean`). Returns the new ``reference``-shaped state (None when
    the sum failed), the round's metrics and the contributing clients' metadata by id."""
    from ..aggregate import meta_problem
    from ..messages import SECAGG
    from ..models import num_params
    from . import secagg

    keys, rejected = {}, {}
    for c, m in replies.items():
        why = meta_problem(m.meta, sizes[c])
        if m.kind != SECAGG:
            why = f"expected secure aggregation keys, got {m.kind[:20]!r}"
        if why:
            rejected[str(c)] = why
        else:
            keys[c] = m
    dim = num_params(reference) + secure_extras(cfg)
    result = yield from secagg.server_sum(cfg, rnd, keys, dim)
    metas = {c: keys[c].meta for c in result.clients}
    central = dpc is not None and dpc.central
    claimed = sum(1.0 if central else float(m["num_samples"]) for m in metas.values())
    new, metrics = secure_mean(cfg, dpc, rnd, reference, result, claimed, sampled)
    metrics.update(rejected=len(rejected), rejected_reasons=rejected)
    if dpc is not None:
        metrics.update(dpc.metrics())
    return new, metrics, metas
