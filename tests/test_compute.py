import torch

from fedtune import compute
from fedtune.compute import ComputeMeter


def test_linear_flops_are_hand_computed():
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(10, 64)
    meter = ComputeMeter("cpu", "all")
    with meter.measure():
        lin(x)
        with meter.pause():
            lin(x)  # excluded
    assert meter.stats.flops == 2 * 10 * 64 * 32
    assert meter.stats.seconds > 0 and meter.stats.peak_memory_bytes > 0


def test_shape_mode_equals_all_mode():
    lin = torch.nn.Linear(16, 8)
    shapes = [(4, 16), (4, 16), (7, 16), (4, 16)]
    totals = {}
    for mode in ("all", "shape"):
        meter = ComputeMeter("cpu", mode)
        with meter.measure():
            for s in shapes:
                x = torch.randn(*s, requires_grad=True)
                with compute.step(("t", *s)):
                    lin(x).sum().backward()
        totals[mode] = meter.stats.flops
    assert totals["all"] == totals["shape"] > 0
    # forward 2*B*16*8, backward input grad + weight grad: 2x that again
    assert totals["all"] == sum(3 * 2 * b * 16 * 8 for b, _ in shapes)


def test_off_mode_counts_nothing():
    meter = ComputeMeter("cpu", "off")
    with meter.measure(), compute.step(("x",)):
        torch.randn(8, 8) @ torch.randn(8, 8)
    assert meter.stats.flops == 0
