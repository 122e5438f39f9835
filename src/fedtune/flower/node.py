"""The SuperNode side: a long-lived fedtune worker that holds the model and the client's state.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message, in both isolation
modes (``supernode/runtime/run_clientapp.py`` handles one message, then exits), so nothing a
ClientApp loads survives to the next message. ``fedtune flower supernode`` therefore runs this
worker inside the SuperNode's own process, on a loopback port guarded by a random token that
only the node config carries; the ClientApp forwards each message's bytes to it. The worker
loads the backbone once (``models.load_model`` caches it per process) and keeps each run's
``Client`` object (optimizer moments, KD's local model, split's client optimizer) across
rounds, exactly like the in-process simulation, keyed by the run key the server sends. It also
keeps snapshots of that state since the server's last checkpoint, so that a ServerApp that was
killed and resumed (``fedtune flower run --resume``) continues with every client's state as it
was after the checkpointed round (:class:`ClientRun`). A node that restarted has lost that
state: its client starts afresh (logged).

Data: node config ``partition-id=N`` makes the node fedtune client N. Alone, the node splits
the run's dataset (``data.path`` of the config, present on this host) like the simulation and
keeps partition N. With ``data-dir=/path`` the node instead uses its own folder: ``train.csv``
(all of it private to this client) and, for KD-FedLLM, ``public.csv``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .. import config, frameworks
from ..compute import ComputeMeter
from ..context import ClientContext, build_context
from ..data import ClientData, Tokenized, padding, prepare_client, read_csv, tokenize
from ..errors import ConfigError, DataError, FedtuneError, MessageError
from ..execution.executors import Sequential
from ..messages import DOWN, UP, Wire, client_name
from ..models import load_tokenizer
from ..runtime import checkpoint
from . import rpc
from .split_link import RemoteLink, receive_counted

log = logging.getLogger("fedtune.flower")


def own_data(cfg: config.RunConfig, data_dir: Path, labels: list[str], tok) -> ClientData:
    """A node's own CSV folder as :class:`ClientData`: ``train.csv`` rows are this client's
    samples, ``public.csv`` (optional) rows the public set (their labels are never read);
    ``labels`` are the run's class names (from the server), so label ids agree across nodes."""
    d = cfg.data
    if d.task == "generation":
        raise DataError(
            "--data-dir holds classification CSVs; a generation node uses its partition of "
            "data.path (start it without --data-dir)"
        )
    texts, names = read_csv(data_dir / "train.csv", d.text_column, d.label_column)
    n_private = len(texts)
    if (data_dir / "public.csv").is_file():
        pt, pn = read_csv(data_dir / "public.csv", d.text_column, d.label_column)
        texts, names = texts + pt, names + pn
    index = {n: i for i, n in enumerate(labels)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise DataError(f"{data_dir}: labels not in the run's label set: {', '.join(unknown[:3])}")
    y = np.array([index[n] for n in names], dtype=np.int64)
    ids = tokenize(tok, texts, cfg.model.max_length)
    hidden = np.full(len(texts) - n_private, -1, dtype=np.int64)
    pad = padding(cfg.model.max_length, cfg.data)
    return ClientData(
        list(labels),
        Tokenized(ids[:n_private], y[:n_private], **pad),
        Tokenized(ids[n_private:], hidden, **pad),
        tok.pad_token_id,
    )


def carried_parts(header: dict, blob: bytes) -> list[bytes]:
    """A Flower message's blob split into the carried notices (``header["carried"]``: their
    byte lengths, in order) and the message itself, last."""
    sizes = header.get("carried") or []
    ok = isinstance(sizes, list) and all(isinstance(n, int) and n > 0 for n in sizes)
    if not ok or sum(sizes) >= len(blob):
        raise MessageError(f"carried notice sizes {str(sizes)[:40]} do not fit the message")
    parts, at = [], 0
    for n in sizes:
        parts.append(blob[at : at + n])
        at += n
    return [*parts, blob[at:]]


class ClientRun:
    """This node's client of one run, with snapshots of its state for a resumed server.

    ``snapshots[r]`` is the client's state when round ``r`` first reached it: its state after
    every round before ``r``. A server resumed after round ``R`` needs the state after ``R``:
    the snapshot of the first round after ``R`` that reached this node, or, when none did, the
    current state. Snapshots of rounds up to the server's last checkpoint (``keep_after``) are
    no longer needed and are dropped."""

    def __init__(self, client) -> None:
        self.client = client
        self.snapshots: dict[int, tuple] = {}
        self.last_round = 0
        self.owner: str | None = None  # the Flower run that drives it now

    def snapshot(self, rnd: int, keep_after: int | None) -> None:
        if rnd > self.last_round:
            if keep_after is not None:
                tensors: dict = {}
                tree = checkpoint.encode_tree(self.client.state_dict(), tensors)  # copies
                self.snapshots[rnd] = (tree, tensors)
                self.snapshots = {r: s for r, s in self.snapshots.items() if r > keep_after}
            self.last_round = rnd

    def rollback(self, after: int) -> None:
        later = [r for r in self.snapshots if r > after]
        if later:
            tree, tensors = self.snapshots[min(later)]
            self.client.load_state_dict(checkpoint.decode_tree(tree, tensors))
        self.snapshots = {r: s for r, s in self.snapshots.items() if r <= after}
        self.last_round = min(self.last_round, after)


class NodeWorker:
    """Runs fedtune client ``partition_id`` for every run this SuperNode takes part in."""

    def __init__(
        self, partition_id: int, data_dir: str | None = None, split_root_cert: str | None = None
    ) -> None:
        self.cid, self.data_dir, self.split_root_cert = partition_id, data_dir, split_root_cert
        self.contexts: dict[str, ClientContext] = {}  # config hash -> context (model once)
        self.runs: dict[str, ClientRun] = {}  # run key -> this node's client of that run
        self.lock = threading.Lock()  # one message at a time: the model is shared

    def context(self, cfg: config.RunConfig, key: str, labels: list[str]) -> ClientContext:
        """This node's client context for a config: the model loaded once, its own data."""
        if key not in self.contexts:
            if self.cid >= cfg.data.num_clients:
                raise ConfigError(
                    f"partition-id {self.cid} but the run has {cfg.data.num_clients} clients"
                )
            tok = load_tokenizer(cfg.model.name)
            if self.data_dir:
                data = own_data(cfg, Path(self.data_dir), labels, tok)
            else:  # its partition of the run's dataset file, split like the simulation
                data = prepare_client(cfg.data, tok, cfg.model.max_length, cfg.seed, self.cid)
            ctx = build_context(cfg, data=data).client(self.cid)
            self.contexts[key] = replace(ctx, owns_model=True)  # one client per node process
        return self.contexts[key]

    def process(self, header: dict, blob: bytes) -> bytes:
        """One Flower message: decode, run the client's work, encode; returns a
        :func:`rpc.pack` frame with the reply bytes, the client's compute and what this side
        counted."""
        text = header["config"]
        key = hashlib.sha256(text.encode()).hexdigest()[:16]
        cfg = config.from_dict(tomllib.loads(text))
        if header.get("query") and self.cid >= cfg.data.num_clients:
            return rpc.pack({"partition-id": self.cid, "samples": 0})  # not in this run
        ctx = self.context(cfg, key, header.get("labels", []))
        if header.get("query"):  # the server greets the node: who it is, how much data it has
            return rpc.pack({"partition-id": self.cid, "samples": len(ctx.data.train)})
        # OpenMP keeps the thread count per OS thread and gRPC serves from a pool: set it here
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
        wire = Wire(max_bytes=cfg.fed.max_message_bytes)
        *notices, msg = [receive_counted(wire, b) for b in carried_parts(header, blob)]
        for m in (*notices, msg):
            if m.receiver != client_name(self.cid):
                raise MessageError(f"node {client_name(self.cid)} got a message for {m.receiver}")
        client = self.client_for(header, ctx, msg.round)  # its state before the notices
        meter = ComputeMeter(ctx.device, cfg.flops, ctx.flop_cache)
        executor = Sequential(ctx)  # one client per node: nothing to fuse
        for notice in notices:  # e.g. KD's b7 of the last round: handled first, no reply
            executor.run({self.cid: partial(client.handle, notice, None)}, {self.cid: meter})
        carried_seconds = meter.stats.seconds
        split, stream, reply = header.get("split"), None, None
        try:
            if split:
                stream = rpc.Stream(
                    split["address"],
                    split["token"],
                    root_cert=self.split_root_cert,
                    timeout=float(split["timeout"]),
                    what="split server",
                )
            link = RemoteLink(stream, wire, meter) if stream else None
            if not header.get("drop"):  # fault simulation: got the message, never answers
                work = {self.cid: partial(client.handle, msg, link)}
                reply = executor.run(work, {self.cid: meter})[self.cid]
        finally:
            if stream is not None:
                stream.close()
        out = wire.send(reply) if reply is not None else b""
        counted = {d: wire.ledger.total(d) for d in (UP, DOWN)}  # this message's, all of it
        head = {"stats": meter.stats.as_dict(), "counted": counted, "reply": reply is not None}
        return rpc.pack({**head, "carried_seconds": carried_seconds}, out)

    def client_for(self, header: dict, ctx: ClientContext, rnd: int):
        """This node's client of the run ``header`` names (its state kept across rounds and
        across a resumed ServerApp), rolled back when the server resumes the run."""
        run_key, flower_run = str(header.get("run_key") or header["run"]), str(header["run"])
        resumed = header.get("resumed_after")
        if run_key not in self.runs:  # a new run: forget the client state of earlier runs
            if resumed is not None:
                log.warning("no client state kept for resumed run %s: starting afresh", run_key)
            fw = frameworks.get(ctx.cfg.fed.framework)
            self.runs = {run_key: ClientRun(fw.client(ctx))}
        run = self.runs[run_key]
        if run.owner is None:
            run.owner = flower_run
        elif run.owner != flower_run:
            if resumed is None:  # e.g. a message of the killed ServerApp delivered late
                raise MessageError(f"run {run_key} continues in Flower run {run.owner}")
            run.rollback(int(resumed))  # the first message of the resumed ServerApp
            run.owner = flower_run
        run.snapshot(rnd, header.get("keep_after"))
        return run.client

    def handle(self, requests: Iterator[bytes], context, peer: str) -> Iterator[bytes]:
        for frame in requests:
            with self.lock:
                try:
                    header, blob = rpc.unpack(frame)
                    out = self.process(header, blob)
                except FedtuneError as e:
                    out = rpc.pack({"error": f"{type(e).__name__}: {e}"})
                except Exception as e:  # report to the server as one line; keep the node up
                    log.exception("fedtune client failed")
                    out = rpc.pack({"error": f"{type(e).__name__} on {client_name(self.cid)}: {e}"})
            yield out


def start_worker(
    partition_id: int,
    token: str,
    *,
    data_dir: str | None = None,
    split_root_cert: str | None = None,
    bind: str = "127.0.0.1:0",
):
    """Start the worker on loopback; returns ``(worker, grpc_server, port)``."""
    worker = NodeWorker(partition_id, data_dir, split_root_cert)
    server, port = rpc.serve(worker.handle, bind, lambda: {token: "clientapp"}, workers=4)
    return worker, server, port
