import pytest
import torch

from fedtune.aggregate import screen_updates, update_problem, weighted_average


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


def test_update_problem_names_bad_updates():
    ref = {"a": torch.zeros(2, 3)}
    assert update_problem({"a": torch.ones(2, 3)}, ref) is None
    for bad, why in [
        ({"b": torch.zeros(2, 3)}, "missing"),
        ({"a": torch.zeros(3, 2)}, "expected"),
        ({"a": torch.zeros(2, 3, dtype=torch.float16)}, "expected"),
        ({"a": torch.full((2, 3), float("nan"))}, "NaN"),
    ]:
        assert why in update_problem(bad, ref)


# ----------------------------------------------------------------------------- robust aggregation


def test_hand_computed_median_and_trimmed_mean():
    from fedtune.aggregate import aggregate, coordinate_median, trimmed_mean

    states = [
        {"w": torch.tensor([1.0, 10.0])},
        {"w": torch.tensor([2.0, 20.0])},
        {"w": torch.tensor([300.0, -5.0])},
        {"w": torch.tensor([4.0, 0.0])},
    ]
    # per coordinate sorted: [1, 2, 4, 300] -> median (2 + 4) / 2 = 3; [-5, 0, 10, 20] -> 5
    assert torch.equal(coordinate_median(states)["w"], torch.tensor([3.0, 5.0]))
    assert torch.equal(coordinate_median(states[:3])["w"], torch.tensor([2.0, 10.0]))
    # trim 0.25 of 4 = 1 value each end: mean(2, 4) = 3, mean(0, 10) = 5
    assert torch.equal(trimmed_mean(states, 0.25)["w"], torch.tensor([3.0, 5.0]))
    # trim 0.2 of 4 = 0 values: the plain mean (1 + 2 + 300 + 4) / 4, (10 + 20 - 5 + 0) / 4
    assert torch.equal(trimmed_mean(states, 0.2)["w"], torch.tensor([76.75, 6.25]))
    # the robust ones ignore sample-count weights; FedAvg uses them
    assert torch.equal(aggregate(states[:2], [1, 3], "median")["w"], torch.tensor([1.5, 15.0]))
    assert torch.equal(aggregate(states[:2], [1, 3], "fedavg")["w"], torch.tensor([1.75, 17.5]))
    assert aggregate(states, [1] * 4, "trimmed_mean", 0.25)["w"].dtype == torch.float32
    with pytest.raises(ValueError):
        aggregate(states, [1] * 4, "krum")


def test_one_outlier_moves_the_mean_not_the_median():
    from fedtune.aggregate import aggregate

    honest = [{"w": torch.full((3,), v)} for v in (1.0, 1.1, 0.9, 1.0)]
    poisoned = honest + [{"w": torch.full((3,), 1e4)}]
    assert aggregate(poisoned, [1] * 5, "fedavg")["w"][0] > 1000
    assert aggregate(poisoned, [1] * 5, "median")["w"][0] == pytest.approx(1.0)
    # sorted 0.9, 1, 1, 1.1, 1e4; one trimmed at each end: (1 + 1 + 1.1) / 3
    assert aggregate(poisoned, [1] * 5, "trimmed_mean", 0.2)["w"][0] == pytest.approx(3.1 / 3)


def test_update_problem_reasons_and_norm_bound():
    from fedtune.aggregate import meta_problem, screen_updates, update_norm, update_problem

    ref = {"a": torch.zeros(2, 2), "b": torch.zeros(3)}
    ok = {"a": torch.full((2, 2), 1.0), "b": torch.tensor([0.0, 0.0, 1.0])}
    assert update_norm(ok, ref) == pytest.approx(5**0.5)  # sqrt(4 * 1 + 1)
    assert update_problem(ok, ref) is None
    assert update_problem(ok, ref, max_norm=2.3) is None  # sqrt(5) = 2.236
    assert "exceeds fed.max_update_norm" in update_problem(ok, ref, max_norm=2.2)
    assert "unknown tensors ['c']" in update_problem({**ok, "c": torch.zeros(1)}, ref)
    assert "missing tensors ['b']" in update_problem({"a": ok["a"]}, ref)
    assert "Inf" in update_problem({**ok, "b": torch.tensor([0, float("inf"), 0])}, ref)
    assert "expected torch.float32[3]" in update_problem({**ok, "b": torch.zeros(3).half()}, ref)
    assert meta_problem({"num_samples": 5, "loss": "1.5e+00"}) is None
    assert meta_problem({"num_samples": 0, "loss": 1.0}) is not None
    assert meta_problem({"loss": 1.0}) is not None
    assert meta_problem({"num_samples": 3, "loss": float("nan")}) is not None
    accepted, rejected = screen_updates(
        {0: ok, 1: {"a": ok["a"]}, 2: ok},
        {0: ref, 1: ref, 2: ref},
        0.0,
        {
            0: {"num_samples": 1, "loss": 1},
            1: {"num_samples": 1, "loss": 1},
            2: {"num_samples": -1, "loss": 1},
        },
    )
    assert accepted == [0] and set(rejected) == {"1", "2"}


def test_ratio_screen_and_sample_bound_by_hand():
    import math

    ref = {"w": torch.zeros(2)}
    ups = {c: {"w": torch.tensor([n, 0.0])} for c, n in enumerate([1.0, 2.0, 3.0, 100.0])}
    metas = {c: {"num_samples": 10, "loss": 0.5} for c in ups}
    refs = {c: ref for c in ups}
    # norms 1, 2, 3, 100: the lower median is 2, so 10 x 2 = 20 < 100 rejects client 3 only
    ok, rejected = screen_updates(ups, refs, 0.0, metas, max_ratio=10.0)
    assert ok == [0, 1, 2] and list(rejected) == ["3"] and "median 2" in rejected["3"]
    # two clients cannot tell which one is honest: the ratio screen needs three
    ok, rejected = screen_updates({0: ups[0], 3: ups[3]}, refs, 0.0, None, max_ratio=10.0)
    assert ok == [0, 3] and not rejected
    # a client claiming more samples than the server knows it holds
    ok, rejected = screen_updates(ups, refs, 0.0, metas, max_samples={2: 9.0, 0: math.inf})
    assert ok == [0, 1, 3] and "num_samples=10 exceeds the 9" in rejected["2"]


def test_lora_factors_averaged_apart_miss_the_factors_covariance():
    """FedAvg averages LoRA's A and B separately (FedIT), so the aggregate's update B̄Ā differs
    from the clients' mean update sum_i w_i B_i A_i by sum_i w_i (B_i - B̄)(A_i - Ā).
    All numbers below are multiples of 1/32: exact in float32, so the checks are exact."""
    # Two clients, rank 1: B [2, 1], A [1, 2]; weights 1 and 3, i.e. 1/4 and 3/4.
    c1 = {"lora_B": torch.tensor([[2.0], [0.0]]), "lora_A": torch.tensor([[1.0, 1.0]])}
    c2 = {"lora_B": torch.tensor([[0.0], [4.0]]), "lora_A": torch.tensor([[2.0, -1.0]])}
    avg = weighted_average([c1, c2], [1, 3])
    b_bar, a_bar = avg["lora_B"], avg["lora_A"]
    assert torch.equal(b_bar, torch.tensor([[0.5], [3.0]]))  # 1/4 [2, 0] + 3/4 [0, 4]
    assert torch.equal(a_bar, torch.tensor([[1.75, -0.5]]))  # 1/4 [1, 1] + 3/4 [2, -1]
    # B1 A1 = [[2, 2], [0, 0]], B2 A2 = [[0, 0], [8, -4]]: their mean and the aggregate's.
    mean_update = 0.25 * c1["lora_B"] @ c1["lora_A"] + 0.75 * c2["lora_B"] @ c2["lora_A"]
    assert torch.equal(mean_update, torch.tensor([[0.5, 0.5], [6.0, -3.0]]))
    assert torch.equal(b_bar @ a_bar, torch.tensor([[0.875, -0.25], [5.25, -1.5]]))
    # (B1 - B̄)(A1 - Ā) = [1.5, -3]^T [-0.75, 1.5]; (B2 - B̄)(A2 - Ā) = [-0.5, 1]^T [0.25, -0.5].
    cov = 0.25 * (c1["lora_B"] - b_bar) @ (c1["lora_A"] - a_bar) + 0.75 * (c2["lora_B"] - b_bar) @ (
        c2["lora_A"] - a_bar
    )
    gap = torch.tensor([[-0.375, 0.75], [0.75, -1.5]])
    assert torch.equal(mean_update - b_bar @ a_bar, gap) and torch.equal(cov, gap)
    # Clients sharing A: no gap.
    c2_same_a = {"lora_B": c2["lora_B"], "lora_A": c1["lora_A"]}
    avg = weighted_average([c1, c2_same_a], [1, 3])
    shared = 0.25 * c1["lora_B"] @ c1["lora_A"] + 0.75 * c2["lora_B"] @ c1["lora_A"]
    assert torch.equal(avg["lora_B"] @ avg["lora_A"], shared)
