"""Sample-level DP-SGD for a client's training on its private data (``privacy.dpsgd``).

Opacus does the per-sample work: :class:`opacus.GradSampleModule` computes each sample's
gradient of the trainable tensors (LoRA A/B, the head) and :class:`opacus.optimizers.DPOptimizer`
clips each to ``privacy.dpsgd_clip``, sums, adds ``N(0, (z C)^2)`` and divides by the expected
batch size before the wrapped optimizer (Adam) steps. Batches are Poisson samples: every step
takes each of the client's N samples with probability ``q = train.batch_size / N`` (the
sampling the accountant assumes), so a batch's size varies and may be 0 (no step is taken:
the model then depends on no data at that step). The epsilon of a client's samples after T
such steps is dp-accounting's for T Poisson-sampled Gaussians of rate q and multiplier z
(:func:`.accountant.poisson_epsilon`; add or remove one sample); each client reports its own,
the run the largest. It covers the training on private data (FedLLM a2, KD b1): a client's
uploads are post-processing of those steps. KD's public-set logits and distillation read no
private data.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import torch

from . import accountant


def _opacus():
    try:
        import opacus
        from opacus.optimizers import DPOptimizer
    except ImportError:  # pragma: no cover - the [privacy] extra installs it
        from ..errors import ConfigError

        raise ConfigError("privacy.dpsgd needs opacus: pip install 'fedtune[privacy]'") from None
    return opacus.GradSampleModule, DPOptimizer


def plan(cfg, n: int) -> tuple[float, int, float]:
    """DP-SGD for a client with ``n`` private samples: ``(q, Poisson steps per round, z)``."""
    t = cfg.train
    q = min(1.0, t.batch_size / n)
    steps = t.local_epochs * -(-n // t.batch_size)
    return q, steps, noise_multiplier(cfg.privacy, q, steps * cfg.fed.rounds)


def report(cfg, n: int, rounds_taken: int) -> dict:
    """A client's ``sample_epsilon`` after ``rounds_taken`` rounds of private training on
    ``n`` samples, for its reply; {} without ``privacy.dpsgd``."""
    if not cfg.privacy.dpsgd:
        return {}
    q, steps, z = plan(cfg, n)
    eps = sample_epsilon(z, q, steps * rounds_taken, cfg.privacy.delta)
    return {"sample_epsilon": eps if math.isfinite(eps) else None}


def noise_multiplier(p, q: float, steps: int) -> float:
    """``privacy.dpsgd_noise``, or the multiplier that reaches ``dpsgd_target_epsilon`` after
    ``steps`` steps at rate ``q``."""
    if p.dpsgd_target_epsilon == 0:
        return p.dpsgd_noise
    return accountant.calibrate_poisson(p.dpsgd_target_epsilon, q, steps, p.delta)


def poisson_batches(idx: np.ndarray, q: float, steps: int, rng: np.random.Generator):
    """``steps`` Poisson batches of ``idx``: each sample in each with probability ``q``."""
    for _ in range(steps):
        yield idx[rng.random(len(idx)) < q]


@contextlib.contextmanager
def private_training(model, optimizer, p, z: float, batch_size: int, gen: torch.Generator):
    """Per-sample gradients on ``model`` (hooks removed on exit) and ``optimizer`` wrapped in
    Opacus's DP optimizer; yields the optimizer to step with."""
    gsm_cls, dp_opt = _opacus()
    with warnings.catch_warnings():  # Opacus warns about its secure_mode being off
        warnings.simplefilter("ignore", UserWarning)
        gsm = gsm_cls(model, batch_first=True, loss_reduction="mean", strict=False)
        opt = dp_opt(
            optimizer,
            noise_multiplier=z,
            max_grad_norm=p.dpsgd_clip,
            expected_batch_size=batch_size,
            loss_reduction="mean",
            generator=gen,
        )
    try:
        with warnings.catch_warnings():  # Opacus's hooks on frozen inputs: expected
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield opt
    finally:
        for param in model.parameters():  # no per-sample state left on the shared model
            for attr in ("grad_sample", "_current_grad_sample", "summed_grad"):
                if hasattr(param, attr):
                    delattr(param, attr)
        gsm._close()


def sample_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    """Epsilon of a client's samples after ``steps`` DP-SGD steps (0 before any)."""
    if steps == 0:
        return 0.0
    return float("inf") if z == 0 else accountant.poisson_epsilon(z, q, steps, delta)
