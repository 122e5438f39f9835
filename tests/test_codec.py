"""The one codec for compressed tensors (KD logits, split activations): hand-computed values,
index dtypes, fills and the checks on what another party sent."""

import math

import pytest
import torch

from fedtune.codec import decode, encode, index_dtype
from fedtune.errors import MessageError


def test_float32_roundtrip_is_exact_and_float_casts_are_casts():
    x = torch.randn(2, 3, 7, dtype=torch.float64)  # any float input is read as float32
    t = encode(x)
    assert set(t) == {"values"} and t["values"].dtype == torch.float32
    assert torch.equal(decode(t, 7), x.float())
    for dtype, torch_dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        t = encode(x, dtype)
        assert set(t) == {"values"} and t["values"].dtype == torch_dtype
        assert torch.equal(decode(t, 7), x.float().to(torch_dtype).float())


def test_centred_int8_drops_the_mid_range():
    # Row [-1, 0, 3]: mid-range 1, scale (3 - -1) / 254 = 4/254; centred [-2, -1, 2] / scale
    # = [-127, -63.5, 127] -> round half to even: [-127, -64, 127].
    t = encode(torch.tensor([[-1.0, 0.0, 3.0]]), "int8", center=True)
    assert set(t) == {"values", "scale"} and t["values"].dtype == torch.int8
    assert t["scale"].dtype == torch.float32 and t["scale"].shape == (1,)
    assert t["scale"].item() == pytest.approx(4 / 254, rel=1e-6)
    assert t["values"].tolist() == [[-127, -64, 127]]
    y = decode(t, 3)
    assert torch.allclose(y, torch.tensor([[-2.0, -64 * 4 / 254, 2.0]]))  # x - 1, not x
    assert (y - torch.tensor([[-2.0, -1.0, 2.0]])).abs().max() <= t["scale"].item() / 2 + 1e-7


def test_symmetric_int8_scales_by_the_absmax():
    # Row [1, -2, 4]: scale 4/127; [1, -2, 4] / scale = [31.75, -63.5, 127] -> [32, -64, 127].
    t = encode(torch.tensor([[1.0, -2.0, 4.0]]), "int8")
    assert t["scale"].item() == pytest.approx(4 / 127, rel=1e-6)
    assert t["values"].tolist() == [[32, -64, 127]]
    assert torch.allclose(decode(t, 3), torch.tensor([[32, -64, 127]]) * 4 / 127)
    # the same row centred would have used (4 - -2) / 254 and the mid-range 1
    centred = encode(torch.tensor([[1.0, -2.0, 4.0]]), "int8", center=True)
    assert centred["scale"].item() == pytest.approx(6 / 254, rel=1e-6)
    assert centred["values"].tolist() == [[0, -127, 127]]


def test_constant_and_zero_rows_stay_finite():
    for center in (False, True):
        t = encode(torch.zeros(2, 4), "int8", center=center)
        assert (t["scale"] > 0).all() and (t["values"] == 0).all()
        assert torch.equal(decode(t, 4), torch.zeros(2, 4))
    t = encode(torch.full((1, 3), 2.5), "int8", center=True)  # hi == lo: all at the mid-range
    assert (t["values"] == 0).all() and torch.isfinite(decode(t, 3)).all()


def test_topk_by_value_vs_by_magnitude():
    x = torch.tensor([[1.0, -9.0, 3.0, 2.0]])  # a large negative entry
    by_value = encode(x, topk=2, select="largest")
    assert by_value["indices"].tolist() == [[2, 3]] and by_value["values"].tolist() == [[3, 2]]
    by_mag = encode(x, topk=2, select="magnitude")
    assert by_mag["indices"].tolist() == [[1, 2]] and by_mag["values"].tolist() == [[-9, 3]]
    # missing entries: -inf for logits (softmax gives them exactly 0), 0 for activations
    inf = math.inf
    assert decode(by_value, 4, fill=-inf).tolist() == [[-inf, -inf, 3.0, 2.0]]
    assert decode(by_mag, 4).tolist() == [[0.0, -9.0, 3.0, 0.0]]
    assert decode(by_value, 4, fill=-inf).softmax(-1)[0, :2].tolist() == [0.0, 0.0]


def test_topk_with_int8_quantizes_the_kept_values_only():
    x = torch.tensor([[-100.0, 1.0, 0.0, 3.0]])  # the -100 is dropped before scaling
    t = encode(x, "int8", topk=3, center=True)
    assert t["indices"].tolist() == [[3, 1, 2]]
    assert t["scale"].item() == pytest.approx(3 / 254, rel=1e-6)  # kept range [0, 3]
    assert t["values"].tolist() == [[127, -42, -127]]  # (1 - 1.5) / (3/254) = -42.33
    y = decode(t, 4, fill=-math.inf)
    assert y[0, 0] == -math.inf and torch.allclose(
        y[0, 1:], torch.tensor([-0.5, -1.5, 1.5]), atol=0.01
    )


def test_batched_rows_and_index_dtype_boundaries():
    assert index_dtype(256) == torch.uint8 and index_dtype(257) == torch.int16
    assert index_dtype(32767) == torch.int16 and index_dtype(32768) == torch.int32
    for dim, dtype in ((256, torch.uint8), (257, torch.int16)):
        x = torch.randn(2, 3, dim)
        t = encode(x, topk=5, select="magnitude")
        assert t["indices"].dtype == dtype and t["indices"].shape == t["values"].shape == (2, 3, 5)
        y = decode(t, dim)
        assert y.shape == (2, 3, dim) and (y != 0).sum(-1).eq(5).all()
    t = encode(torch.arange(256.0).view(1, 256), topk=1)
    assert t["indices"].tolist() == [[255]]  # the last index still fits a uint8


def test_encode_rejects_bad_arguments():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="dtype"):
        encode(x, "int4")
    with pytest.raises(ValueError, match="selection"):
        encode(x, topk=2, select="smallest")
    with pytest.raises(ValueError, match="top-k"):
        encode(x, topk=5)


@pytest.mark.parametrize(
    "tensors, match",
    [
        ({}, "without 'values'"),
        ({"values": torch.zeros(2, 3, dtype=torch.int64)}, "dtype"),
        ({"values": torch.tensor(1.0)}, "at least one dimension"),
        ({"values": torch.zeros(2, 5)}, "expected 4 entries per row"),
        ({"values": torch.zeros(2, 4, dtype=torch.int8)}, "scale"),  # int8 without a scale
        ({"values": torch.zeros(2, 4), "scale": torch.ones(2)}, "scale"),  # scale without int8
        ({"values": torch.zeros(2, 4, dtype=torch.int8), "scale": torch.ones(3)}, "scale"),
        ({"values": torch.zeros(2, 4, dtype=torch.int8), "scale": torch.ones(2).half()}, "scale"),
        ({"values": torch.zeros(2, 2), "indices": torch.tensor([[0, 4], [1, 2]])}, "range"),
        ({"values": torch.zeros(2, 2), "indices": torch.tensor([[0, -1], [1, 2]])}, "range"),
        ({"values": torch.zeros(2, 2), "indices": torch.tensor([[0, 1]])}, "do not fit"),
        ({"values": torch.zeros(2, 5), "indices": torch.zeros(2, 5).long()}, "do not fit"),
        ({"values": torch.zeros(1, 2), "indices": torch.tensor([[1.0, 2.0]])}, "not integers"),
        ({"values": torch.zeros(1, 2), "indices": torch.tensor([[3, 3]])}, "repeat"),
        ({"values": torch.tensor([[0.0, math.nan, 1.0, 2.0]])}, "NaN or Inf"),
        ({"values": torch.tensor([[0.0, -math.inf, 1.0, 2.0]]).half()}, "NaN or Inf"),
        (
            {"values": torch.tensor([[-math.inf], [1.0]]), "indices": torch.tensor([[0], [1]])},
            "NaN or Inf",
        ),  # a logit row of -inf only would be a NaN teacher
        (
            {"values": torch.ones(1, 4, dtype=torch.int8), "scale": torch.tensor([math.inf])},
            "NaN or Inf",
        ),
    ],
)
def test_decode_rejects_malformed_tensors(tensors, match):
    with pytest.raises(MessageError, match=match):
        decode(tensors, 4)


def test_decode_ignores_other_tensors_and_accepts_any_integer_indices():
    t = {**encode(torch.tensor([[1.0, -9.0, 3.0, 2.0]]), topk=2), "mask": torch.ones(1)}
    t["indices"] = t["indices"].long()  # a sender may use a wider index type
    assert decode(t, 4).tolist() == [[0.0, 0.0, 3.0, 2.0]]
