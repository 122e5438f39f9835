"""KD-FedLLM's config section ``[kd]``."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import check as _check
from ...config import opt


@dataclass(frozen=True)
class KDConfig:
    """KD-FedLLM options (section ``[kd]``); see fedtune.frameworks.kd."""

    temperature: float = opt(2.0, "distillation temperature T (softmax(logits / T), loss x T^2)")
    public_samples: int = opt(
        0, "use a seeded random subset of N public samples (nested across N); 0 = all of it"
    )
    sharpen: float = opt(
        1.0,
        "sharpen the aggregated teacher before the server distils it (b5): p^(1/s), rows "
        "renormalized (DS-FL's entropy reduction); 1 = off, < 1 = sharper, toward the argmax",
    )
    server_epochs: int = opt(1, "server distillation epochs over the public set per round (b5)")
    client_distill_epochs: int = opt(
        1, "client distillation epochs over the public set per round (b8); 0 = skip b8"
    )
    distill_batch_size: int = opt(
        0, "batch size of server/client distillation; 0 = train.batch_size"
    )
    prune: str = opt(
        "none",
        "keep only the most informative public samples each round, scored by the global model: "
        "highest entropy or smallest top-1/top-2 margin",
        ("none", "entropy", "margin"),
    )
    prune_keep: float = opt(0.5, "fraction of the public set kept when kd.prune is on")
    align: str = opt(
        "none",
        "clients send label histograms once; the server reweights or resamples the public set "
        "toward their aggregate label distribution (public labels: the teacher's argmax)",
        ("none", "reweight", "resample"),
    )
    level: str = opt(
        "logits",
        "what knowledge is: logits (per sample; generation: per response token, top-k over the "
        "vocabulary) or, generation only, 'sequence': the token ids each party generates for "
        "the public prompts (sequence-level KD, a few bytes per token)",
        ("logits", "sequence"),
    )
    topk: int = opt(0, "send only the top-k logits (values + indices) per sample; 0 = all classes")
    logit_dtype: str = opt(
        "float32",
        "dtype of logit values on the wire (int8: per-row scale, row offset dropped)",
        ("float32", "float16", "int8"),
    )
    entropy_threshold: float = opt(
        1.0,
        "drop a client's prediction on a sample when its normalized entropy H / ln C is above "
        "this; 1.0 = keep all",
    )
    aggregate: str = opt(
        "mean",
        "how client probabilities are combined: plain mean, weighted by client sample count, "
        "per sample by confidence (1 - H / ln C), or the coordinate-wise median (robust to a "
        "few malicious clients; rows renormalized)",
        ("mean", "samples", "confidence", "median"),
    )
    server_uses_public_labels: bool = opt(
        False, "the server also trains on the public set's true labels (cross-entropy) in b5"
    )
    client_eval: bool = opt(
        True, "at evaluation rounds also test every client's local model (client_accuracy)"
    )

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "kd.temperature", f"must be > 0, got {self.temperature}")
        _check(0 < self.sharpen <= 1, "kd.sharpen", f"must be in (0, 1], got {self.sharpen}")
        _check(self.public_samples >= 0, "kd.public_samples", "must be >= 0")
        _check(
            self.server_epochs >= 1, "kd.server_epochs", f"must be >= 1, got {self.server_epochs}"
        )
        _check(self.client_distill_epochs >= 0, "kd.client_distill_epochs", "must be >= 0")
        _check(self.distill_batch_size >= 0, "kd.distill_batch_size", "must be >= 0")
        _check(
            0 < self.prune_keep <= 1, "kd.prune_keep", f"must be in (0, 1], got {self.prune_keep}"
        )
        _check(self.topk >= 0, "kd.topk", f"must be >= 0, got {self.topk}")
        _check(
            0 < self.entropy_threshold <= 1,
            "kd.entropy_threshold",
            f"must be in (0, 1], got {self.entropy_threshold}",
        )
