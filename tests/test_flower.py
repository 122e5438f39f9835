"""Flower deployment: a real SuperLink and 3 SuperNodes on 127.0.0.1 against the simulation.

Each run is checked against the in-process simulation of the same config and seed: accuracy,
macro-F1, bytes per client (by direction, kind and client), FLOPs and the training and test
loss must be identical (see ``assert_same``). Split-FedLLM runs
on tiny-llama with LoRA dropout 0, because the simulation's split server runs in the client's
process and draws its dropout masks from that client's RNG stream, which a real server cannot
(tiny-gpt2 has dropout 0.1 in every block, not configurable).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from conftest import gen_cfg, tiny_cfg, write_synthetic  # noqa: E402
from fedtune import config  # noqa: E402
from fedtune.errors import MessageError  # noqa: E402
from fedtune.flower import rpc  # noqa: E402
from fedtune.flower.deploy import port_open  # noqa: E402
from fedtune.flower.local import LocalFederation  # noqa: E402
from fedtune.runtime import simulate  # noqa: E402

pytestmark = pytest.mark.slow

SETTINGS = {
    "fedllm": {},
    "kd": {},
    "split": {"model": {"name": "tiny-llama", "lora_dropout": 0.0}},
    # secure aggregation of split's client LoRA: three more exchanges a round, which open no
    # split stream; the sum (so every number) is exact
    "secagg": {
        "fed": {"framework": "split"},
        "model": {"name": "tiny-llama", "lora_dropout": 0.0},
        "privacy": {"secagg": True},
    },
    # [fedopt] reaches the nodes: clients of ranks 2, 4, 4 (each takes its rank from what it
    # receives), FedProx on the clients, FedAdam on the server
    "fedopt": {
        "fed": {"framework": "fedllm"},
        "fedopt": {
            "client_ranks": [2, 4, 4],
            "prox_mu": 0.1,
            "server_opt": "adam",
            "server_lr": 0.01,
        },
    },
    # FLoRA: a1 carries the stacks, each node merges them into its own frozen weights
    "flora": {
        "fed": {"framework": "fedllm"},
        "fedopt": {"client_ranks": [2, 4, 4], "rank_aggregation": "flora"},
    },
}
EXACT = (
    "accuracy",
    "macro_f1",
    "bytes_up_per_client",
    "bytes_down_per_client",
    "bytes_by_kind",
    "client_flops",
    "server_flops",
    "clients",
)


def make_cfg(data: Path, name: str) -> config.RunConfig:
    extra = SETTINGS[name]
    fw = extra.get("fed", {}).get("framework", name)
    cfg = tiny_cfg(data, fed={"framework": fw, "rounds": 2})
    return config.with_overrides(cfg, **extra) if extra else cfg


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


MOVED = ("bytes_down_per_client", "bytes_by_kind", "client_flops")  # with a carried notice


def per_client(rows: list[dict]) -> dict[str, tuple[int, ...]]:
    """Each client's bytes up, bytes down and FLOPs, summed over the rounds."""
    out: dict[str, tuple[int, ...]] = {}
    for r in rows:
        for cid, p in r["per_client"].items():
            got = (p["bytes_up"], p["bytes_down"], p["flops"])
            out[cid] = tuple(x + y for x, y in zip(out.get(cid, (0, 0, 0)), got, strict=True))
    return out


def assert_same(sim: Path, flower: Path, carried: bool = False) -> None:
    """Same numbers from both runtimes, the training loss included: counting FLOPs (each
    SuperNode counts its own first step of each shape, the simulation once per process) runs
    every op as it runs uncounted. ``carried``: KD's b7 of round 1 travels with round 2's
    message on Flower, so its bytes and b8's FLOPs count in round 2 there: the run's totals
    (and so the summary's per-round means) are the same, and round 2 holds round 1's move."""
    a, b = metrics(sim), metrics(flower)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b, strict=True):
        for k in (*EXACT, "train_loss", "test_loss"):
            if not (carried and k in MOVED):
                assert ra[k] == rb[k], (k, ra[k], rb[k])
        if not carried:
            assert per_client([ra]) == per_client([rb])
        assert rb["bytes_up_per_client"] > 0 and rb["bytes_down_per_client"] > 0
    assert per_client(a) == per_client(b)
    if carried:
        assert b[0]["bytes_down_per_client"] < a[0]["bytes_down_per_client"]
        assert b[0]["client_flops"] < a[0]["client_flops"]  # round 1's b8 ran in round 2
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (sim, flower))
    for k in ("bytes_up_per_client_per_round", "bytes_down_per_client_per_round"):
        assert sa[k] == sb[k], k
    for name in ("config.toml", "summary.json", "adapter/adapter_model.safetensors"):
        assert (flower / name).is_file(), name
    summary = json.loads((flower / "summary.json").read_text())
    assert summary["runtime"] == "flower" and summary["rounds"] == 2


def assert_stopped(fed: LocalFederation) -> None:
    """Every process the test started is gone, with what it spawned, and no port is open."""
    assert fed.procs and all(p.poll() is not None for p in fed.procs)
    assert fed.spawned, "the SuperLink and SuperNodes spawned their app processes"
    assert not fed.leftovers()
    ports = fed.listening_ports()
    assert len(ports) >= 1 + 2 * 3  # SuperLink, 3 runtime APIs, 3 fedtune workers
    assert not [p for p in ports if port_open(p)]


def run_and_compare(fed: LocalFederation, tmp: Path, data: Path, frameworks) -> dict:
    seconds = {}
    for fw in frameworks:
        cfg = make_cfg(data, fw)
        t0 = time.perf_counter()
        fed.run(cfg, tmp / f"flower-{fw}", timeout=400)
        seconds[fw] = time.perf_counter() - t0
        simulate(cfg, tmp / f"sim-{fw}", log=None)
        assert_same(tmp / f"sim-{fw}", tmp / f"flower-{fw}", carried=fw == "kd")
        rounds = {
            k: [f"{r['round_seconds']:.1f}" for r in metrics(tmp / f"{k}-{fw}")]
            for k in ("sim", "flower")
        }
        print(
            f"{fw}: seconds per round: simulation {rounds['sim']}, Flower {rounds['flower']};"
            f" Flower run {seconds[fw]:.1f} s"
        )  # shown with pytest -s
    return seconds


def test_flower_matches_simulation(tmp_path):
    data = write_synthetic(tmp_path / "data")
    fed = LocalFederation(tmp_path / "fed", 3)
    try:
        fed.start()
        run_and_compare(fed, tmp_path, data, ("fedllm", "kd", "split", "secagg", "fedopt", "flora"))
        for home in ("superlink", "node-0", "node-1", "node-2"):  # FLWR_HOME in the run folder
            assert list((tmp_path / "fed" / "flwr" / home / "apps").glob("fedtune.*")), home
    finally:
        fed.stop()
    assert_stopped(fed)


def test_flower_runs_a_generation_task(tmp_path):
    """A causal-LM task on a loopback federation matches the simulation: perplexity and the
    generated text's scores every evaluated round (round 0 included), bytes and FLOPs."""
    data = write_synthetic(tmp_path / "data")
    cfg = gen_cfg(data, fed={"framework": "fedllm", "rounds": 2})
    fed = LocalFederation(tmp_path / "fed", 3)
    try:
        fed.start()
        fed.run(cfg, tmp_path / "flower", timeout=400)
    finally:
        fed.stop()
    simulate(cfg, tmp_path / "sim", log=None)
    a, b = metrics(tmp_path / "sim"), metrics(tmp_path / "flower")
    assert [r["round"] for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b, strict=True):
        for k in (
            "bleu",
            "rouge_l",
            "exact_match",
            "sample",
            "bytes_by_kind",
            "client_flops",
            "perplexity",
        ):
            assert ra.get(k) == rb.get(k), (k, ra.get(k), rb.get(k))
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["task"] == "generation" and summary["final"]["perplexity"] > 0


def test_flower_tls_and_node_auth(tmp_path):
    """TLS on every link (Flower's and the split stream) and SuperNode authentication: the
    three registered nodes run Split-FedLLM; a node with an unregistered key is refused."""
    data = write_synthetic(tmp_path / "data")
    fed = LocalFederation(tmp_path / "fed", 3, tls=True, auth=True)
    try:
        fed.start()
        rogue = fed.add_node(3, register=False, max_retries=2)
        run_and_compare(fed, tmp_path, data, ("split",))
        deadline = time.monotonic() + 30
        while rogue.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert rogue.poll() not in (None, 0), "the unregistered SuperNode was not refused"
        log = "\n".join(
            fed.log(p.name.removesuffix(".log"))
            for p in (tmp_path / "fed" / "logs").glob("node-3-*.log")
        )
        assert "Failed to activate SuperNode" in log and "SuperNode ID" not in log
        assert "No SuperNode found with the given public key" in fed.log("superlink")
    finally:
        fed.stop()
    assert_stopped(fed)


def test_split_stream_refuses_and_reports_a_vanished_server(tmp_path):
    """Wrong token: refused; a server that goes away mid-stream: one-line MessageError."""

    def echo(requests, context, peer):
        yield from requests

    server, port = rpc.serve(echo, "127.0.0.1:0", lambda: {"good": "client-0"})
    try:
        with rpc.Stream(f"127.0.0.1:{port}", "good", timeout=10) as s:
            assert s.call(b"abc") == b"abc"
        bad = rpc.Stream(f"127.0.0.1:{port}", "bad", timeout=10)
        with pytest.raises(MessageError, match="UNAUTHENTICATED"):
            bad.call(b"x")
        live = rpc.Stream(f"127.0.0.1:{port}", "good", timeout=10, what="split server")
        assert live.call(b"1") == b"1"
    finally:
        server.stop(grace=None).wait()
    with pytest.raises(MessageError, match=r"split server at .* went away"):
        live.call(b"2")
    assert not port_open(port)
    with pytest.raises(MessageError, match="unreachable"):
        rpc.Stream(f"127.0.0.1:{port}", "good", connect_timeout=0.5)
    with pytest.raises(MessageError, match="frame header"):
        rpc.unpack(b"\x10\x00\x00\x00{}")


def test_own_data_folder(tmp_path):
    """``--data-dir``: train.csv is all this client's, public.csv the public set; the run's
    label names fix the label ids; an unknown label is a one-line DataError."""
    from fedtune.errors import DataError
    from fedtune.flower.node import own_data
    from fedtune.models import load_tokenizer

    folder = tmp_path / "node"
    folder.mkdir()
    (folder / "train.csv").write_text("text,category\nmy card,card\nsend it,transfer\natm,cash\n")
    (folder / "public.csv").write_text("text,category\nfee please,fee\n")
    cfg = tiny_cfg(tmp_path)
    labels = ["card", "cash", "fee", "transfer"]
    d = own_data(cfg, folder, labels, load_tokenizer("tiny-gpt2"))
    assert d.train.labels.tolist() == [0, 3, 1] and d.samples.tolist() == [0, 1, 2]
    assert len(d.public) == 1 and d.public.labels.tolist() == [-1]  # public labels: not read
    assert d.num_labels == 4
    with pytest.raises(DataError, match="not in the run's label set: fee"):
        own_data(cfg, folder, ["card", "cash", "transfer"], load_tokenizer("tiny-gpt2"))


def test_split_service_serves_whole_streams_in_sampling_order():
    """Client 1 connects first but waits until client 0's stream is done (the simulation's
    order of server-model updates); bytes are counted on both ends; a forged sender is
    refused with a short code, its reason kept on the server."""
    import threading
    from types import SimpleNamespace

    from fedtune.compute import ComputeMeter
    from fedtune.flower.split_link import RemoteLink, start_split_service
    from fedtune.messages import LABELS, METADATA, SERVER, Message, Wire, client_name

    class Echo:
        ctx = SimpleNamespace(cfg=SimpleNamespace(threads=1))
        seen: list[str] = []

        def serve(self, msg):
            self.seen.append(msg.sender)
            return Message(METADATA, msg.round, SERVER, msg.sender, meta={"n": len(self.seen)})

        def refuse(self, sender, why):
            self.refused = (sender, why)

    server, wire = Echo(), Wire()
    service, grpc_server, port = start_split_service(server, wire, "127.0.0.1:0")
    tokens = service.begin_round(1, [0, 1], ComputeMeter())
    wires = {0: Wire(), 1: Wire()}

    def client(cid: int, sender: str | None = None) -> None:
        with rpc.Stream(f"127.0.0.1:{port}", tokens[cid], timeout=20) as s:
            link = RemoteLink(s, wires[cid], None)
            for _ in range(2):
                link.call(Message(LABELS, 1, sender or client_name(cid), SERVER, meta={"x": 1}))

    try:
        late = threading.Thread(target=client, args=(1,))
        late.start()
        time.sleep(1.0)
        assert server.seen == []  # client 1 waits for its turn
        client(0)
        late.join(20)
        assert server.seen == ["client-0"] * 2 + ["client-1"] * 2
        for cid in (0, 1):
            name = client_name(cid)
            assert wire.ledger.round_totals(1)[name] == wires[cid].ledger.round_totals(1)[name]
        tokens = service.begin_round(1, [0], ComputeMeter())
        with pytest.raises(MessageError, match="INVALID_ARGUMENT: refused$"):  # no reason echoed
            client(0, sender="client-5")
        assert "marked 'client-5'" in service.refused["client-0"]
    finally:
        service.close()
        grpc_server.stop(grace=None).wait()


def test_serverapp_killed_after_round_1_resumes_to_the_same_run(tmp_path):
    """SIGKILL the ServerApp once round 1 of 3 is checkpointed (the SuperNodes may already be
    training round 2), then ``--resume``: the same metrics and adapter as an uninterrupted run.

    KD-FedLLM, whose clients hold the most state (local model and its Adam state): the nodes
    keep each client's state under the run key from the checkpoint, with snapshots since the
    last checkpoint, and roll back to it when the resumed ServerApp's first message arrives."""
    import os
    import signal

    from fedtune.runtime import checkpoint

    data = write_synthetic(tmp_path / "data")
    # Simulated faults on Flower too: with every client required (min_clients 3), round 1's
    # first attempt loses client 0 and is retried; round 3 never gets all three and is skipped.
    # flops=off: this test is about resuming, not measuring (counting changes no number).
    faults = {"rounds": 3, "dropout": 0.3, "min_clients": 3, "max_retries": 1}
    cfg = config.with_overrides(make_cfg(data, "kd"), fed=faults, flops="off")
    fed = LocalFederation(tmp_path / "fed", 3)
    try:
        fed.start()
        fed.run(cfg, tmp_path / "whole", timeout=400)
        cut = tmp_path / "cut"
        proc = fed.launch(cfg, cut)
        deadline = time.monotonic() + 300
        while True:
            state = checkpoint.load(cut) if (cut / checkpoint.FILE).is_file() else None
            if state is not None and state["round"] >= 1:
                break
            assert time.monotonic() < deadline and proc.poll() is None, fed.log("run-cut")
            time.sleep(0.05)
        pids = fed.serverapps()
        assert pids, "no ServerApp process to kill"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        killed_after = state["round"]
        proc.terminate()
        proc.wait(30)
        assert not (cut / "summary.json").exists()
        fed.run(cfg, cut, timeout=400, resume=True)
        assert f"resuming {cut} after round" in fed.log("run-cut-resumed")
    finally:
        fed.stop()
    assert killed_after == 1 or killed_after == 2  # round 2 may finish before the kill lands
    a, b = metrics(tmp_path / "whole"), metrics(cut)
    assert [r["round"] for r in b] == [1, 2, 3]
    assert [(r["attempts"], r["skipped"]) for r in a] == [(2, False), (1, False), (2, True)]
    simulate(cfg, tmp_path / "sim", log=None)  # the same faults in-process: the same run
    for ra, rs in zip(a, metrics(tmp_path / "sim"), strict=True):
        for k in (*EXACT, "train_loss", "attempts", "dropped", "skipped"):
            if k not in MOVED:  # KD's b7 travels with the next round's message on Flower
                assert ra.get(k) == rs.get(k), (ra["round"], k, ra.get(k), rs.get(k))
    # uploads do not move; a download carried into a round where its client drops out is
    # spent but, like every dropped client's, left out of the per-client means
    ups = [{c: v[0] for c, v in per_client(x).items()} for x in (a, metrics(tmp_path / "sim"))]
    assert ups[0] == ups[1]
    for ra, rb in zip(a, b, strict=True):
        for k in (*EXACT, "train_loss", "client_accuracy"):
            assert ra.get(k) == rb.get(k), (ra["round"], k, ra.get(k), rb.get(k))
        for cid, pa in ra["per_client"].items():
            pb = rb["per_client"][cid]
            assert (pa["bytes_up"], pa["bytes_down"]) == (pb["bytes_up"], pb["bytes_down"])
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    wb = load_file(cut / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch_equal(wa[k], wb[k]) for k in wa)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_a_malformed_reply_header_is_a_message_error():
    """What a SuperNode says about its work is checked before it is used: a malformed header
    makes that client lost for the round (``unreadable reply``), not a crash of the run."""
    from flwr.app import ConfigRecord

    from fedtune.flower.transport import reply_header

    good = {
        "stats": {"flops": 10, "seconds": 0.5, "peak_memory_bytes": 7},
        "counted": {"up": 3, "down": 4},
        "reply": True,
        "carried_seconds": 0.25,
    }
    stats, counted, has_reply, carried = reply_header(ConfigRecord({"header": json.dumps(good)}))
    assert (stats.flops, stats.seconds, stats.peak_memory_bytes) == (10, 0.5, 7)
    assert counted == {"up": 3, "down": 4} and has_reply is True and carried == 0.25
    bad = [
        "{not json",
        json.dumps({**good, "stats": {"flops": 1}}),
        json.dumps({**good, "counted": {"up": -1, "down": 4}}),
        json.dumps({**good, "counted": {"up": "3", "down": 4}}),
        json.dumps({**good, "stats": {**good["stats"], "seconds": float("nan")}}),
        json.dumps({**good, "reply": "yes"}),
        json.dumps({**good, "carried_seconds": 0.75}),  # more than all of its compute
        json.dumps({**good, "carried_seconds": "x"}),
    ]
    for text in bad:
        with pytest.raises(MessageError, match="reply header is malformed"):
            reply_header(ConfigRecord({"header": text}))


def test_the_supernode_poll_shortens_only_flowers_idle_sleep(monkeypatch):
    """``--poll-seconds``: Flower's SuperNode loop sleeps that long instead of its hard-coded
    3 s after an empty pull; its other sleeps and the rest of ``time`` are untouched."""
    from types import SimpleNamespace

    from flwr.supernode import start_client_internal as node

    from fedtune.flower import deploy

    slept: list[float] = []
    monkeypatch.setattr(node, "time", SimpleNamespace(sleep=slept.append, time=lambda: 7.0))
    deploy.set_poll_interval(0.25)
    node.time.sleep(3)
    node.time.sleep(0.5)
    assert slept == [0.25, 0.5] and node.time.time() == 7.0
    before = node.time
    deploy.set_poll_interval(deploy.FLOWER_POLL_SECONDS)  # Flower's own: nothing to change
    assert node.time is before
