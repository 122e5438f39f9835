"""Data layer: text classification and generation datasets, the paper's public/client split,
partitioners, tokenisation and padded batches: to the batch's longest row, or to
``model.max_length`` with ``data.pad_to_max_length`` (generation pairs: :mod:`fedtune.gendata`).

The split follows the paper's case study: from the training set, ``public_size`` samples
(5002 for Banking77) form the public set used by KD-FedLLM; clients draw their private data
from the remaining samples (3 x 1667). All frameworks see the same split for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from . import gendata
from .config import DataConfig
from .errors import DataError
from .gendata import GenSet
from .partition import dirichlet, iid, split_federated  # noqa: F401  (re-exported)
from .textdata import (  # noqa: F401  (re-exported)
    TextDataset,
    data_folder,
    default_data_dir,
    load_text_classification,
    read_csv,
)


@dataclass
class Tokenized:
    """Token ids (unpadded, truncated) and labels; batches are padded on the fly.

    Generation: ``ids`` are prompt + response tokens and ``prompt_len [N]`` the number of
    leading prompt tokens, which get no loss; ``labels`` are the rows' groups.

    ``pad_to``: every batch is at least this wide (``model.max_length`` under
    ``data.pad_to_max_length``, the paper's fixed padding; None: the batch's longest row);
    ``pad_multiple``: and its width is a multiple of this (``data.pad_multiple``). Both live on
    the dataset, so every path that batches it (:func:`batches`) pads alike; a view built from
    a dataset must carry them over (:func:`subset` does; ``dataclasses.replace`` keeps them)."""

    ids: list[list[int]]
    labels: np.ndarray  # [N] int64
    prompt_len: np.ndarray | None = None  # [N] int64, generation only
    pad_to: int | None = None
    pad_multiple: int = 1

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
    generate: GenSet | None = None  # generation: test prompts with their references
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
                hidden = np.full(len(public), -1, dtype=np.int64)
                public = replace(public, labels=hidden)
            self.views[key] = public
        return self.views[key]

    def server_view(self) -> ServerData:
        sizes = [len(c) for c in self.client_idx]
        return ServerData(
            self.label_names, self.test, self.public(), sizes, self.pad_id, self.generate
        )

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
    generate: GenSet | None = None  # generation: test prompts with their references

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
    """``data[idx]`` as a dataset of its own (token lists shared, labels copied, ``pad_to``
    kept)."""
    idx = np.asarray(idx, dtype=np.int64)
    plen = None if data.prompt_len is None else data.prompt_len[idx]
    return replace(data, ids=[data.ids[i] for i in idx], labels=data.labels[idx], prompt_len=plen)


def padding(max_length: int, cfg: DataConfig) -> dict:
    """The :class:`Tokenized` padding fields ``data.pad_to_max_length`` and
    ``data.pad_multiple`` ask for."""
    return {
        "pad_to": max_length if cfg.pad_to_max_length else None,
        "pad_multiple": cfg.pad_multiple,
    }


# ----------------------------------------------------------------------------- loading


# ----------------------------------------------------------------------------- tokens and batches


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length`` (no padding; see :func:`collate`)."""
    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
    ids = enc["input_ids"]
    return [x if x else [tokenizer.pad_token_id] for x in ids]


# Fill value of each [B, ...] batch tensor when batches of different lengths are joined
# (``input_ids`` take the pad token id).
PAD_VALUES = {"attention_mask": 0, "target_pos": 0, "target_ids": -100}


def collate(
    ids: list[list[int]],
    labels: np.ndarray,
    pad_id: int,
    prompt_len: np.ndarray | None = None,
    pad_to: int | None = None,
    multiple: int = 1,
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in the batch (dynamic padding), or to ``pad_to`` when
    that is longer (the paper's fixed padding: ``model.max_length``), rounded up to a
    ``multiple`` (HF's ``pad_to_multiple_of``: fewer distinct shapes to measure and compile).

    Returns ``input_ids [B, L]`` int64, ``attention_mask [B, L]`` int64 (1 on the real tokens,
    0 on padding), ``labels [B]`` int64, ``L = max(longest row, pad_to)`` rounded up; with
    ``prompt_len [B]`` (generation) also :func:`response_targets`, which stop before the padding.
    Right padding changes no real token's output, only the cost: a real token attends to
    earlier positions only (causal), all real, and a row's class is read at its last real
    token (HF's last non-pad id; :func:`fedtune.tasks.classification.last_positions`)."""
    length = max(max(len(x) for x in ids), pad_to or 0)
    length = -(-length // multiple) * multiple
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": torch.as_tensor(labels, dtype=torch.long),
    }
    if prompt_len is not None:
        batch.update(response_targets(ids, prompt_len))
    return batch


def response_targets(ids: list[list[int]], prompt_len: np.ndarray) -> dict[str, torch.Tensor]:
    """Where a causal LM is trained: the output at position ``t`` predicts token ``t + 1``, so
    row ``i``'s loss is on positions ``[p_i - 1, n_i - 1)`` (``p_i`` prompt tokens, ``n_i``
    tokens): its response tokens, never a prompt token or padding.

    Returns ``target_pos [B, R]`` (those positions, 0-padded), ``target_ids [B, R]`` (the tokens
    they predict, -100 padded), R = the most response tokens of a row (>= 1), and
    ``tokens_per_row [B]``: the batch's response tokens / B, so that the mean over rows of
    (row's token-loss sum / tokens_per_row) is the mean over the batch's tokens."""
    spans = [(max(int(p), 1) - 1, len(x) - 1) for x, p in zip(ids, prompt_len, strict=True)]
    r = max(1, *(b - a for a, b in spans))
    pos = torch.zeros((len(ids), r), dtype=torch.long)
    tgt = torch.full((len(ids), r), -100, dtype=torch.long)
    for i, (x, (a, b)) in enumerate(zip(ids, spans, strict=True)):
        if b > a:
            pos[i, : b - a] = torch.arange(a, b)
            tgt[i, : b - a] = torch.tensor(x[a + 1 : b + 1])
    tokens = max(1, int((tgt != -100).sum()))
    return {
        "target_pos": pos,
        "target_ids": tgt,
        "tokens_per_row": torch.full((len(ids),), tokens / len(ids)),
    }


def join_batches(batches: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Batches concatenated row-wise; 2-D tensors right-padded to the widest
    (:data:`PAD_VALUES`, token ids with ``pad_id``)."""
    out = {}
    for key, first in batches[0].items():
        if first.dim() == 2:
            width = max(b[key].shape[1] for b in batches)
            fill = pad_id if key == "input_ids" else PAD_VALUES.get(key, 0)
            out[key] = torch.cat(
                [F.pad(b[key], (0, width - b[key].shape[1]), value=fill) for b in batches]
            )
        else:
            out[key] = torch.cat([b[key] for b in batches])
    return out


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
        plen = None if data.prompt_len is None else data.prompt_len[b]
        ids = [data.ids[i] for i in b]
        yield collate(ids, data.labels[b], pad_id, plen, data.pad_to, data.pad_multiple)


@dataclass
class Loaded:
    """The rows of a run before tokenization: train/test, the split, and (generation) the
    evaluation prompts with their references, from the whole test split."""

    names: list[str]
    train: TextDataset
    test: TextDataset
    public: np.ndarray
    clients: list[np.ndarray]
    generate: gendata.Pairs | None = None


def load_generation(cfg: DataConfig, seed: int) -> tuple[list[str], TextDataset, TextDataset]:
    """Prompt/response pairs (:mod:`fedtune.gendata`); a row's label is its group's index."""
    rows = gendata.load_rows(cfg, seed)
    train, test = (gendata.render(cfg, r, w) for r, w in zip(rows, ("train", "test"), strict=True))
    names = sorted(set(train.groups))
    index = {n: i for i, n in enumerate(names)}

    def labels(groups: list[str]) -> np.ndarray:
        return np.array([index.get(g, -1) for g in groups], dtype=np.int64)

    return (
        names,
        TextDataset(train.prompts, labels(train.groups), train.responses),
        TextDataset(test.prompts, labels(test.groups), test.responses),
    )


def _load_split(cfg: DataConfig, seed: int) -> Loaded:
    """Load train/test, split train into the public set and the clients', subsample test."""
    generation = cfg.task == "generation"
    if generation:
        names, train, test = load_generation(cfg, seed)
    elif cfg.partition == "column":
        raise DataError("data.partition=column is for generation; classification: dirichlet")
    else:
        names, train, test = load_text_classification(cfg)
    public, clients = split_federated(train.labels, cfg, seed)
    order = np.random.default_rng(seed + 1).permutation(len(test.texts))
    # Generation: the prompts to generate for, in this seeded order, each with all its
    # references; the first eval.generate_samples of them are scored.
    pairs = None
    if generation:
        shuffled = select(test, order)
        pairs = gendata.Pairs(shuffled.texts, shuffled.responses or [], [])
    if cfg.test_size and cfg.test_size < len(test.texts):
        keep = order[: cfg.test_size]
        if generation:  # whole prompts, met in the same order: every reference stays
            keep = gendata.whole_groups(test.texts, order, cfg.test_size)
        test = select(test, np.sort(keep))
    return Loaded(names, train, test, public, clients, pairs)


def select(data: TextDataset, idx: np.ndarray) -> TextDataset:
    responses = None if data.responses is None else [data.responses[i] for i in idx]
    return TextDataset([data.texts[i] for i in idx], data.labels[idx], responses)


def encode(
    tokenizer, data: TextDataset, idx, cfg: DataConfig, max_length: int, hide_labels=False
) -> Tokenized:
    """Tokenize ``data[idx]`` (all rows when ``idx`` is None); ``hide_labels``: labels -1.

    Rows are cut to ``max_length`` tokens; with ``cfg.pad_to_max_length`` their batches are
    padded to it too (:attr:`Tokenized.pad_to`). Generation as well: right padding after a
    prompt + response changes none of its outputs (causal); the prompts that are generated
    for (:func:`eval_prompts`, left-padded, then extended) keep their own padding."""
    if idx is not None:
        data = select(data, np.asarray(idx))
    labels = np.full(len(data.texts), -1, dtype=np.int64) if hide_labels else data.labels
    pad = padding(max_length, cfg)
    if data.responses is None:
        return Tokenized(tokenize(tokenizer, data.texts, max_length), labels, **pad)
    pairs = gendata.Pairs(data.texts, data.responses, [])
    chat = gendata.uses_chat(tokenizer, cfg.chat_template)
    ids, plen = gendata.encode_pairs(tokenizer, pairs, max_length, chat)
    return Tokenized(ids, labels, plen, **pad)


def eval_prompts(tokenizer, cfg: DataConfig, loaded: Loaded) -> GenSet | None:
    if loaded.generate is None:
        return None
    return gendata.eval_set(
        tokenizer, loaded.generate, gendata.uses_chat(tokenizer, cfg.chat_template)
    )


def prepare_server(cfg: DataConfig, tokenizer, max_length: int, seed: int) -> ServerData:
    """The server's data only (a deployed server): the public and test sets tokenized, the
    clients' sample counts from the split (a deployment replaces them with what the clients
    report). The clients' rows are read from the file to find the public set, never kept."""
    d = _load_split(cfg, seed)
    return ServerData(
        d.names,
        encode(tokenizer, d.test, None, cfg, max_length),
        encode(tokenizer, d.train, d.public, cfg, max_length),
        [len(c) for c in d.clients],
        tokenizer.pad_token_id,
        eval_prompts(tokenizer, cfg, d),
    )


def prepare_client(cfg: DataConfig, tokenizer, max_length: int, seed: int, cid: int) -> ClientData:
    """Client ``cid``'s data only (a deployed client holding its partition of a shared file):
    its samples and the public texts tokenized; the other clients' rows are never kept."""
    d = _load_split(cfg, seed)
    if not 0 <= cid < len(d.clients):
        raise DataError(f"client {cid} does not exist: the data has {len(d.clients)} clients")
    return ClientData(
        d.names,
        encode(tokenizer, d.train, d.clients[cid], cfg, max_length),
        encode(tokenizer, d.train, d.public, cfg, max_length, hide_labels=True),
        tokenizer.pad_token_id,
    )


def prepare(cfg: DataConfig, tokenizer, max_length: int, seed: int) -> FedData:
    """Load, split and tokenise: all the data, for a process that runs every party."""
    d = _load_split(cfg, seed)
    return FedData(
        label_names=d.names,
        train=encode(tokenizer, d.train, None, cfg, max_length),
        test=encode(tokenizer, d.test, None, cfg, max_length),
        public_idx=d.public,
        client_idx=d.clients,
        pad_id=tokenizer.pad_token_id,
        generate=eval_prompts(tokenizer, cfg, d),
    )


def label_histogram(labels: np.ndarray, num_labels: int) -> np.ndarray:
    """Counts per class: ``[num_labels]`` int64."""
    return np.bincount(labels, minlength=num_labels).astype(np.int64)
