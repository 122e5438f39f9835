"""Fuzzing what consumes a decoded message, not only the decoder (tests/test_fuzz.py).

Hypothesis builds hostile but decodable messages for each consumer: the split server's
``serve`` (a real tiny model), KD's logit unpacking and aggregation, the codec, and the Flower
reply parsing (the reply header, the routing check, the worker's frames). The contract: a
one-line :class:`MessageError` or a valid result, never another exception; the split server's
state stays finite and a refused client's updates are undone; nothing allocates more than
validated shapes allow.

``FEDTUNE_FUZZ_EXAMPLES`` sets the examples per test (default 150: CI); the extended run
(README, Reliability) is ``FEDTUNE_FUZZ_EXAMPLES=2000 pytest -s tests/test_fuzz_consumers.py``:
``test_consumer_fuzz_budget`` prints the inputs tried and the largest growth of the process's
peak memory (``ru_maxrss``) any one input caused, with that input's consumer.
"""

from __future__ import annotations

import json
import os
import resource
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_cfg
from fedtune import codec
from fedtune.aggregate import finite
from fedtune.errors import MessageError
from fedtune.messages import (
    ACTIVATIONS,
    GRADIENTS,
    LABELS,
    LOGITS,
    PARAMETERS,
    SERVER,
    Message,
    Wire,
    client_name,
    encode,
)

EXAMPLES = int(os.environ.get("FEDTUNE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=5),
    suppress_health_check=list(HealthCheck),
    database=None,
    derandomize=True,
)
TRIED: dict[str, int] = {}
ACCEPTED: dict[str, int] = {}  # inputs a consumer used (the rest it refused in one line)
WORST = {"bytes": 0, "consumer": ""}  # the largest ru_maxrss growth one input caused


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def consume(name: str, fn, *args):
    """Call a consumer on one input: a MessageError with a one-line reason, or its result."""
    TRIED[name] = TRIED.get(name, 0) + 1
    before = _maxrss()
    try:
        out = fn(*args)
        ACCEPTED[name] = ACCEPTED.get(name, 0) + 1
        return out
    except MessageError as e:
        assert "\n" not in str(e) and str(e)
        return None
    finally:
        grew = _maxrss() - before
        if grew > WORST["bytes"]:
            WORST.update(bytes=grew, consumer=name)


# ----------------------------------------------------------------------------- tensors

SHAPE = st.lists(st.integers(0, 40), min_size=0, max_size=4)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16]
DTYPES += [torch.int32, torch.int64, torch.bool, torch.float64]
SPECIAL = st.sampled_from([0.0, 1.0, -1.0, 1e30, -1e30, 65504.0, float("nan"), float("inf")])


ANY_DTYPE = st.sampled_from(DTYPES)


@st.composite
def tensor(draw, shape=SHAPE, dtypes=ANY_DTYPE):
    """A tensor of any dtype and small shape, with random or special values."""
    dims, dtype = draw(shape), draw(dtypes)
    n = 1
    for d in dims:
        n *= d
    if n > 20_000:
        dims, n = [n % 50], n % 50
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.randn(n, generator=g) * draw(st.sampled_from([1.0, 10.0, 1e4]))
    if n and draw(st.booleans()):
        x[draw(st.integers(0, n - 1))] = draw(SPECIAL)
    if dtype == torch.bool:
        return (x > 0).reshape(dims)
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        x = x.nan_to_num(0, 0, 0).clamp(info.min, info.max)
    return x.to(dtype).reshape(dims)


def tensors(names):
    return st.dictionaries(st.sampled_from(names), tensor(), max_size=len(names))


MUTATIONS = ["none", "none", "value", "dtype", "cut", "index", "repeat", "drop", "extra"]


@st.composite
def encoded(draw, rows: int, dim: int, topks=(0, 1, 2)):
    """A real :func:`fedtune.codec.encode` output ``[rows, dim]`` (any dtype, top-k, centring)
    with at most one thing wrong (``MUTATIONS``); returns ``(tensors, topk)``."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.randn(rows, dim, generator=g) * draw(st.sampled_from([1.0, 30.0, 1e4]))
    topk = min(draw(st.sampled_from(topks)), dim)
    dtype = draw(st.sampled_from(list(codec.DTYPES)))
    t = codec.encode(x, dtype, topk, center=draw(st.booleans()) and dtype == "int8")
    how, name = draw(st.sampled_from(MUTATIONS)), draw(st.sampled_from(sorted(t)))
    v = t[name].clone()
    if how == "value" and v.is_floating_point():
        v.view(-1)[draw(st.integers(0, v.numel() - 1))] = draw(SPECIAL)
    elif how == "dtype":
        v = v.to(draw(ANY_DTYPE))
    elif how == "cut" and v.numel():
        v = v[..., :-1] if draw(st.booleans()) else v[:-1]
    elif how == "index" and name == "indices":
        info = torch.iinfo(v.dtype)  # out of [0, dim), as far as the index dtype allows
        bad = draw(st.sampled_from([dim, dim + 1, -1, 2**15 - 1]))
        v.view(-1)[0] = min(max(bad, info.min), info.max)
    elif how == "repeat" and name == "indices" and v.shape[-1] > 1:
        v[0, 1] = v[0, 0]
    t[name] = v
    if how == "drop":
        del t[name]
    elif how == "extra":
        t["extra"] = torch.zeros(2)
    return t, topk


# ----------------------------------------------------------------------------- split server


@pytest.fixture(scope="module")
def split_server(synth_dir):
    from fedtune.context import build_context
    from fedtune.frameworks import split

    cfg = tiny_cfg(synth_dir, fed={"framework": "split"}, split={"samples_per_round": 16})
    return split.Server(build_context(cfg).server())


@st.composite
def split_request(draw, hidden: int = 32, batch: int = 8, length: int = 32):
    """Mostly plausible requests with something wrong: sizes near the limits, dtypes, names,
    values, the wrong kind or routing."""
    kind = draw(st.sampled_from([ACTIVATIONS, ACTIVATIONS, LABELS, GRADIENTS, PARAMETERS]))
    b = draw(st.integers(0, batch + 2))
    n = draw(st.integers(0, length + 3))
    h = draw(st.sampled_from([hidden, hidden, hidden - 1, 1]))
    t: dict = {}
    if kind == LABELS:
        t["labels"] = draw(tensor(st.just([b]), st.sampled_from([torch.int64, torch.float32])))
        t["labels"] = t["labels"].abs() % draw(st.sampled_from([4, 5, 1000]))
    else:
        t["values"] = draw(tensor(st.just([b, n, h]), st.sampled_from(DTYPES[:4])))
        mask = torch.ones(b, n, dtype=torch.bool)
        if b and n and draw(st.booleans()):
            mask[draw(st.integers(0, b - 1)), :] = False
        t["mask"] = mask if draw(st.integers(0, 5)) else mask.long()
        t.update(draw(tensors(["indices", "scale", "extra"])))
    sender = draw(st.sampled_from([client_name(0), client_name(0), client_name(7), "server"]))
    rnd = draw(st.sampled_from([1, 1, 1, 0, 2]))
    return Message(kind, rnd, sender, SERVER, t)


@FUZZ
@given(st.lists(split_request(), min_size=1, max_size=3), st.booleans())
def test_split_serve(split_server, requests, with_labels):
    server = split_server
    gen = server.round(1, [0, 1])
    next(gen)
    start = {n: t.clone() for n, t in server.states["shared"].items()}
    if with_labels:  # the round's labels first, so activations can reach the loss
        labels = Message(LABELS, 1, client_name(0), SERVER, {"labels": torch.arange(16) % 4})
        consume("split serve", server.serve, labels)
    for msg in requests:
        wire = Wire(max_bytes=1 << 24)
        try:
            msg = wire.transfer(msg)  # what a network delivers: encoded, counted, decoded
        except MessageError:
            continue
        reply = consume("split serve", server.serve, msg)
        assert reply is None or isinstance(reply, Message)
    state = server.states["shared"]
    assert finite(state)
    if 0 in server.refused:  # everything client 0 did this round is undone
        assert all(torch.equal(state[n], start[n]) for n in start)
    gen.close()


# ----------------------------------------------------------------------------- KD logits


@FUZZ
@given(encoded(6, 4), st.sampled_from([None, 0, 2]), st.booleans())
def test_kd_logits(sent, expect, aggregate):
    from fedtune.frameworks.kd.common import received_logits
    from fedtune.frameworks.kd.ops import aggregate_knowledge

    t, topk = sent
    topk = topk if expect is None else expect  # the run's kd.topk: usually what was sent
    msg = Message(LOGITS, 1, client_name(0), SERVER, t)
    logits = consume("kd logits", received_logits, msg, 6, 4, client_name(0), topk)
    if logits is None:
        return
    assert logits.shape == (6, 4) and not logits.isnan().any()
    assert torch.isfinite(logits).any(-1).all()  # a finite logit per row
    assert torch.isfinite(logits).all() or topk  # -inf only under top-k
    if aggregate:
        teacher, _ = aggregate_knowledge([logits, torch.zeros(6, 4)], 2.0, "mean")
        assert finite(teacher) and torch.allclose(teacher.sum(-1), torch.ones(6))


@FUZZ
@given(st.sampled_from([7, 300]), st.data())
def test_kd_token_logits(vocab, data):
    from fedtune.frameworks.kd.tokens import aggregate_tokens, unpack_tokens

    t, topk = data.draw(encoded(5, vocab, (0, 3)))
    got = consume("kd token logits", unpack_tokens, t, vocab)
    if got is None:
        return
    values, idx = got
    assert finite(values) and (idx is None or (idx.min() >= 0 and idx.max() < vocab))
    if (idx is None) == (topk == 0) and values.shape[-1] == (topk or vocab):
        probs, _ = aggregate_tokens([(values, idx)], 1.0, [1.0], topk, vocab)
        assert finite(probs)


# ----------------------------------------------------------------------------- codec


@FUZZ
@given(st.sampled_from([1, 4, 32, 300]), st.data())
def test_codec_decode(dim, data):
    t, _ = data.draw(encoded(3, dim))
    if data.draw(st.booleans()):  # or anything at all under the codec's names
        t = data.draw(tensors(["values", "indices", "scale"]))
    x = consume("codec", codec.decode, t, dim, float("-inf"))
    if x is not None:
        assert x.shape[-1] == dim and not x.isnan().any()
        assert x.numel() <= max(1, t["values"].numel()) * dim  # sized by what came


# ----------------------------------------------------------------------------- Flower replies

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
GOOD = {
    "stats": {"flops": 10, "seconds": 0.5, "peak_memory_bytes": 7},
    "counted": {"up": 3, "down": 4},
    "reply": True,
}


@FUZZ
@given(
    st.sampled_from(
        ["none", "stats", "counted", "reply", "flops", "seconds", "up", "carried_seconds", "whole"]
    ),
    JSON,
)
def test_flower_reply_header(field, value):
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord

    from fedtune.flower.transport import reply_header

    h = json.loads(json.dumps(GOOD))
    if field == "whole":
        h = value
    elif field in ("flops", "seconds"):
        h["stats"][field] = value
    elif field == "up":
        h["counted"]["up"] = value
    elif field != "none":
        h[field] = value
    got = consume("flower reply header", reply_header, ConfigRecord({"header": json.dumps(h)}))
    if got is not None:
        stats, counted, has_reply, carried = got
        assert stats.flops >= 0 and stats.seconds >= 0 and min(counted.values()) >= 0
        assert isinstance(has_reply, bool) and 0 <= carried <= stats.seconds


ROUTES = st.fixed_dictionaries(
    {
        "kind": st.sampled_from([PARAMETERS, LOGITS, LABELS]),
        "round": st.sampled_from([1, 1, 0, 2, -1, 10**9]),
        "sender": st.sampled_from([client_name(0), client_name(0), client_name(1), SERVER]),
        "receiver": st.sampled_from([SERVER, SERVER, client_name(0), "x" * 200]),
    }
)


@FUZZ
@given(ROUTES, st.binary(max_size=64))
def test_flower_reply_body(route, junk):
    from fedtune.flower import rpc
    from fedtune.flower.split_link import receive_counted

    msg = Message(route["kind"], route["round"], route["sender"], route["receiver"])
    wire, expect = Wire(), (client_name(0), SERVER, 1)
    got = consume("flower reply body", receive_counted, wire, encode(msg), expect)
    honest = (msg.sender, msg.receiver, msg.round) == expect
    assert (got is not None) == honest
    assert (wire.ledger.total() > 0) == honest  # a forged or replayed reply is not counted
    consume("flower reply body", receive_counted, Wire(), junk, expect)
    consume("worker frame", rpc.unpack, junk)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpointed(synth_dir, tmp_path_factory):
    """A finished 1-round run's checkpoint (its tree and its file's bytes) and the context
    to resume it in."""
    from fedtune.context import build_context
    from fedtune.runtime import checkpoint, simulate

    cfg = tiny_cfg(synth_dir, fed={"rounds": 1})
    out = tmp_path_factory.mktemp("ck") / "run"
    simulate(cfg, out, log=None)
    raw = (out / checkpoint.FILE).read_bytes()
    ctx, tree, folder = build_context(cfg), checkpoint.load(out), tmp_path_factory.mktemp("ckf")
    return Quiet(cfg=cfg, ctx=ctx, tree=tree, raw=raw, folder=folder)


class Quiet(SimpleNamespace):
    def __repr__(self) -> str:  # hypothesis prints its arguments: not a whole checkpoint
        return "checkpointed"


def _leaves(tree, path=()):
    """Every (path, value) in a checkpoint tree, containers included."""
    yield path, tree
    if isinstance(tree, (dict, list, tuple)):
        for k, v in tree.items() if isinstance(tree, dict) else enumerate(tree):
            yield from _leaves(v, (*path, k))


def _mutated(tree, path, value):
    import copy

    tree = copy.copy(tree)
    if not path:
        return value
    head, rest = path[0], path[1:]
    child = _mutated(tree[head], rest, value)
    if isinstance(tree, tuple):
        return (*tree[:head], child, *tree[head + 1 :])
    tree[head] = child
    return tree


DROP = object()


@FUZZ
@given(st.data())
def test_checkpoint_restore(checkpointed, data):
    from fedtune import frameworks
    from fedtune.errors import ConfigError
    from fedtune.runtime import checkpoint
    from fedtune.runtime.inprocess import InProcess

    c = checkpointed
    cfg, ctx, tree, raw, folder = c.cfg, c.ctx, c.tree, c.raw, c.folder
    if data.draw(st.integers(0, 3)) == 0:  # damaged bytes: truncated or flipped
        b = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 4))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        b = b[: data.draw(st.integers(0, len(b)))] if data.draw(st.booleans()) else b
        (folder / "checkpoint").mkdir(exist_ok=True)
        (folder / checkpoint.FILE).write_bytes(bytes(b))
        try:
            tree = consume("checkpoint load", checkpoint.load, folder)
        except ConfigError as e:
            assert "\n" not in str(e)
            return
    else:  # a damaged tree: one value replaced or dropped
        paths = list(_leaves(tree))
        path, old = data.draw(st.sampled_from(paths))
        if isinstance(old, torch.Tensor) and old.is_floating_point() and data.draw(st.booleans()):
            value = old.clone().fill_(data.draw(SPECIAL))
        else:
            value = data.draw(st.one_of(JSON, tensor(), st.just(DROP)))
        if value is DROP and path:
            container = dict(_leaves(tree))[path[:-1]]
            if isinstance(container, dict):
                container = {k: v for k, v in container.items() if k != path[-1]}
            else:
                container = [v for i, v in enumerate(container) if i != path[-1]]
            tree = _mutated(tree, path[:-1], container)
        elif value is not DROP:
            tree = _mutated(tree, path, value)
    fw = frameworks.get(cfg.fed.framework)
    server, transport = fw.server(ctx.server()), InProcess()
    transport.prepare(cfg, ctx)
    transport.start(ctx.server(), fw, server)
    try:
        consume("checkpoint restore", checkpoint.restore, tree, cfg, server, transport)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert finite(server.state_dict())  # what was adopted is usable


def test_consumer_fuzz_budget():
    """Runs last: the inputs the tests above tried and the worst peak-memory growth."""
    total = sum(TRIED.values())
    print(f"\nconsumer fuzz: {total} inputs {TRIED}, accepted {ACCEPTED}")
    print("largest growth of the peak memory (ru_maxrss) caused by one input:")
    print(f"  {WORST['bytes'] / 2**20:.1f} MiB ({WORST['consumer'] or 'none'}); ", end="")
    print(f"the process's peak RSS: {_maxrss() / 2**20:.0f} MiB")
    if len(TRIED) >= 8:  # the whole file ran
        assert total >= 8 * EXAMPLES
