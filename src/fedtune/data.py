"""Data layer: text classification datasets, the paper's public/client split, partitioners,
tokenisation and dynamically padded batches.

The split follows the paper's case study: from the training set, ``public_size`` samples
(5002 for Banking77) form the public set used by KD-FedLLM; clients draw their private data
from the remaining samples (3 x 1667). All frameworks see the same split for the same seed.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .errors import DataError


@dataclass
class TextDataset:
    """Raw texts with integer labels in ``[0, num_labels)``."""

    texts: list[str]
    labels: np.ndarray  # [N] int64


@dataclass
class Tokenized:
    """Token ids (unpadded, truncated) and labels; batches are padded on the fly."""

    ids: list[list[int]]
    labels: np.ndarray  # [N] int64

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class FedData:
    """Everything a federated run needs from the data layer, as loaded in one process (the
    simulation). Each party gets only its view: :meth:`server_view`, :meth:`client_view`."""

    label_names: list[str]
    train: Tokenized
    test: Tokenized
    public_idx: np.ndarray  # indices into train
    client_idx: list[np.ndarray] = field(default_factory=list)  # one index array per client
    pad_id: int = 0
    views: dict = field(default_factory=dict, repr=False, compare=False)  # built once each

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def num_clients(self) -> int:
        return len(self.client_idx)

    def public(self, hide_labels: bool = False) -> Tokenized:
        """The public set as its own dataset (rows in ``public_idx`` order); with
        ``hide_labels`` every label is -1. Built once, so all parties share the object."""
        key = "public-hidden" if hide_labels else "public"
        if key not in self.views:
            public = subset(self.train, self.public_idx)
            if hide_labels:
                public = Tokenized(public.ids, np.full(len(public), -1, dtype=np.int64))
            self.views[key] = public
        return self.views[key]

    def server_view(self) -> ServerData:
        sizes = [len(c) for c in self.client_idx]
        return ServerData(self.label_names, self.test, self.public(), sizes, self.pad_id)

    def client_view(self, cid: int) -> ClientData:
        """Client ``cid``'s own samples and the public texts (labels hidden)."""
        train = subset(self.train, self.client_idx[cid])
        hidden = self.public(hide_labels=True)
        return ClientData(self.label_names, train, hidden, self.pad_id)


@dataclass
class ServerData:
    """What the server holds: the test set, the public set and the clients' sample counts
    (never their samples)."""

    label_names: list[str]
    test: Tokenized
    public: Tokenized
    client_sizes: list[int]
    pad_id: int = 0

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)


@dataclass
class ClientData:
    """What one client holds: its private samples and the public texts (their labels are -1:
    clients never see them)."""

    label_names: list[str]
    train: Tokenized
    public: Tokenized
    pad_id: int = 0

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def samples(self) -> np.ndarray:
        """Indices of the private samples in ``train``: ``[0, n)``."""
        return np.arange(len(self.train))


def subset(data: Tokenized, idx: np.ndarray) -> Tokenized:
    """``data[idx]`` as a dataset of its own (token lists shared, labels copied)."""
    idx = np.asarray(idx, dtype=np.int64)
    return Tokenized([data.ids[i] for i in idx], data.labels[idx])


# ----------------------------------------------------------------------------- loading


def default_data_dir() -> Path | None:
    """``$FEDTUNE_DATA``, else ``../shared/data/banking77`` beside the working dir or the repo."""
    candidates = [os.environ.get("FEDTUNE_DATA", "")]
    candidates.append(str(Path.cwd().parent / "shared" / "data" / "banking77"))
    candidates.append(str(Path(__file__).resolve().parents[3] / "shared" / "data" / "banking77"))
    for c in candidates:
        if c and (Path(c) / "train.csv").is_file():
            return Path(c)
    return None


def read_csv(path: Path, text_col: str, label_col: str) -> tuple[list[str], list[str]]:
    """Read two columns of a CSV; one-line DataError for a missing file, column or empty file."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        for c in (text_col, label_col):
            if c not in cols:
                raise DataError(f"{path}: no column {c!r} (columns: {', '.join(cols) or 'none'})")
        texts, labels = [], []
        for row in reader:
            texts.append(row[text_col] or "")
            labels.append(str(row[label_col]))
    if not texts:
        raise DataError(f"{path}: no rows")
    return texts, labels


def _load_hub(name: str, text_col: str, label_col: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            "no local data folder found (set data.path) and the 'datasets' package for "
            f"loading {name!r} from the hub is not installed"
        ) from None
    try:
        ds = datasets.load_dataset(name)
    except Exception as e:
        raise DataError(
            f"cannot load dataset {name!r} from the hub: {str(e).splitlines()[0]}"
        ) from None
    out = []
    for split in ("train", "test"):
        d = ds[split]
        col = label_col if label_col in d.column_names else "label"
        feat = d.features[col]
        labels = [feat.int2str(x) if hasattr(feat, "int2str") else str(x) for x in d[col]]
        out.append((list(d[text_col]), labels))
    return out


def load_text_classification(cfg: DataConfig) -> tuple[list[str], TextDataset, TextDataset]:
    """Load train/test. Returns ``(label_names, train, test)`` with labels indexed by the
    sorted set of training labels; a test label unseen in training is a DataError."""
    path = Path(cfg.path) if cfg.path else default_data_dir()
    if path is not None:
        if not path.is_dir():
            raise DataError(f"data folder not found: {path}")
        train = read_csv(path / "train.csv", cfg.text_column, cfg.label_column)
        test = read_csv(path / "test.csv", cfg.text_column, cfg.label_column)
    else:
        train, test = _load_hub(cfg.hub_name, cfg.text_column, cfg.label_column)
    names = sorted(set(train[1]))
    index = {n: i for i, n in enumerate(names)}
    unseen = sorted(set(test[1]) - set(names))
    if unseen:
        more = f" and {len(unseen) - 3} more" if len(unseen) > 3 else ""
        raise DataError(f"test labels unseen in training: {', '.join(unseen[:3])}{more}")
    if len(names) < 2:
        raise DataError(f"training data has {len(names)} label(s); need at least 2")

    def encode(texts: list[str], labels: list[str]) -> TextDataset:
        return TextDataset(texts, np.array([index[x] for x in labels], dtype=np.int64))

    return names, encode(*train), encode(*test)


# ----------------------------------------------------------------------------- partitioners


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


# ----------------------------------------------------------------------------- tokens and batches


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length`` (no padding; see :func:`collate`)."""
    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
    ids = enc["input_ids"]
    return [x if x else [tokenizer.pad_token_id] for x in ids]


def collate(ids: list[list[int]], labels: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in the batch (dynamic padding).

    Returns ``input_ids [B, L]`` int64, ``attention_mask [B, L]`` int64, ``labels [B]`` int64."""
    length = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": torch.as_tensor(labels, dtype=torch.long),
    }


def batches(
    data: Tokenized,
    idx: np.ndarray,
    batch_size: int,
    pad_id: int,
    rng: np.random.Generator | None = None,
    group_by_length: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches over ``data[idx]``; shuffled when ``rng`` is given, in order otherwise.

    ``group_by_length`` (with ``rng``): after shuffling, each chunk of 16 batches is sorted by
    length and cut into batches whose order is shuffled again, so batches pad little while
    every sample is still seen once per pass."""
    order = rng.permutation(idx) if rng is not None else np.asarray(idx)
    groups = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length and rng is not None:
        chunk = 16 * batch_size
        groups = []
        for c in range(0, len(order), chunk):
            part = order[c : c + chunk]
            part = part[np.argsort([len(data.ids[i]) for i in part], kind="stable")]
            groups += [part[s : s + batch_size] for s in range(0, len(part), batch_size)]
        groups = [groups[i] for i in rng.permutation(len(groups))]
    for b in groups:
        yield collate([data.ids[i] for i in b], data.labels[b], pad_id)


def _load_split(cfg: DataConfig, seed: int):
    """Load train/test, split train into the public set and the clients', subsample test."""
    names, train, test = load_text_classification(cfg)
    public, clients = split_federated(train.labels, cfg, seed)
    if cfg.test_size and cfg.test_size < len(test.texts):
        keep = np.sort(
            np.random.default_rng(seed + 1).permutation(len(test.texts))[: cfg.test_size]
        )
        test = TextDataset([test.texts[i] for i in keep], test.labels[keep])
    return names, train, test, public, clients


def prepare_server(cfg: DataConfig, tokenizer, max_length: int, seed: int) -> ServerData:
    """The server's data only (a deployed server): the public and test sets tokenized, the
    clients' sample counts from the split (a deployment replaces them with what the clients
    report). The clients' rows are read from the file to find the public set, never kept."""
    names, train, test, public, clients = _load_split(cfg, seed)
    pub = Tokenized(
        tokenize(tokenizer, [train.texts[i] for i in public], max_length), train.labels[public]
    )
    return ServerData(
        names,
        Tokenized(tokenize(tokenizer, test.texts, max_length), test.labels),
        pub,
        [len(c) for c in clients],
        tokenizer.pad_token_id,
    )


def prepare_client(cfg: DataConfig, tokenizer, max_length: int, seed: int, cid: int) -> ClientData:
    """Client ``cid``'s data only (a deployed client holding its partition of a shared file):
    its samples and the public texts tokenized; the other clients' rows are never kept."""
    names, train, _, public, clients = _load_split(cfg, seed)
    if not 0 <= cid < len(clients):
        raise DataError(f"client {cid} does not exist: the data has {len(clients)} clients")
    own = clients[cid]
    return ClientData(
        names,
        Tokenized(
            tokenize(tokenizer, [train.texts[i] for i in own], max_length), train.labels[own]
        ),
        Tokenized(
            tokenize(tokenizer, [train.texts[i] for i in public], max_length),
            np.full(len(public), -1, dtype=np.int64),
        ),
        tokenizer.pad_token_id,
    )


def prepare(cfg: DataConfig, tokenizer, max_length: int, seed: int) -> FedData:
    """Load, split and tokenise: all the data, for a process that runs every party."""
    names, train, test, public, clients = _load_split(cfg, seed)
    return FedData(
        label_names=names,
        train=Tokenized(tokenize(tokenizer, train.texts, max_length), train.labels),
        test=Tokenized(tokenize(tokenizer, test.texts, max_length), test.labels),
        public_idx=public,
        client_idx=clients,
        pad_id=tokenizer.pad_token_id,
    )


def label_histogram(labels: np.ndarray, num_labels: int) -> np.ndarray:
    """Counts per class: ``[num_labels]`` int64."""
    return np.bincount(labels, minlength=num_labels).astype(np.int64)
