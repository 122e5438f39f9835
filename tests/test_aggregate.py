import pytest
import torch

from fedtune.aggregate import check_update, weighted_average
from fedtune.errors import MessageError


def test_hand_computed_weighted_average():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([4.0, 8.0]), "b": torch.tensor([[3.0]])}
    out = weighted_average([a, b], [1, 2])  # (1*a + 2*b) / 3
    assert torch.equal(out["w"], torch.tensor([3.0, 6.0]))
    assert torch.equal(out["b"], torch.tensor([[2.0]]))


def test_weights_follow_sample_counts():
    a, b = {"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}
    assert weighted_average([a, b], [1667, 1667])["w"].item() == pytest.approx(0.5)
    assert weighted_average([a, b], [100, 300])["w"].item() == pytest.approx(0.75)
    assert weighted_average([a, b], [0, 5])["w"].item() == 1.0


def test_averaging_identical_adapters_is_identity():
    torch.manual_seed(0)
    s = {
        "lora_A": torch.randn(8, 576),
        "lora_B": torch.randn(576, 8),
        "score": torch.randn(77, 576),
    }
    for weights in ([1, 1, 1], [1667, 1667, 1667], [3, 1, 7]):
        out = weighted_average([s, s, s], weights)
        for k in s:
            assert torch.equal(out[k], s[k]) and out[k].dtype == s[k].dtype


def test_bad_weights():
    s = {"w": torch.zeros(1)}
    with pytest.raises(ValueError):
        weighted_average([s], [0])
    with pytest.raises(ValueError):
        weighted_average([s, s], [1])


def test_check_update_rejects_bad_updates():
    ref = {"a": torch.zeros(2, 3)}
    check_update({"a": torch.ones(2, 3)}, ref, "client-0")
    for bad, why in [
        ({"b": torch.zeros(2, 3)}, "missing"),
        ({"a": torch.zeros(3, 2)}, "expected"),
        ({"a": torch.zeros(2, 3, dtype=torch.float16)}, "expected"),
        ({"a": torch.full((2, 3), float("nan"))}, "NaN"),
    ]:
        with pytest.raises(MessageError, match=why):
            check_update(bad, ref, "client-0")
