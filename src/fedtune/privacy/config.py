"""The ``[privacy]`` config section: client-level differential privacy and secure aggregation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import check, opt


@dataclass(frozen=True)
class PrivacyConfig:
    """Privacy options (section ``[privacy]``); see :mod:`fedtune.privacy`."""

    dp: str = opt(
        "off",
        "client-level differential privacy on the averaged LoRA update (FedLLM; Split-FedLLM's "
        "client LoRA): 'central' (each update clipped to privacy.clip, Gaussian noise on their "
        "sum at the server) or 'local' (each client clips and noises its own update)",
        ("off", "central", "local"),
    )
    clip: float = opt(
        1.0, "L2 bound C on a client's update ||state - global|| (initial C when adaptive)"
    )
    noise: float = opt(
        1.0,
        "noise multiplier z: Gaussian noise of std z * C on the sum of clipped updates "
        "(central) or on each clipped update (local)",
    )
    target_epsilon: float = opt(
        0.0,
        "calibrate privacy.noise so that epsilon after fed.rounds rounds is this (at "
        "privacy.delta, with the round's client sampling); 0 = use privacy.noise as given",
    )
    delta: float = opt(1e-5, "delta of the (epsilon, delta) guarantee reported every round")
    adaptive_clip: bool = opt(
        False,
        "central DP: move C each round toward the privacy.target_quantile of update norms "
        "(Andrew et al. 2021, geometric update; the clipped count is noised too)",
    )
    target_quantile: float = opt(0.5, "adaptive clipping: fraction of updates left unclipped")
    clip_lr: float = opt(0.2, "adaptive clipping: learning rate of log C")
    count_noise: float = opt(
        0.0,
        "adaptive clipping: std of the noise on the count of unclipped updates; "
        "0 = expected clients per round / 20 (Andrew et al.)",
    )

    secagg: bool = opt(
        False,
        "secure aggregation (FedLLM, Split-FedLLM's client LoRA): clients mask their updates with pairwise and self masks "
        "(X25519, Shamir-shared seeds) so the server learns only their (weighted) sum",
    )
    secagg_threshold: int = opt(
        0, "secure aggregation: shares needed to unmask (clients that must survive); 0 = majority"
    )
    secagg_bits: int = opt(24, "secure aggregation: fixed-point fraction bits (mod 2^64 sums)")
    secagg_clamp: float = opt(
        100.0, "secure aggregation: each update coordinate is clamped to +-this before masking"
    )
    kd_noise: float = opt(
        0.0,
        "KD-FedLLM (classification): std of Gaussian noise on every probability a client "
        "uploads (b3), PATE-style; 0 = off. Each row moves by at most sqrt(2), so a round of S "
        "public samples is a Gaussian mechanism of multiplier kd_noise / sqrt(2 S) per client",
    )
    split_noise: float = opt(
        0.0,
        "Split-FedLLM: std of Gaussian noise on the cut-layer activations a client sends (c2), "
        "each sample's [L, H] first clipped to L2 norm privacy.split_clip; 0 = off",
    )
    split_clip: float = opt(1.0, "Split-FedLLM: L2 bound of one sample's activations")
    dpsgd: bool = opt(
        False,
        "sample-level DP-SGD (Opacus) for the clients' training on private data (FedLLM a2, "
        "KD b1): per-sample clipping to dpsgd_clip, Gaussian noise, Poisson batches",
    )
    dpsgd_clip: float = opt(1.0, "DP-SGD: L2 bound of one sample's gradient")
    dpsgd_noise: float = opt(1.0, "DP-SGD: noise multiplier (std over dpsgd_clip)")
    dpsgd_target_epsilon: float = opt(
        0.0,
        "DP-SGD: calibrate each client's noise so its samples' epsilon after fed.rounds rounds "
        "is this; 0 = use dpsgd_noise",
    )
    reproducible_noise: bool = opt(
        False,
        "seed the DP noise from the run seed (tests, identical reruns; the guarantee then "
        "assumes the seed is secret); default: fresh noise from the OS",
    )

    def __post_init__(self) -> None:
        check(self.clip > 0 and math.isfinite(self.clip), "privacy.clip", "must be > 0")
        check(self.noise >= 0 and math.isfinite(self.noise), "privacy.noise", "must be >= 0")
        check(self.target_epsilon >= 0, "privacy.target_epsilon", "must be >= 0")
        check(0 < self.delta < 1, "privacy.delta", f"must be in (0, 1), got {self.delta}")
        check(0 < self.target_quantile < 1, "privacy.target_quantile", "must be in (0, 1)")
        check(self.clip_lr > 0, "privacy.clip_lr", "must be > 0")
        check(self.count_noise >= 0, "privacy.count_noise", "must be >= 0")
        check(self.kd_noise >= 0, "privacy.kd_noise", "must be >= 0")
        check(self.dpsgd_clip > 0, "privacy.dpsgd_clip", "must be > 0")
        check(self.dpsgd_noise >= 0, "privacy.dpsgd_noise", "must be >= 0")
        check(self.dpsgd_target_epsilon >= 0, "privacy.dpsgd_target_epsilon", "must be >= 0")
        check(self.split_noise >= 0, "privacy.split_noise", "must be >= 0")
        check(self.split_clip > 0, "privacy.split_clip", "must be > 0")
        check(self.secagg_threshold >= 0, "privacy.secagg_threshold", "must be >= 0")
        check(8 <= self.secagg_bits <= 32, "privacy.secagg_bits", "must be in [8, 32]")
        check(0 < self.secagg_clamp <= 1e6, "privacy.secagg_clamp", "must be in (0, 1e6]")
        check(
            not self.adaptive_clip or self.dp == "central",
            "privacy.adaptive_clip",
            "needs privacy.dp=central (the clipped count is noised once, at the server)",
        )

    def check_run(self, cfg) -> None:
        """Checks against the rest of the run's config."""
        check(
            self.dp == "off" or cfg.fed.framework in ("fedllm", "split"),
            "privacy.dp",
            f"client-level DP protects averaged parameters (fedllm, split); "
            f"{cfg.fed.framework} exchanges no averaged update",
        )
        check(
            self.kd_noise == 0 or (cfg.fed.framework == "kd" and cfg.data.task == "classification"),
            "privacy.kd_noise",
            "noises KD-FedLLM's class probabilities (classification)",
        )
        check(
            self.split_noise == 0 or cfg.fed.framework == "split",
            "privacy.split_noise",
            "noises Split-FedLLM's activations",
        )
        check(
            not self.dpsgd or cfg.fed.framework in ("fedllm", "kd"),
            "privacy.dpsgd",
            "covers the local training of FedLLM (a2) and KD-FedLLM (b1), not split steps",
        )
        check(
            not self.dpsgd or cfg.fed.engine == "sequential",
            "fed.engine",
            "privacy.dpsgd needs per-sample gradients of one client at a time: sequential",
        )
        check(
            not self.dpsgd or cfg.train.local_steps == 0,
            "train.local_steps",
            "privacy.dpsgd takes Poisson batches: give train.local_epochs, not local_steps",
        )
        check(
            not self.secagg or cfg.fed.framework in ("fedllm", "split"),
            "privacy.secagg",
            "secure aggregation sums averaged parameters (fedllm, split's client LoRA); "
            f"{cfg.fed.framework} exchanges none",
        )
        check(
            not (self.secagg and cfg.fed.framework == "split")
            or len(set(cfg.split.client_split_layers)) <= 1,
            "split.client_split_layers",
            "secure aggregation sums one client-side adapter shape: give the clients one layer",
        )
        check(
            not self.secagg or not cfg.fed.poison_clients,
            "fed.poison_clients",
            "the attack simulation scales plaintext uploads; secure aggregation masks them",
        )
        check(
            not self.secagg or cfg.fed.aggregator == "fedavg",
            "fed.aggregator",
            "secure aggregation reveals only the sum: robust aggregators need each update",
        )
        check(
            self.dp != "central" or cfg.fed.aggregator == "fedavg",
            "fed.aggregator",
            "privacy.dp=central aggregates itself (clipped sum + noise); leave fed.aggregator=fedavg",
        )
