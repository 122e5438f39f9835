import json
import struct

import pytest
import torch

from fedtune.errors import MessageError
from fedtune.messages import (
    DOWN,
    LOGITS,
    PARAMETERS,
    SERVER,
    UP,
    Message,
    Wire,
    decode,
    encode,
)


def header_len(blob: bytes) -> int:
    return 8 + struct.unpack("<Q", blob[:8])[0]


def test_roundtrip_preserves_everything():
    t = {
        "a": torch.randn(3, 4),
        "b": torch.arange(5, dtype=torch.int64),
        "c": torch.ones(2, dtype=torch.bfloat16),
    }
    msg = Message(PARAMETERS, 7, SERVER, "client-2", t, {"num_samples": 12, "note": "x"})
    out = decode(encode(msg))
    assert (out.kind, out.round, out.sender, out.receiver) == (PARAMETERS, 7, SERVER, "client-2")
    assert out.meta == {"num_samples": 12, "note": "x"}
    for k in t:
        assert out.tensors[k].dtype == t[k].dtype and torch.equal(out.tensors[k], t[k])


def test_size_is_payload_plus_safetensors_header():
    t = {"w": torch.zeros(10, 7), "h": torch.zeros(3, dtype=torch.float16)}
    blob = encode(Message(PARAMETERS, 1, SERVER, "client-0", t))
    # payload: 70 fp32 + 3 fp16 elements; the rest is the 8-byte length and the JSON header
    assert len(blob) == 70 * 4 + 3 * 2 + header_len(blob)
    header = json.loads(blob[8 : header_len(blob)])
    assert header["__metadata__"]["kind"] == PARAMETERS


def test_wire_counts_by_round_client_direction_kind():
    wire = Wire()
    down = Message(PARAMETERS, 1, SERVER, "client-0", {"x": torch.zeros(4)})
    up = Message(LOGITS, 1, "client-0", SERVER, {"y": torch.zeros(2, 3)})
    wire.transfer(down)
    got = wire.transfer(up)
    assert torch.equal(got.tensors["y"], torch.zeros(2, 3))
    totals = wire.ledger.round_totals(1)["client-0"]
    assert totals[DOWN] == {PARAMETERS: len(encode(down))}
    assert totals[UP] == {LOGITS: len(encode(up))}
    assert wire.ledger.total() == len(encode(down)) + len(encode(up))


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x00" * 7,
        struct.pack("<Q", 10**12) + b"{}",
        struct.pack("<Q", 2) + b"{}",
        struct.pack("<Q", 4) + b"nope",
        b"\xff" * 100,
    ],
)
def test_garbage_raises_message_error(blob):
    with pytest.raises(MessageError):
        decode(blob)


def test_truncated_and_corrupted_messages_raise_message_error():
    blob = encode(Message(PARAMETERS, 1, SERVER, "client-0", {"x": torch.randn(16)}))
    for cut in range(0, len(blob), 7):
        with pytest.raises(MessageError):
            decode(blob[:cut])
    n = header_len(blob)
    lying = blob[:n].replace(b'"shape":[16]', b'"shape":[99]') + blob[n:]
    with pytest.raises(MessageError):
        decode(lying)


def test_size_limit_enforced():
    blob = encode(Message(PARAMETERS, 1, SERVER, "client-0", {"x": torch.randn(100)}))
    with pytest.raises(MessageError, match="exceeds the limit"):
        decode(blob, max_bytes=100)
    with pytest.raises(MessageError, match="exceeds the limit"):
        Wire(max_bytes=100).send(Message(PARAMETERS, 1, SERVER, "c", {"x": torch.randn(100)}))


def test_unknown_kind_is_rejected():
    with pytest.raises(MessageError):
        encode(Message("weights", 1, SERVER, "client-0"))
