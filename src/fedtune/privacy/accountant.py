"""Privacy accounting for client-level DP with Google's ``dp_accounting`` (RDP accountant).

No formula here is hand-written: each round is a ``dp_accounting`` event and the accountant
composes them. Adjacency is *replacing one client's data* everywhere: fedtune samples a fixed
number of clients without replacement, and the exact accounting of that sampling
(``SampledWithoutReplacementDpEvent``, Wang, Balle, Kasiviswanathan 2019) is defined for
replace-one only; the number of clients is public. Replacing a client moves the clipped sum
by up to ``2C``, so a noise of std ``z C`` is a Gaussian mechanism of multiplier ``z / 2``.
(TFF and Flower account add-or-remove one client with Poisson sampling, which reports smaller
epsilons for the same noise.)

* central, every client every round (``fed.fraction_fit = 1``): one ``Gaussian(z / 2)`` per
  round;
* central, ``m`` of ``n`` clients sampled: ``SampledWithoutReplacementDpEvent(n, m,
  Gaussian(z / 2))`` per round;
* local: per client, a ``Gaussian(z / 2)`` for each round it took part in (no sampling
  amplification: it knows it was picked); the reported epsilon is the largest over the
  clients.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


def _lib():
    try:
        import dp_accounting
        from absl import logging as absl_logging
    except ImportError:  # pragma: no cover - the [privacy] extra is installed in CI
        from ..errors import ConfigError

        raise ConfigError(
            "differential privacy needs dp-accounting: pip install 'fedtune[privacy]'"
        ) from None
    # it logs every RDP order it drops as not converging (small orders at small q): expected
    absl_logging.set_verbosity(absl_logging.ERROR)
    return dp_accounting


@dataclass(frozen=True)
class Sampling:
    """How clients are drawn each round: ``sampled`` of ``population`` without replacement."""

    population: int
    sampled: int

    adjacency = "replace one client's data"


def _round_event(z: float, s: Sampling):
    dpa = _lib()
    if s.sampled >= s.population:
        return dpa.GaussianDpEvent(z / 2)
    return dpa.SampledWithoutReplacementDpEvent(s.population, s.sampled, dpa.GaussianDpEvent(z / 2))


def _accountant():
    dpa = _lib()
    return dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)


def central_epsilon(z: float, rounds: int, s: Sampling, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` central DP rounds of noise multiplier ``z``
    (``inf`` without noise; 0 before the first round)."""
    if rounds == 0:
        return 0.0
    if z == 0:
        return float("inf")
    acc = _accountant()
    acc.compose(_round_event(z, s), rounds)
    return float(acc.get_epsilon(delta))


def gaussian_epsilon(z: float, count: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``count`` Gaussian releases of noise multiplier ``z`` (noise std
    over the release's L2 sensitivity), without sampling."""
    if count == 0:
        return 0.0
    if z == 0:
        return float("inf")
    dpa = _lib()
    acc = _accountant()
    acc.compose(dpa.GaussianDpEvent(z), count)
    return float(acc.get_epsilon(delta))


def local_epsilon(z: float, participations: int, delta: float) -> float:
    """Epsilon at ``delta`` of one client's uploads after it took part ``participations`` times
    in local DP with noise multiplier ``z`` (sensitivity ``2C``: multiplier ``z / 2``)."""
    return gaussian_epsilon(z / 2, participations, delta)


def poisson_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``steps`` Poisson-subsampled Gaussian mechanisms (rate ``q``,
    noise multiplier ``z``; add or remove one record): DP-SGD's accounting."""
    dpa = _lib()
    acc = dpa.rdp.RdpAccountant()
    acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps)
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def calibrate(target: float, rounds: int, delta: float, s: Sampling | None) -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` rounds is at most
    ``target``: central DP with sampling ``s``, or local DP (``s`` None, a client in every
    round)."""
    dpa = _lib()

    def event(z: float):
        if s is None:
            return dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z / 2), rounds)
        return dpa.SelfComposedDpEvent(_round_event(z, s), rounds)

    bracket = dpa.LowerEndpointAndGuess(1e-3, 1.0)
    return float(dpa.calibrate_dp_mechanism(_accountant, event, target, delta, bracket, tol=1e-4))


@functools.lru_cache(maxsize=64)
def calibrate_poisson(target: float, q: float, steps: int, delta: float) -> float:
    """The smallest noise multiplier whose DP-SGD epsilon after ``steps`` Poisson steps of
    rate ``q`` is at most ``target``."""
    dpa = _lib()

    def event(z: float):
        return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps)

    bracket = dpa.LowerEndpointAndGuess(1e-3, 1.0)
    fresh = dpa.rdp.RdpAccountant
    return float(dpa.calibrate_dp_mechanism(fresh, event, target, delta, bracket, tol=1e-4))
