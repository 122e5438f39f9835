"""Split-FedLLM's config section ``[split]``."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import check, opt


def is_u_shaped(cfg) -> bool:
    """Whether a run's split learning is U-shaped (``split.u_shaped``, resolved for its task)."""
    u = cfg.split.u_shaped
    return u == "true" or (u == "auto" and cfg.data.task == "generation")


@dataclass(frozen=True)
class SplitConfig:
    """Split-FedLLM options (section ``[split]``); see fedtune.frameworks.split."""

    split_layer: int = opt(
        2, "the client runs the embeddings and the first N transformer blocks, the server the rest"
    )
    client_split_layers: tuple[int, ...] = opt(
        (), "per-client split layers (heterogeneous clients), one per client; empty = split_layer"
    )
    policy: str = opt(
        "fixed",
        "how split layers are chosen: 'fixed' (split_layer / client_split_layers) or 'budget' "
        "(per client, the deepest layer whose estimated per-round client FLOPs and bytes fit "
        "client_compute_budgets and client_bandwidth_budgets)",
        ("fixed", "budget"),
    )
    client_compute_budgets: tuple[float, ...] = opt(
        (),
        "policy=budget: client FLOPs per round, one per client; a value <= 1 is a fraction of "
        "the FLOPs of training the whole model on the client; empty = unlimited",
    )
    client_bandwidth_budgets: tuple[float, ...] = opt(
        (), "policy=budget: bytes per round (up + down), one per client; empty = unlimited"
    )
    server_mode: str = opt(
        "shared",
        "server-side model: one trained on every client's batches in turn (SplitLoRA), or one "
        "copy per client averaged by sample count after each round",
        ("shared", "per_client"),
    )
    compression: str = opt(
        "none",
        "encoding of activations and gradients on the wire: float32, fp16, bf16, int8 (one "
        "scale per token) or per-token top-k (values + indices)",
        ("none", "fp16", "bf16", "int8", "topk"),
    )
    topk_ratio: float = opt(0.1, "compression=topk: fraction of each token's values kept")
    u_shaped: str = opt(
        "auto",
        "keep the head on the client, so labels never leave it (U-shaped split learning); "
        "auto = true for generation (its labels are the text itself), false for classification",
        ("auto", "true", "false"),
    )
    samples_per_round: int = opt(
        0, "training samples each client processes per round; 0 = train.local_epochs passes"
    )

    def __post_init__(self) -> None:
        check(self.split_layer >= 1, "split.split_layer", f"must be >= 1, got {self.split_layer}")
        check(
            all(k >= 1 for k in self.client_split_layers),
            "split.client_split_layers",
            "layers must be >= 1",
        )
        check(
            all(b > 0 for b in self.client_compute_budgets),
            "split.client_compute_budgets",
            "budgets must be > 0",
        )
        check(
            all(b > 0 for b in self.client_bandwidth_budgets),
            "split.client_bandwidth_budgets",
            "budgets must be > 0",
        )
        check(
            0 < self.topk_ratio <= 1,
            "split.topk_ratio",
            f"must be in (0, 1], got {self.topk_ratio}",
        )
        check(self.samples_per_round >= 0, "split.samples_per_round", "must be >= 0")
        check(
            not (self.policy == "budget" and self.client_split_layers),
            "split.policy",
            "'budget' chooses the layers itself; leave split.client_split_layers empty",
        )
