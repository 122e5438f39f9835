"""A malicious client cannot crash, poison or stall a federation.

Client 0 is an :class:`adversary.Adversary`: it does its honest work, then sends it with one
thing wrong (NaN / Inf / huge values, wrong shapes and names, an absurd sample count, another
client's name, last round's number; for Split-FedLLM also malformed per-batch requests). Each
run must complete with client 0 named in every round's ``rejected_reasons``, and the honest
clients' result must be that of the same run without client 0 (its reference: client 0 silent):
accuracy within 2 points (the issue's bar) and, since a refused client's server-side updates
are undone, the same evaluation loss. The split link's turn rules are tested on a real gRPC
stream; the same attacks over a loopback Flower federation are in the slow tests at the end.
"""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
import torch

from adversary import REQUESTS, UPLOADS, Adversary
from conftest import tiny_cfg
from fedtune import config
from fedtune.errors import MessageError
from fedtune.messages import PARAMETERS, SERVER, Message, client_name
from fedtune.runtime import run
from fedtune.runtime.inprocess import InProcess

ROUNDS = 2
# KD's logits are a prediction: huge ones are a confident client, not a malformed message
# (kd.aggregate=median is the defence against a confident liar).
KD_UPLOADS = [a for a in UPLOADS if a != "huge"]
CASES = (
    [("fedllm", a) for a in UPLOADS]
    + [("kd", a) for a in KD_UPLOADS]
    + [("split", a) for a in [*UPLOADS, *REQUESTS]]
)


class Hostile(InProcess):
    """The in-process runtime with client 0 replaced by an :class:`Adversary`."""

    def __init__(self, attack: str) -> None:
        super().__init__()
        self.attack = attack

    def start(self, ctx, fw, server) -> None:
        super().start(ctx, fw, server)
        rounds = range(1, ctx.cfg.fed.rounds + 1)
        self.clients[0] = Adversary(self.clients[0], {r: self.attack for r in rounds})


def cfg_for(data, fw: str, rounds: int = ROUNDS) -> config.RunConfig:
    """The tiny config, 3 local steps a round (split: 24 samples, 3 batches)."""
    return tiny_cfg(data, fed={"framework": fw, "rounds": rounds}, train={"local_steps": 3})


_REFERENCE: dict[tuple[str, str], dict] = {}


def reference(data, fw: str, attack: str) -> dict:
    """The honest clients' run without client 0's part: ``silent`` (it sends nothing) for a
    bad split request, which the server undoes; ``mute`` (its upload withheld) for a bad
    upload: the split batches the server accepted before it stay in the shared server half."""
    how = "mute" if attack in UPLOADS else "silent"
    if (fw, how) not in _REFERENCE:
        _REFERENCE[fw, how] = run(cfg_for(data, fw), Hostile(how), log=None).history[-1]
    return _REFERENCE[fw, how]


@pytest.mark.parametrize(("fw", "attack"), CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_a_malicious_client_is_named_and_changes_nothing(synth_dir, fw, attack):
    result = run(cfg_for(synth_dir, fw), Hostile(attack), log=None)
    for record in result.history:
        assert "0" in record["rejected_reasons"], (attack, record["rejected_reasons"])
        assert set(record["rejected_reasons"]) == {"0"}  # nobody honest pays for it
    last, ref = result.history[-1], reference(synth_dir, fw, attack)
    assert math.isfinite(last["test_loss"])
    assert abs(last["accuracy"] - ref["accuracy"]) <= 0.02
    assert last["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-5)


def test_a_clean_run_differs_from_the_reference(synth_dir):
    """The comparison above can fail: with client 0 honest the result is another one."""
    clean = run(cfg_for(synth_dir, "fedllm"), InProcess(), log=None).history[-1]
    assert clean["rejected_reasons"] == {}
    assert clean["test_loss"] != pytest.approx(reference(synth_dir, "fedllm", "nan")["test_loss"])


# ----------------------------------------------------------------------------- split turns


class Echo:
    """A Serving server that answers every request with its count."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def serve(self, msg):
        from fedtune.messages import METADATA, SERVER, Message

        self.seen.append(msg.sender)
        return Message(METADATA, msg.round, SERVER, msg.sender, meta={"n": len(self.seen)})

    def refuse(self, sender, why):
        self.refused = (sender, why)


@pytest.fixture
def service():
    from fedtune.flower.split_link import start_split_service
    from fedtune.messages import Wire

    server = Echo()
    svc, grpc_server, port = start_split_service(
        server, Wire(), "127.0.0.1:0", turn_timeout=1.0, stall_timeout=1.0
    )
    svc.echo, svc.port = server, port
    yield svc
    svc.close()
    grpc_server.stop(grace=None).wait()


def calls(svc, token: str, cid: int, n: int = 2, pause: float = 0.0, sender=None):
    """Client ``cid``'s stream: ``n`` requests, ``pause`` seconds before each."""
    from fedtune.compute import ComputeMeter
    from fedtune.flower import rpc
    from fedtune.flower.split_link import RemoteLink
    from fedtune.messages import LABELS, SERVER, Message, Wire, client_name

    with rpc.Stream(f"127.0.0.1:{svc.port}", token, timeout=30) as s:
        link = RemoteLink(s, Wire(), ComputeMeter())
        for _ in range(n):
            time.sleep(pause)
            msg = Message(LABELS, svc.round, sender or client_name(cid), SERVER, meta={"x": 1})
            link.call(msg)


def test_a_no_show_is_skipped_after_the_turn_timeout(service):
    from fedtune.compute import ComputeMeter

    tokens = service.begin_round(1, [0, 1], ComputeMeter())
    t0 = time.monotonic()
    calls(service, tokens[1], 1)  # client 0 never opens its stream
    assert 0.9 < time.monotonic() - t0 < 5  # one turn timeout, not the round's
    assert service.echo.seen == ["client-1"] * 2
    assert "did not open" in service.refused["client-0"]


def test_a_stalled_stream_is_cut_and_the_next_client_goes(service):
    from fedtune.compute import ComputeMeter

    tokens = service.begin_round(1, [0, 1], ComputeMeter())
    errors: list[str] = []

    def stall():
        try:
            calls(service, tokens[0], 0, n=2, pause=3.0)  # 3 s between requests: a stall
        except MessageError as e:
            errors.append(str(e))

    t = threading.Thread(target=stall)
    t.start()
    time.sleep(0.5)
    calls(service, tokens[1], 1)
    t.join(10)
    assert "stalled" in service.refused["client-0"] and "CANCELLED" in errors[0]
    assert service.echo.seen == ["client-1"] * 2


def test_one_stream_per_token_and_streams_end_with_their_round(service):
    from fedtune.compute import ComputeMeter
    from fedtune.flower import rpc

    tokens = service.begin_round(1, [0], ComputeMeter())
    first = threading.Thread(target=calls, args=(service, tokens[0], 0, 2, 0.5))
    first.start()
    time.sleep(0.2)
    with pytest.raises(MessageError, match="PERMISSION_DENIED"):  # a second stream: refused
        calls(service, tokens[0], 0, 1)
    first.join(10)
    assert service.echo.seen == ["client-0"] * 2 and service.refused == {}  # undisturbed
    tokens = service.begin_round(2, [0], ComputeMeter())
    with rpc.Stream(f"127.0.0.1:{service.port}", tokens[0], timeout=30) as s:
        from fedtune.flower.split_link import RemoteLink
        from fedtune.messages import LABELS, SERVER, Message, Wire

        link = RemoteLink(s, Wire(), None)
        link.call(Message(LABELS, 2, "client-0", SERVER, meta={"x": 1}))
        service.end_round()  # the round was aggregated: its streams end
        with pytest.raises(MessageError, match="CANCELLED|refused"):
            link.call(Message(LABELS, 2, "client-0", SERVER, meta={"x": 1}))
    for token in (tokens[0], "a-guessed-token"):  # last round's token is void, a guess too
        with pytest.raises(MessageError, match="UNAUTHENTICATED"):
            calls(service, token, 0, 1)
    assert service.echo.seen == ["client-0"] * 3


def test_tokens_are_compared_in_constant_time():
    """Every token is compared (no early exit), with hmac.compare_digest."""
    import hmac
    from unittest import mock

    from fedtune.flower.rpc import find_peer

    tokens = {f"token-{i}": f"client-{i}" for i in range(5)}
    with mock.patch.object(hmac, "compare_digest", wraps=hmac.compare_digest) as cd:
        assert find_peer(tokens, "token-0") == "client-0"
        assert cd.call_count == 5
        assert find_peer(tokens, "token-9") is None


# ----------------------------------------------------------------------------- on Flower


FLOWER_SCHEDULES = {
    "kd": {1: "nan", 2: "forge", 3: "samples"},
    "split": {1: "act_long", 2: "req_forge", 3: "stall", 4: "labels_range", 5: "late_replay"},
}


@pytest.mark.slow
def test_a_malicious_supernode_is_lost_and_changes_nothing(tmp_path, synth_dir, monkeypatch):
    """The same attacks from a SuperNode of a loopback Flower federation (its client 0 loads
    tests/adversary.py as a plug-in), KD then split; a stall is cut after
    split-stall-timeout. The result is the simulation's without client 0."""
    pytest.importorskip("flwr")
    from pathlib import Path

    from fedtune.flower.local import LocalFederation

    spec = {"schedules": FLOWER_SCHEDULES, "stall": 8}
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    monkeypatch.setenv("FEDTUNE_ADVERSARY", json.dumps(spec))
    timeouts = {"split-turn-timeout": 5, "split-stall-timeout": 4}
    with LocalFederation(tmp_path / "fed", 3, node_args={0: {"plugin": "adversary"}}) as fed:
        for fw, schedule in FLOWER_SCHEDULES.items():
            cfg = cfg_for(synth_dir, fw, len(schedule))
            if fw == "split":  # no dropout: the simulation's split server draws it otherwise
                cfg = config.with_overrides(cfg, model={"name": "tiny-llama", "lora_dropout": 0.0})
            out = tmp_path / fw
            fed.run(cfg, out, **timeouts)
            history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            assert len(history) == len(schedule)
            for record in history:
                assert set(record["rejected_reasons"]) == {"0"}, record["rejected_reasons"]
            ref = run(cfg, Hostile("silent"), log=None).history[-1]
            assert abs(history[-1]["accuracy"] - ref["accuracy"]) <= 0.02
            assert history[-1]["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-5)


# ----------------------------------------------------------------------------- Flower replies

NODE_FAULTS = ["honest", "error", "header", "miscount", "forge", "replay", "absent"]


class FakeGrid:
    """A Flower ``Grid`` whose node ``10 + i`` answers as ``NODE_FAULTS[i]``: what the Flower
    transport receives, without a SuperLink (the transport reads only these fields)."""

    def __init__(self) -> None:
        self.pushed: dict[str, object] = {}

    def push_messages(self, messages):
        ids = []
        for m in messages:
            ids.append(f"m{len(self.pushed)}")
            self.pushed[ids[-1]] = m
        return ids

    def pull_messages(self, ids):
        from types import SimpleNamespace

        from flwr.app import ConfigRecord

        from fedtune.flower.client_app import RECORD
        from fedtune.messages import PARAMETERS, Wire, client_name

        out = []
        for mid in ids:
            m = self.pushed[mid]
            node = m.metadata.dst_node_id
            fault, cid = NODE_FAULTS[node - 10], node - 10
            if fault == "absent":
                continue
            wire = Wire()
            got = wire.receive(bytes(m.content[RECORD]["blob"]))
            sender = client_name(1) if fault == "forge" else client_name(cid)
            rnd = got.round - (fault == "replay")
            reply = Message(PARAMETERS, rnd, sender, SERVER, {"x": torch.ones(3)}, {"n": 1})
            blob = wire.send(reply)
            counted = {
                "up": len(blob) + (fault == "miscount"),
                "down": len(m.content[RECORD]["blob"]),
            }
            header = {
                "stats": {"flops": 1, "seconds": 0.1, "peak_memory_bytes": 1},
                "counted": counted,
                "reply": True,
            }
            text = "{broken" if fault == "header" else json.dumps(header)
            out.append(
                SimpleNamespace(
                    metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=mid),
                    has_error=lambda f=fault: f == "error",
                    error=SimpleNamespace(reason="<class 'ValueError'>:<'boom'>"),
                    content={RECORD: ConfigRecord({"header": text, "blob": blob})},
                )
            )
        return out


def test_a_bad_flower_reply_loses_only_its_client(synth_dir, monkeypatch):
    """An error, an unreadable header, a byte count the server disagrees with, a forged or
    replayed message, no answer: each client is lost with its reason; the honest reply is
    delivered and both ends' byte counts agree for it."""
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    from fedtune.compute import ComputeMeter
    from fedtune.flower.transport import FlowerTransport
    from fedtune.runtime.records import RoundState

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # set by Flower in a ServerApp process
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    t = FlowerTransport(FakeGrid(), {"round-timeout": 1.0}, log=None)
    n = len(NODE_FAULTS)
    t.nodes = {c: 10 + c for c in range(n)}
    t.by_node = {v: c for c, v in t.nodes.items()}
    t.fed, t.header, t.timeout = tiny_cfg(synth_dir).fed, {"config": ""}, 1.0
    rs = RoundState(1, 0, list(range(n)), set(), {c: ComputeMeter() for c in range(n)}, None)
    t.begin_round(rs)
    out = {
        c: Message(PARAMETERS, 1, SERVER, client_name(c), {"g": torch.zeros(2)}) for c in range(n)
    }
    replies = t.exchange(rs, out)
    assert list(replies) == [0] and replies[0].tensors["x"].tolist() == [1.0] * 3
    why = {NODE_FAULTS[c]: reason for c, reason in rs.lost.items()}
    assert why["error"] == "failed: boom"
    assert why["header"].startswith("unreadable reply") and why["absent"] == "dropout"
    assert "counted" in why["miscount"] and "marked 'client-1'" in why["forge"]
    assert "round 0 in round 1" in why["replay"]
    t.end_round(rs)  # the honest client's bytes agree on both ends: it stays in
    assert 0 not in rs.lost and len(rs.lost) == n - 1
