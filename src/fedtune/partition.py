"""Partitioners: the paper's public/client split and how client data is drawn (IID, label
skew, explicit sizes, whole groups of a column)."""

from __future__ import annotations

import numpy as np

from .config import DataConfig
from .errors import DataError


def iid(pool: np.ndarray, sizes: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint uniformly random subsets of ``pool`` with the given sizes."""
    if sum(sizes) > len(pool):
        raise DataError(f"clients need {sum(sizes)} samples but only {len(pool)} are available")
    perm = rng.permutation(pool)
    bounds = np.cumsum([0, *sizes])
    return [np.sort(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def dirichlet(
    pool: np.ndarray, labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label-skewed partition: each class is split across clients by Dirichlet(alpha) shares.

    Small ``alpha`` gives clients few classes each; large ``alpha`` approaches IID."""
    for _attempt in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels[pool]):
            idx = rng.permutation(pool[labels[pool] == c])
            shares = rng.dirichlet([alpha] * num_clients)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if all(parts):
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise DataError(
        f"dirichlet partition with alpha={alpha} left a client empty in 100 draws; "
        "raise data.dirichlet_alpha or lower data.num_clients"
    )


def split_federated(labels: np.ndarray, cfg: DataConfig, seed: int):
    """The paper's split. Returns ``(public_idx, [client_idx, ...])`` (disjoint, sorted)."""
    n = len(labels)
    rng = np.random.default_rng(seed)
    if cfg.public_size >= n:
        raise DataError(f"data.public_size={cfg.public_size} leaves no data for clients (n={n})")
    perm = rng.permutation(n)
    public, pool = np.sort(perm[: cfg.public_size]), perm[cfg.public_size :]
    k = cfg.num_clients
    if cfg.partition == "sizes":
        clients = iid(pool, list(cfg.client_sizes), rng)
    elif cfg.partition == "column":
        clients = by_column(pool, labels, k, rng)
        if cfg.samples_per_client:
            clients = [np.sort(rng.permutation(c)[: cfg.samples_per_client]) for c in clients]
    else:
        per = cfg.samples_per_client or len(pool) // k
        if per == 0:
            raise DataError(f"{len(pool)} samples cannot feed {k} clients")
        if cfg.partition == "iid":
            clients = iid(pool, [per] * k, rng)
        else:
            if per * k > len(pool):
                raise DataError(
                    f"clients need {per * k} samples but only {len(pool)} are available"
                )
            sub = rng.permutation(pool)[: per * k]
            clients = dirichlet(sub, labels, k, cfg.dirichlet_alpha, rng)
    for i, c in enumerate(clients):
        if len(c) == 0:
            raise DataError(f"client {i} received an empty partition")
    return public, clients


def by_column(pool: np.ndarray, groups: np.ndarray, k: int, rng: np.random.Generator):
    """Whole groups dealt to ``k`` clients: groups in a seeded order, each to the client with
    the fewest samples so far (natural non-IID with balanced sizes)."""
    values = rng.permutation(np.unique(groups[pool]))
    if len(values) < k:
        raise DataError(f"data.partition_column has {len(values)} values for {k} clients")
    parts: list[list[int]] = [[] for _ in range(k)]
    for v in values:
        parts[int(np.argmin([len(p) for p in parts]))].extend(pool[groups[pool] == v].tolist())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
