"""Fuzzing the message decoder: random, truncated, oversized and header-corrupted bytes raise
MessageError and nothing else, quickly, and never produce more tensor bytes than they hold.

Each test counts the inputs it tried; ``test_fuzz_budget`` checks the total (> 8000) and prints
it (``pytest -s tests/test_fuzz.py``)."""

from __future__ import annotations

import json
import struct
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.errors import MessageError
from fedtune.messages import LOGITS, PARAMETERS, SERVER, Message, Wire, decode, encode

TRIED: dict[str, int] = {}
FUZZ = settings(
    max_examples=2000,
    deadline=timedelta(seconds=2),  # a hang (or a slow parse) fails the example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
    derandomize=True,  # the same inputs in every run: a CI failure reproduces locally
)

VALID = [
    encode(
        Message(
            PARAMETERS,
            3,
            SERVER,
            "client-1",
            {"a": torch.randn(4, 3), "b": torch.arange(6, dtype=torch.int64)},
            {"num_samples": 12, "loss": 0.5},
        )
    ),
    encode(
        Message(
            LOGITS,
            1,
            "client-0",
            SERVER,
            {"values": torch.randn(5, 2).half(), "indices": torch.zeros(5, 2).byte()},
        )
    ),
    encode(Message("metadata", 0, SERVER, "client-2", {}, {"step": "start"})),
]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def check(blob: bytes, name: str, max_bytes: int | None = None) -> None:
    """The decoder's contract on one input."""
    TRIED[name] = TRIED.get(name, 0) + 1
    try:
        msg = decode(blob) if max_bytes is None else decode(blob, max_bytes)
    except MessageError as e:
        assert "\n" not in str(e)  # one-line reason
        return
    payload = sum(t.numel() * t.element_size() for t in msg.tensors.values())
    assert payload <= len(blob)  # bounded allocation: never more than the input carried
    assert isinstance(msg.meta, dict) and isinstance(msg.round, int)


def split_header(blob: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join_header(header: dict | list, rest: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + rest


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(blob):
    check(blob, "random bytes")


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_behind_a_plausible_length(body):
    check(struct.pack("<Q", len(body)) + body, "random header of the right length")


@FUZZ
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_byte_flips_in_valid_messages(blob, flips):
    b = bytearray(blob)
    for pos, val in flips:
        b[pos % len(b)] = val
    check(bytes(b), "byte flips")


@FUZZ
@given(st.sampled_from(VALID), st.integers(0, 10**6), st.binary(max_size=64))
def test_truncated_and_extended(blob, cut, tail):
    check(blob[: cut % (len(blob) + 1)], "truncations")
    check(blob + tail, "extensions")


@FUZZ
@given(
    st.sampled_from(VALID),
    st.sampled_from(
        [
            "__metadata__",
            "kind",
            "round",
            "sender",
            "receiver",
            "meta",
            "dtype",
            "shape",
            "data_offsets",
            "tensor",
            "header",
        ]
    ),
    JSON,
)
def test_header_fields_replaced(blob, field, value):
    """Structurally valid JSON headers with one field replaced by an arbitrary JSON value."""
    header, rest = split_header(blob)
    tensors = [k for k in header if k != "__metadata__"]
    if field == "header":
        header = value
    elif field == "__metadata__":
        header["__metadata__"] = value
    elif field in ("kind", "round", "sender", "receiver", "meta"):
        header["__metadata__"][field] = value if field != "meta" else json.dumps(value)
    elif field == "tensor":
        header[tensors[0] if tensors else "x"] = value
    elif tensors:
        header[tensors[0]][field] = value
    check(join_header(header, rest), "header fields replaced")


@FUZZ
@given(st.sampled_from(VALID), st.integers(-(2**63), 2**63), st.integers(0, 3))
def test_lying_shapes_and_offsets(blob, value, where):
    """Shapes and offsets that promise more (or less, or negative) data than the payload."""
    header, rest = split_header(blob)
    tensors = [k for k in header if k != "__metadata__"]
    if not tensors:
        header["x"] = {"dtype": "F32", "shape": [value], "data_offsets": [0, value]}
    else:
        info = header[tensors[0]]
        if where == 0:
            info["shape"] = [value] + info["shape"][1:]
        elif where == 1:
            info["data_offsets"][1] = value
        elif where == 2:
            info["data_offsets"] = [value, value]
        else:
            info["shape"] = [abs(value) % 1000] * 3
    check(join_header(header, rest), "lying shapes/offsets")


def test_targeted_pathological_inputs():
    blob = VALID[0]
    header, rest = split_header(blob)
    cases = [
        struct.pack("<Q", 2**64 - 1) + b"{}",  # header length beyond anything
        join_header([], b""),  # a list, not an object
        struct.pack("<Q", 200_000) + b"[" * 200_000,  # deep nesting: RecursionError
        join_header({"__metadata__": {**header["__metadata__"], "meta": "[" * 100_000}}, b""),
        join_header({"__metadata__": {**header["__metadata__"], "round": "9" * 5000}}, b""),
        join_header({"__metadata__": {**header["__metadata__"], "round": "Infinity"}}, b""),
        join_header({**header, "__metadata__": {**header["__metadata__"], "kind": 1}}, rest),
        join_header(
            {
                "__metadata__": header["__metadata__"],
                "x": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]},
            },
            b"\x00" * 16,
        ),
        join_header(
            {
                "__metadata__": header["__metadata__"],
                "x": {"dtype": "F32", "shape": [4], "data_offsets": ["0", 16]},
            },
            b"\x00" * 16,
        ),
        join_header(
            {
                "__metadata__": header["__metadata__"],
                "x": {"dtype": "F32", "shape": [True] * 100, "data_offsets": [0, 4]},
            },
            b"\x00" * 4,
        ),
        b"\xff" * 64,
        blob[:8] + blob[8:].replace(b'"F32"', b'"F64"'),
    ]
    for c in cases:
        TRIED["targeted"] = TRIED.get("targeted", 0) + 1
        with pytest.raises(MessageError):
            decode(c)


def test_oversized_messages_are_refused_before_parsing():
    big = VALID[0] + b"\x00" * 4096
    for limit in (1024, len(VALID[0]) - 1):
        with pytest.raises(MessageError, match="exceeds the limit"):
            decode(big, max_bytes=limit)
        TRIED["oversized"] = TRIED.get("oversized", 0) + 1
    wire = Wire(max_bytes=2048)
    with pytest.raises(MessageError, match="exceeds the limit"):
        wire.send(Message(PARAMETERS, 1, SERVER, "client-0", {"x": torch.zeros(1024)}))
    assert wire.ledger.total() == 0  # a refused message is not counted as sent


def test_valid_messages_still_decode():
    for blob in VALID:
        check(blob, "valid")
        assert decode(blob).round in (0, 1, 3)


def test_fuzz_budget():
    """Runs last in this file: the number of inputs the tests above tried."""
    total = sum(TRIED.values())
    print(f"\ndecoder fuzz: {total} inputs tried: {TRIED}")
    if len(TRIED) >= 8:  # the whole file ran (not a -k selection)
        assert total > 8000
