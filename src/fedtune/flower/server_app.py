"""The fedtune ServerApp: the simulation's round loop with Flower moving the messages.

:func:`run_federation` is :func:`fedtune.simulation.simulate` with the in-process hop replaced
by ``grid.send_and_receive``: each framework's ``Server.round`` generator is driven the same
way, every fedtune :class:`~fedtune.messages.Message` is encoded once (``Wire.send``, counted)
and travels as the ``blob`` bytes of a Flower ``ConfigRecord``; replies are decoded and counted
on arrival. Each client counts the same bytes on its side; the two counts must agree. The run
directory (config.toml, metrics.jsonl, summary.json, adapter/) is the simulation's.

Run config (``[tool.flwr.app.config]``, written by ``fedtune flower run``): ``fedtune-config``
(the resolved config as TOML text), ``out`` (run directory on the SuperLink host),
``split-bind`` / ``split-host`` (where the split server listens / how clients reach it),
``split-certfile`` / ``split-keyfile`` (TLS for that stream), ``node-timeout``,
``round-timeout``.
"""

from __future__ import annotations

import json
import re
import time
import tomllib

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from .. import config, faults, frameworks
from ..compute import ComputeMeter, ComputeStats
from ..context import build_context
from ..errors import ConfigError, FedtuneError, MessageError
from ..messages import DOWN, UP, Wire, client_name
from ..rundir import RunDir, summarize
from ..simulation import (
    RoundResult,
    evaluate_global,
    format_round,
    params_exchanged,
    round_record,
    sample_clients,
)
from .client_app import RECORD
from .split_link import receive_counted, start_split_service

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = dict(context.run_config)
    text = str(rc.get("fedtune-config", ""))
    if not text or not rc.get("out"):
        raise ConfigError("run config needs fedtune-config and out (use `fedtune flower run`)")
    cfg = config.from_dict(tomllib.loads(text))
    run_federation(grid, cfg, str(rc["out"]), rc)


def exchange(grid: Grid, messages: list[Message], timeout: float, poll: float = 0.1) -> list:
    """``grid.send_and_receive`` with a short poll: Flower 1.41's polls every 3 s, which adds
    up to 3 s to every exchange of every round; this pulls replies every ``poll`` seconds."""
    pending = set(grid.push_messages(messages))
    deadline, out = time.monotonic() + timeout, []
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        out += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if any(m.has_error() for m in got):
            break  # the caller reports it; waiting for the others would only delay that
        if pending:
            time.sleep(poll)
    return out


def reason(m: Message) -> str:
    """The one-line cause in a Flower error reply (``"<class 'X'>:<'text'>"`` -> ``text``)."""
    found = re.fullmatch(r"<class '[\w.]+'>:<'(.*)'>", m.error.reason, re.S)
    return found.group(1) if found else m.error.reason


def discover(grid: Grid, n: int, timeout: float) -> dict[int, int]:
    """Wait for ``n`` SuperNodes and ask each its partition id: ``{cid: node_id}``."""
    deadline = time.monotonic() + timeout
    while len(ids := list(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise FedtuneError(f"{len(ids)} of {n} SuperNodes connected after {timeout:g} s")
        time.sleep(0.5)
    asks = [Message(RecordDict({RECORD: ConfigRecord({})}), dst_node_id=i, message_type="query")
            for i in ids]  # fmt: skip
    nodes: dict[int, int] = {}
    for m in exchange(grid, asks, timeout):
        if m.has_error():
            raise FedtuneError(f"SuperNode {m.metadata.src_node_id}: {reason(m)}")
        pid = int(m.content[RECORD]["partition-id"])
        if pid in nodes:
            raise ConfigError(f"two SuperNodes have partition-id {pid}")
        nodes[pid] = m.metadata.src_node_id
    missing = sorted(set(range(n)) - set(nodes))
    if missing:
        raise ConfigError(
            f"no SuperNode answered with partition-id {missing} (have {sorted(nodes)})"
        )
    return {c: nodes[c] for c in range(n)}


def flower_round(grid, ctx, server, nodes, wire, rnd, sampled, service, header, rc):
    """One round over Flower; returns a :class:`~fedtune.simulation.RoundResult` like
    :func:`fedtune.simulation.run_round`. A client that does not answer within
    ``round-timeout`` is lost for the round (``dropout``: it got its download and never
    answered); the server aggregates the others, or abandons the round when fewer than
    ``fed.min_clients`` are left. A client that answers with an error stops the run."""
    cfg = ctx.cfg
    server_meter = ComputeMeter(ctx.device, cfg.flops, ctx.flop_cache)
    stats = {cid: ComputeStats() for cid in sampled}
    counted = {cid: {UP: 0, DOWN: 0} for cid in sampled}
    tokens = service.begin_round(rnd, sampled, server_meter) if service else {}
    by_node = {node: cid for cid, node in nodes.items()}
    timeout = float(rc.get("round-timeout", 3600))
    lost: dict[int, str] = {}
    gen = server.round(rnd, sampled)
    with server_meter.measure():
        outgoing = next(gen)
    while True:
        outgoing = {c: m for c, m in outgoing.items() if c not in lost}
        out = []
        for cid, msg in outgoing.items():
            h = dict(header)
            if service:
                h["split"] = {"address": service.address, "token": tokens[cid], "timeout": timeout}
            rec = ConfigRecord({"header": json.dumps(h), "blob": wire.send(msg)})
            out.append(Message(RecordDict({RECORD: rec}), dst_node_id=nodes[cid],
                               message_type="train", group_id=str(rnd)))  # fmt: skip
        got: dict[int, Message | None] = {}
        for m in exchange(grid, out, timeout):
            cid = by_node.get(m.metadata.src_node_id)
            if cid is None or cid not in outgoing:
                continue
            if m.has_error():
                raise FedtuneError(f"{client_name(cid)} failed in round {rnd}: {reason(m)}")
            rec = m.content[RECORD]
            h = json.loads(str(rec["header"]))
            stats[cid].add(ComputeStats(**h["stats"]))
            for d in (UP, DOWN):
                counted[cid][d] += int(h["counted"][d])
            got[cid] = receive_counted(wire, bytes(rec["blob"])) if h["reply"] else None
        lost.update({c: "dropout" for c in outgoing if c not in got})
        if faults.too_few(len(sampled) - len(lost), cfg.fed.min_clients):
            gen.close()
            return RoundResult(sampled, {}, stats, server_meter.stats, lost, completed=False)
        # in the sending order, like the simulation (float sums depend on the order)
        replies = {c: got[c] for c in outgoing if got.get(c) is not None}
        try:
            with server_meter.measure():
                outgoing = gen.send(replies)
        except StopIteration as stop:
            metrics = stop.value or {}
            break
    totals = wire.ledger.round_totals(rnd)
    for cid in (c for c in sampled if c not in lost):
        mine = {d: sum(totals.get(client_name(cid), {}).get(d, {}).values()) for d in (UP, DOWN)}
        if mine != counted[cid]:
            raise MessageError(f"round {rnd}: server counted {mine} bytes for "
                               f"{client_name(cid)}, the client {counted[cid]}")  # fmt: skip
    return RoundResult(sampled, metrics, stats, server_meter.stats, lost)


def run_federation(grid: Grid, cfg: config.RunConfig, out: str, rc: dict, log=print) -> dict:
    """Run ``cfg`` on the SuperNodes of ``grid``; writes ``out`` like the simulation."""
    t_start = time.perf_counter()
    fw = frameworks.get(cfg.fed.framework)
    RunDir.check(out)
    ctx = build_context(cfg)
    rundir = RunDir.create(out, cfg)
    server = fw.Server(ctx)
    wire = Wire(max_bytes=cfg.fed.max_message_bytes)
    n = len(ctx.data.client_idx)
    nodes = discover(grid, n, float(rc.get("node-timeout", 120)))
    log(f"fedtune: {n} SuperNodes: " + ", ".join(f"{c}->{nodes[c]}" for c in nodes))
    service = grpc_server = None
    if fw.NAME == "split":
        service, grpc_server, port = start_split_service(
            server, wire, str(rc.get("split-bind", "0.0.0.0:0")),
            certfile=str(rc.get("split-certfile", "")) or None,
            keyfile=str(rc.get("split-keyfile", "")) or None, workers=n + 4,
        )  # fmt: skip
        service.address = f"{rc.get('split-host', '127.0.0.1')}:{port}"
        log(f"fedtune: split server listening on port {port}, clients use {service.address}")
    header = {"config": config.to_toml(cfg), "labels": ctx.data.label_names,
              "timeout": float(rc.get("round-timeout", 3600))}  # fmt: skip
    history: list[dict] = []
    load_seconds = time.perf_counter() - t_start
    try:
        for rnd in range(1, cfg.fed.rounds + 1):
            t0 = time.perf_counter()
            sampled = sample_clients(n, cfg.fed.fraction_fit, cfg.fed.min_clients, cfg.seed, rnd)
            result = flower_round(grid, ctx, server, nodes, wire, rnd, sampled, service,
                                  header, rc)  # fmt: skip
            if not result.completed:
                log(f"round {rnd}: only {len(sampled) - len(result.lost)} of {len(sampled)} "
                    f"clients answered, fewer than fed.min_clients; skipping the round")  # fmt: skip
            record = round_record(rnd, result, wire)
            record.update(attempts=1, round_seconds=time.perf_counter() - t0)
            if rnd % cfg.fed.eval_every == 0 or rnd == cfg.fed.rounds:
                record.update(evaluate_global(ctx, server))
            history.append(record)
            rundir.append_metrics(record)
            log(format_round(record, cfg.fed.rounds))
    finally:
        if grpc_server is not None:
            service.close()
            grpc_server.stop(grace=1)
    summary = summarize(cfg, ctx, history, wire.ledger, params_exchanged(server))
    summary.update(load_seconds=load_seconds, wall_seconds=time.perf_counter() - t_start,
                   runtime="flower", nodes={str(c): str(v) for c, v in nodes.items()})  # fmt: skip
    rundir.finish(summary, ctx.model, server.eval_state())
    log(f"fedtune: run written to {out}")
    return summary
