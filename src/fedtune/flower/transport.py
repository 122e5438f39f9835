"""The Flower transport: the round loop's exchanges travel through a Flower ``Grid``.

Every fedtune :class:`~fedtune.messages.Message` is encoded once (``Wire.send``, counted) and
travels as the ``blob`` bytes of a Flower ``ConfigRecord``; replies are decoded and counted on
arrival. Each SuperNode counts the same bytes on its side and reports them; the two counts must
agree. A framework whose server answers per-batch requests (:class:`~fedtune.frameworks.Serving`,
split learning) gets a direct gRPC stream per client and round (:mod:`.split_link`).

Client state lives on the SuperNodes (:mod:`.node`), keyed by a run key that the server
creates once per run and keeps in its checkpoint. A resumed run sends the same key and the
round it resumes after; each node rolls its client back to its state after that round.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from dataclasses import replace

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from .. import config
from ..compute import ComputeStats
from ..context import Context, ServerContext, build_context
from ..data import prepare_server
from ..errors import ConfigError, FedtuneError, MessageError
from ..frameworks import Framework, Server, Serving
from ..messages import DOWN, SERVER, UP, Wire, client_name, decode, encode
from ..messages import Message as FedMessage
from ..messages import Notices as FedNotices
from ..models import load_tokenizer
from ..runtime import faults
from ..runtime.records import RoundState
from .client_app import RECORD
from .split_link import receive_counted, start_split_service


def exchange(grid: Grid, messages: list[Message], timeout: float, poll: float = 0.1) -> list:
    """``grid.send_and_receive`` with a short poll: Flower 1.42's polls every 3 s, which adds
    up to 3 s to every exchange of every round; this pulls replies every ``poll`` seconds."""
    pending = set(grid.push_messages(messages))
    deadline, out = time.monotonic() + timeout, []
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        out += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending:
            time.sleep(poll)
    return out


def reason(m: Message) -> str:
    """The one-line cause in a Flower error reply (``"<class 'X'>:<'text'>"`` -> ``text``)."""
    found = re.fullmatch(r"<class '[\w.]+'>:<'(.*)'>", m.error.reason, re.S)
    return found.group(1) if found else m.error.reason


def discover(
    grid: Grid, n: int, timeout: float, header: dict, load_timeout: float
) -> dict[int, tuple[int, int]]:
    """Wait (``timeout``) for ``n`` SuperNodes and ask each which client it is and how many
    samples it holds: ``{cid: (node_id, samples)}``. ``header`` carries the run's config: each
    node loads its model and data to answer (``load_timeout``). Nodes with a partition id
    outside the run are left out."""
    deadline = time.monotonic() + timeout
    while len(ids := list(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise FedtuneError(f"{len(ids)} of {n} SuperNodes connected after {timeout:g} s")
        time.sleep(0.5)
    ask = ConfigRecord({"header": json.dumps(dict(header, query=True)), "blob": b""})
    asks = [Message(RecordDict({RECORD: ask}), dst_node_id=i, message_type="query") for i in ids]
    nodes: dict[int, tuple[int, int]] = {}
    for m in exchange(grid, asks, load_timeout):
        if m.has_error():
            raise FedtuneError(f"SuperNode {m.metadata.src_node_id}: {reason(m)}")
        try:
            answer = json.loads(str(m.content[RECORD]["header"]))
            pid, samples = count(answer, "partition-id"), count(answer, "samples")
        except (KeyError, ValueError, TypeError) as e:
            raise FedtuneError(
                f"SuperNode {m.metadata.src_node_id} answered the greeting unreadably: {e!r}"
            ) from None
        if not 0 <= pid < n:
            continue  # a node of another federation size: not in this run
        if pid in nodes:
            raise ConfigError(f"two SuperNodes have partition-id {pid}")
        if samples < 1:
            raise ConfigError(f"SuperNode with partition-id {pid} holds no training samples")
        nodes[pid] = (m.metadata.src_node_id, samples)
    missing = sorted(set(range(n)) - set(nodes))
    if missing:
        raise ConfigError(
            f"no SuperNode answered with partition-id {missing} within {load_timeout:g} s "
            f"(round-timeout; have {sorted(nodes)})"
        )
    return {c: nodes[c] for c in range(n)}


def count(d: dict, key: str) -> int:
    """``d[key]`` as a non-negative int; anything else is a ValueError."""
    v = d[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{key} = {v!r} is not a count")
    return v


def reply_header(rec: ConfigRecord) -> tuple[ComputeStats, dict[str, int], bool, float]:
    """A node's reply header: its compute, the bytes it counted, whether a reply follows, and
    the seconds of that compute spent on carried notices. Anything malformed is a
    :class:`MessageError` (the client is then lost for the round)."""
    try:
        h = json.loads(str(rec["header"]))
        s, counted = h["stats"], h["counted"]
        seconds, carried = float(s["seconds"]), float(h.get("carried_seconds", 0.0))
        if not (math.isfinite(seconds) and 0 <= carried <= seconds):
            raise ValueError("seconds out of range")
        if not isinstance(h["reply"], bool):
            raise ValueError("reply is not a bool")
        stats = ComputeStats(count(s, "flops"), seconds, count(s, "peak_memory_bytes"))
        return stats, {d: count(counted, d) for d in (UP, DOWN)}, h["reply"], carried
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise MessageError(f"reply header is malformed: {e!r}") from None


class FlowerTransport:
    """Exchanges over a Flower ``grid``; ``rc`` is the ServerApp's run config."""

    name = "flower"

    def __init__(self, grid: Grid, rc: dict, log=print) -> None:
        self.grid, self.rc, self.log = grid, rc, log
        self.wire = Wire()
        self.timeout = float(rc.get("round-timeout", 3600))
        self.run_key = secrets.token_hex(16)  # names this run's client state on the nodes
        self.resumed_after: int | None = None
        self.service = self.grpc_server = None
        self.tokens: dict[int, str] = {}
        self.counted: dict[int, dict[str, int]] = {}
        self.pending: dict[int, list[FedMessage]] = {}  # notices to carry with the next message

    def prepare(self, cfg: config.RunConfig, ctx: Context | None) -> ServerContext:
        """The server's context, with each client's sample count as its SuperNode reports it
        (a node may hold its own data, ``--data-dir``)."""
        if ctx is None:  # the server's data only: public and test sets, never the clients'
            tok = load_tokenizer(cfg.model.name)
            data = prepare_server(cfg.data, tok, cfg.model.max_length, cfg.seed)
            ctx = build_context(cfg, data=data)
        ctx = ctx.server()
        self.fed = cfg.fed
        self.wire.max_bytes = cfg.fed.max_message_bytes
        self.header = {
            "config": config.to_toml(cfg),
            "labels": ctx.data.label_names,
            "timeout": self.timeout,
        }
        n = ctx.data.num_clients
        wait = float(self.rc.get("node-timeout", 120))
        found = discover(self.grid, n, wait, self.header, self.timeout)
        self.nodes = {cid: node for cid, (node, _) in found.items()}
        self.by_node = {node: cid for cid, node in self.nodes.items()}
        pairs = ", ".join(f"{c}->{v}" for c, v in self.nodes.items())
        self.log(f"fedtune: {n} SuperNodes: {pairs}")
        sizes = [found[c][1] for c in range(n)]
        return replace(ctx, data=replace(ctx.data, client_sizes=sizes))

    def start(self, ctx: ServerContext, fw: Framework, server: Server) -> None:
        if isinstance(server, Serving):
            rc = self.rc
            self.service, self.grpc_server, port = start_split_service(
                server,
                self.wire,
                str(rc.get("split-bind", "0.0.0.0:0")),
                certfile=str(rc.get("split-certfile", "")) or None,
                keyfile=str(rc.get("split-keyfile", "")) or None,
                workers=ctx.data.num_clients + 4,
                threads=ctx.cfg.threads,
                turn_timeout=float(rc.get("split-turn-timeout", 60)),
                stall_timeout=float(rc.get("split-stall-timeout", 120)),
            )
            self.service.address = f"{rc.get('split-host', '127.0.0.1')}:{port}"
            self.log(
                f"fedtune: split server listening on port {port}, "
                f"clients use {self.service.address}"
            )

    def begin_round(self, rs: RoundState) -> None:
        # what the ledger already holds for this round (an earlier attempt): not this attempt's
        before = self.wire.ledger.round_totals(rs.rnd)
        self.before = {c: self._sums(before, c) for c in rs.sampled}
        self.counted = {cid: {UP: 0, DOWN: 0} for cid in rs.sampled}
        if self.service is not None:  # a client that drops out never opens its stream
            working = [c for c in rs.sampled if c not in rs.dropping]
            self.tokens = self.service.begin_round(rs.rnd, working, rs.server_meter)

    def exchange(self, rs: RoundState, outgoing: dict[int, FedMessage]) -> dict[int, FedMessage]:
        out = []
        # the split link serves the round's first exchange only (the split server closes its
        # requests when it ends); later ones (secure aggregation's steps) open no stream
        tokens, self.tokens = self.tokens, {}
        for cid, msg in outgoing.items():
            # notices waiting for this client travel first, counted in this round
            carried = [self.wire.send(m, rs.rnd) for m in self.pending.pop(cid, [])]
            h = dict(
                self.header,
                run_key=self.run_key,
                resumed_after=self.resumed_after,
                keep_after=self.keep_after(rs.rnd),
                drop=cid in rs.dropping_now(self.fed.dropout_exchange),
                carried=[len(b) for b in carried],
            )
            if cid in tokens:
                h["split"] = {
                    "address": self.service.address,
                    "token": tokens[cid],
                    "timeout": self.timeout,
                }
            blob = b"".join([*carried, self.wire.send(msg)])
            rec = ConfigRecord({"header": json.dumps(h), "blob": blob})
            out.append(
                Message(
                    RecordDict({RECORD: rec}),
                    dst_node_id=self.nodes[cid],
                    message_type="train",
                    group_id=str(rs.rnd),
                )
            )
        got: dict[int, FedMessage | None] = {}
        answered: set[int] = set()
        for m in exchange(self.grid, out, self.timeout):
            cid = self.by_node.get(m.metadata.src_node_id)
            if cid is None or cid not in outgoing or cid in answered:
                continue
            answered.add(cid)
            if m.has_error():  # like a client that raises in the simulation: lost, not fatal
                rs.lost[cid] = f"failed: {reason(m)[:200]}"
                continue
            try:
                rec = m.content[RECORD]
                stats, counted, has_reply, carried_s = reply_header(rec)
            except (KeyError, MessageError) as e:
                rs.lost[cid] = f"unreadable reply: {e}"
                continue
            rs.meters[cid].stats.add(stats)
            for d in (UP, DOWN):
                self.counted[cid][d] += counted[d]
            if not has_reply:  # e.g. KD's b7: the client distils and sends nothing back
                continue
            try:
                expect = (client_name(cid), SERVER, rs.rnd)
                got[cid] = receive_counted(self.wire, bytes(rec["blob"]), expect)
            except (KeyError, TypeError, MessageError) as e:
                rs.lost[cid] = f"bad reply: {e}"
                continue
            if (mine := self._mine(rs.rnd, cid)) != self.counted[cid]:
                rs.lost[cid] = f"it counted {self.counted[cid]} bytes, the server {mine}"
            elif faults.misses_deadline(rs.meters[cid].stats.seconds - carried_s, cid, self.fed):
                rs.lost[cid] = "deadline"  # it was sent (and counted); the server discards it
        for cid in outgoing:
            if cid not in answered or cid in rs.dropping_now(self.fed.dropout_exchange):
                rs.lost.setdefault(cid, "dropout")  # got its download and never answered
        if self.service is not None:  # the round's streams end with its exchange
            self.service.end_round()
            for cid in outgoing:
                if why := self.service.refused.get(client_name(cid)):
                    rs.lost[cid] = f"refused by the server: {why}"
        # in the sending order, like the in-process transport (float sums depend on it)
        return {c: got[c] for c in outgoing if got.get(c) is not None and c not in rs.lost}

    def notify(self, rs: RoundState, notices: FedNotices) -> None:
        """Carried with each client's next message when every client takes part in every
        round (so that is the next round's first exchange) and this is not the last round; a
        round trip of its own otherwise. The client handles a notice before that message, as
        it would have at the end of this round; its bytes and compute count in the round it
        travels in."""
        if self.fed.fraction_fit < 1 or rs.rnd >= self.fed.rounds:
            self.exchange(rs, notices)
            return
        for cid, msg in notices.items():
            self.pending.setdefault(cid, []).append(msg)

    def keep_after(self, rnd: int) -> int | None:
        """The last round a checkpoint was (or will have been) written after before ``rnd``:
        nodes keep client snapshots from then on; None when checkpoints are off."""
        every = self.fed.checkpoint_every
        if not every:
            return None
        return max(self.resumed_after or 0, (rnd - 1) // every * every)

    @staticmethod
    def _sums(totals: dict, cid: int) -> dict[str, int]:
        t = totals.get(client_name(cid), {})
        return {d: sum(t.get(d, {}).values()) for d in (UP, DOWN)}

    def _mine(self, rnd: int, cid: int) -> dict[str, int]:
        """The bytes this attempt at round ``rnd`` counted for ``cid``, by direction."""
        now = self._sums(self.wire.ledger.round_totals(rnd), cid)
        return {d: now[d] - self.before[cid][d] for d in (UP, DOWN)}

    def end_round(self, rs: RoundState) -> None:
        """Both ends counted the same bytes for every client that took part to the end (each
        reply was checked on arrival; this catches a message after it)."""
        for cid in (c for c in rs.sampled if c not in rs.lost):
            if (mine := self._mine(rs.rnd, cid)) != self.counted[cid]:  # it sent after its reply
                rs.lost[cid] = f"it counted {self.counted[cid]} bytes, the server {mine}"

    def local_clients(self) -> None:
        return None  # the clients' models live on the SuperNodes

    def state_dict(self) -> dict:
        """The run key, and the notices not delivered yet (encoded, as uint8 tensors)."""
        pending = {
            str(c): [torch.frombuffer(bytearray(encode(m)), dtype=torch.uint8) for m in ms]
            for c, ms in self.pending.items()
        }
        return {"run_key": self.run_key, "pending": pending}

    def load_state_dict(self, d: dict, after_round: int) -> None:
        if "run_key" not in d:
            raise ConfigError(
                "the checkpoint was written by the in-process runtime; "
                "resume it with `fedtune run --resume`"
            )
        self.run_key, self.resumed_after = str(d["run_key"]), after_round
        try:
            self.pending = {
                int(c): [decode(t.numpy().tobytes()) for t in ms]
                for c, ms in d.get("pending", {}).items()
            }
        except (MessageError, ValueError, AttributeError) as e:
            raise ConfigError(f"checkpoint transport.pending: {e}") from None

    def summary(self) -> dict:
        return {"nodes": {str(c): str(v) for c, v in self.nodes.items()}}

    def close(self) -> None:
        if self.grpc_server is not None:
            self.service.close()
            self.grpc_server.stop(grace=1)
