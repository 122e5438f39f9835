"""The ``[fedopt]`` config section: server optimizers, client drift corrections and the way
LoRA's factors are shared (the paper's Section IV.A direction for FedLLM)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check, opt


@dataclass(frozen=True)
class FedOptConfig:
    """Options of FedLLM's research directions (section ``[fedopt]``); see :mod:`fedtune.fedopt`."""

    server_opt: str = opt(
        "none",
        "server optimizer on the round's pseudo-gradient (aggregate - global): 'avgm' (FedAvgM, "
        "Hsu et al. 2019), 'adam', 'yogi', 'adagrad' (Reddi et al. 2021); FedLLM and "
        "Split-FedLLM's client LoRA",
        ("none", "avgm", "adam", "yogi", "adagrad"),
    )
    server_lr: float = opt(
        1.0,
        "server learning rate eta (avgm: 1 = FedAvg plus momentum; adaptive ones step each "
        "coordinate by about eta, so give them about train.lr)",
    )
    server_momentum: float = opt(0.9, "avgm: momentum beta")
    server_beta1: float = opt(0.9, "adam / yogi: first-moment decay")
    server_beta2: float = opt(0.99, "adam / yogi: second-moment decay")
    server_tau: float = opt(1e-3, "adam / yogi / adagrad: adaptivity tau (added to sqrt(v))")
    prox_mu: float = opt(
        0.0,
        "FedProx (Li et al. 2020): each client's loss gains mu/2 ||w - w_global||^2 over its "
        "trainable tensors; FedLLM and Split-FedLLM's client LoRA; 0 = off",
    )
    scaffold: bool = opt(
        False,
        "SCAFFOLD (Karimireddy et al. 2020, option II): control variates correct every local "
        "gradient by c - c_i; c travels down and each client's change of c_i up (FedLLM, "
        "Split-FedLLM's client LoRA; train.optimizer=sgd)",
    )
    lora: str = opt(
        "fedit",
        "which LoRA factors are trained and averaged: 'fedit' (A and B averaged separately), "
        "'ffa' (FFA-LoRA: A frozen at the shared initialization, only B and the head trained "
        "and exchanged, so their average is the average update exactly) or 'fedsa' "
        "(FedSA-LoRA: A and the head shared, each client keeps its own B); FedLLM",
        ("fedit", "ffa", "fedsa"),
    )

    client_ranks: tuple[int, ...] = opt(
        (),
        "per-client LoRA ranks (one per client, the largest = model.lora_r): a client trains and "
        "exchanges the first r ranks of the global adapter; empty = everyone at model.lora_r",
    )
    rank_policy: str = opt(
        "fixed",
        "'fixed' (fedopt.client_ranks) or 'budget': per client, the largest rank in 1, 2, 4, ... "
        "up to model.lora_r whose bytes per round (a1 + a3, encoded as on the wire) fit its "
        "fedopt.client_bandwidth_budgets entry",
        ("fixed", "budget"),
    )
    client_bandwidth_budgets: tuple[float, ...] = opt(
        (), "rank_policy=budget: bytes per round (down + up), one per client"
    )
    rank_aggregation: str = opt(
        "hetlora",
        "how clients' LoRA factors are combined: 'hetlora' (zero-pad and average), 'flexlora' "
        "(average the products B A, SVD back to each rank) or 'flora' (FLoRA: stack them, so the "
        "merged product is the exact weighted mean; every party merges it into its frozen "
        "weights and starts each round from a fresh LoRA; a1 grows with the clients); flora "
        "works with equal ranks too",
        ("hetlora", "flexlora", "flora"),
    )

    def __post_init__(self) -> None:
        check(self.server_lr > 0, "fedopt.server_lr", f"must be > 0, got {self.server_lr}")
        check(0 <= self.server_momentum < 1, "fedopt.server_momentum", "must be in [0, 1)")
        check(0 <= self.server_beta1 < 1, "fedopt.server_beta1", "must be in [0, 1)")
        check(0 <= self.server_beta2 < 1, "fedopt.server_beta2", "must be in [0, 1)")
        check(self.server_tau > 0, "fedopt.server_tau", f"must be > 0, got {self.server_tau}")
        check(self.prox_mu >= 0, "fedopt.prox_mu", f"must be >= 0, got {self.prox_mu}")

    def check_run(self, cfg) -> None:
        """Checks against the rest of the run's config."""
        fw = cfg.fed.framework
        check(
            self.server_opt == "none" or fw in ("fedllm", "split"),
            "fedopt.server_opt",
            f"steps averaged parameters (fedllm, split's client LoRA); {fw} averages none",
        )
        check(
            self.prox_mu == 0 or fw in ("fedllm", "split"),
            "fedopt.prox_mu",
            f"pulls a client toward the global adapter (fedllm, split); {fw} has none",
        )
        check(
            not self.scaffold or fw in ("fedllm", "split"),
            "fedopt.scaffold",
            f"corrects averaged parameters (fedllm, split's client LoRA); {fw} averages none",
        )
        check(
            not self.scaffold or cfg.train.optimizer == "sgd",
            "train.optimizer",
            "fedopt.scaffold's control variates (option II) are gradients only under plain SGD",
        )
        check(
            self.lora == "fedit" or fw == "fedllm",
            "fedopt.lora",
            f"{self.lora} is built for FedLLM",
        )
        drift = self.prox_mu > 0 or self.scaffold or self.lora == "ffa"
        check(
            not drift or cfg.fed.engine == "sequential",
            "fed.engine",
            "fedopt's prox_mu, scaffold and lora=ffa change each client's step: sequential",
        )
        check(
            not drift or not cfg.privacy.dpsgd,
            "privacy.dpsgd",
            "Opacus's step rebuilds the gradients: no prox_mu, scaffold or lora=ffa with DP-SGD",
        )
        if self.client_ranks or self.rank_policy == "budget":
            self.check_ranks(cfg)
        if self.rank_aggregation == "flora":
            self.check_flora(cfg)
        check(
            not self.scaffold or (not cfg.privacy.secagg and cfg.privacy.dp == "off"),
            "fedopt.scaffold",
            "its control variates are uploaded in the clear: no privacy.secagg or privacy.dp",
        )

    def check_ranks(self, cfg) -> None:
        """``client_ranks``: one rank in ``[1, model.lora_r]`` per client, the largest being
        ``model.lora_r`` (or, rank_policy=budget, one bandwidth budget per client); FedLLM with
        FedIT-style factors, uploads in the clear."""
        r, n = self.client_ranks, cfg.data.num_clients
        key = "fedopt.client_ranks"
        if self.rank_policy == "budget":
            b = self.client_bandwidth_budgets
            key = "fedopt.rank_policy"
            check(not r, key, "'budget' chooses the ranks itself; leave fedopt.client_ranks empty")
            check(
                len(b) == n and min(b) > 0,
                "fedopt.client_bandwidth_budgets",
                f"needs {n} positive budgets (data.num_clients), got {len(b)}",
            )
        else:
            check(len(r) == n, key, f"needs {n} ranks (data.num_clients), got {len(r)}")
            check(min(r) >= 1, key, "ranks must be >= 1")
            check(
                max(r) == cfg.model.lora_r,
                key,
                f"the largest rank must be model.lora_r={cfg.model.lora_r}",
            )
        check(cfg.fed.framework == "fedllm", key, "is built for FedLLM")
        check(
            self.lora == "fedit" and not self.scaffold,
            key,
            "needs fedopt.lora=fedit and no scaffold (their tensors would differ per client)",
        )
        check(
            not cfg.privacy.secagg and cfg.privacy.dp == "off",
            key,
            "clients of different ranks send different shapes: no secure sum or client-level DP",
        )
        check(
            self.rank_aggregation == "hetlora"
            or (cfg.fed.aggregator == "fedavg" and self.server_opt == "none"),
            "fedopt.rank_aggregation",
            "flexlora averages products and factors them anew: fed.aggregator=fedavg, no server_opt",
        )

    def check_flora(self, cfg) -> None:
        """FLoRA's stacks are the weighted sum of plaintext FedIT-style factors, merged by a
        sequential client into its own frozen weights."""
        key = "fedopt.rank_aggregation"
        check(cfg.fed.framework == "fedllm", key, "flora is built for FedLLM")
        check(
            self.lora == "fedit" and not self.scaffold and self.server_opt == "none",
            key,
            "flora needs fedopt.lora=fedit, no scaffold and no server_opt (it merges every round)",
        )
        check(
            cfg.fed.aggregator == "fedavg",
            key,
            "flora stacks the weighted sum: fed.aggregator=fedavg",
        )
        check(
            not cfg.privacy.secagg and cfg.privacy.dp == "off",
            key,
            "flora stacks each client's factors: no secure sum or client-level DP",
        )
        check(
            cfg.fed.engine == "sequential",
            "fed.engine",
            "flora's clients train on their own merged weights: sequential",
        )
