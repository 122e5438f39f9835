import pytest
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


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_attention_flops_on_cpu_are_the_formula(name, mode):
    """One attention layer's forward: QK^T and AV are 2 * (2 B T^2 H) = 4 B T^2 H FLOPs,
    whichever CPU kernel runs it (the fused one, which torch's counter has no formula for,
    without attention dropout: eval, Llama; the matmul path with dropout: GPT-2 in training)."""
    from fedtune.config import ModelConfig
    from fedtune.models import load_model

    model, _ = load_model(ModelConfig(name=name, lora_r=4), 4)
    getattr(model, mode)()
    b, t, h = 2, 12, model.config.hidden_size
    ids = torch.randint(0, 200, (b, t))
    with compute.flop_counter() as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    counts = counter.get_flop_counts()
    (layer,) = [k for k in counts if k.endswith((".h.0.attn", ".layers.0.self_attn"))]
    attention = sum(
        n for op, n in counts[layer].items() if "attention" in str(op) or "bmm" in str(op)
    )
    assert attention == 4 * b * t * t * h
