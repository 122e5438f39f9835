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
    assert meter.stats.seconds > 0


@pytest.mark.parametrize("mode", ["shape", "all", "off"])
def test_step_memory_is_hand_computed(mode):
    """A step's memory: the parameters it reads, its inputs, and the tensors it creates and
    keeps alive at once, in bytes (float32: 4 per element), in every FLOP mode."""
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(10, 64)
    meter = ComputeMeter("cpu", mode)
    with meter.measure():
        y = compute.step(("lin",), lambda: lin(x))
    weight, inputs, output = 64 * 32 * 4, 10 * 64 * 4, 10 * 32 * 4
    assert meter.stats.peak_memory_bytes == weight + inputs + output
    assert meter.stats.flops == (2 * 10 * 64 * 32 if mode != "off" else 0)
    assert torch.equal(y, x @ lin.weight.T)  # the real step ran, on real tensors


def test_replay_leaves_no_trace():
    """Measuring a training step replays it first: gradients, the random state and the
    step's result are those of the run without measuring."""
    torch.manual_seed(0)
    lin, drop = torch.nn.Linear(8, 4), torch.nn.Dropout(0.5)
    x = torch.randn(6, 8)

    def train_step():
        lin.zero_grad(set_to_none=True)
        loss = lin(drop(x)).square().mean()
        loss.backward()
        return loss

    results = {}
    for mode in ("off", "shape"):
        torch.manual_seed(1)
        meter = ComputeMeter("cpu", mode)
        with meter.measure():
            loss = compute.step(("t",), train_step, grads=list(lin.parameters()))
        results[mode] = (loss, lin.weight.grad.clone(), torch.rand(1))
    assert all(torch.equal(a, b) for a, b in zip(*results.values(), strict=True))


def test_shape_mode_equals_all_mode():
    lin = torch.nn.Linear(16, 8)
    shapes = [(4, 16), (4, 16), (7, 16), (4, 16)]
    totals = {}
    for mode in ("all", "shape"):
        meter = ComputeMeter("cpu", mode)
        with meter.measure():
            for s in shapes:
                x = torch.randn(*s, requires_grad=True)
                grads = [x, *lin.parameters()]
                compute.step(("t", *s), lambda x=x: lin(x).sum().backward(), grads=grads)
        totals[mode] = meter.stats.flops
    assert totals["all"] == totals["shape"] > 0
    # forward 2*B*16*8, backward input grad + weight grad: 2x that again
    assert totals["all"] == sum(3 * 2 * b * 16 * 8 for b, _ in shapes)


def test_off_mode_counts_nothing():
    meter = ComputeMeter("cpu", "off")
    with meter.measure():
        compute.step(("x",), lambda: torch.randn(8, 8) @ torch.randn(8, 8))
    assert meter.stats.flops == 0


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_attention_flops_on_cpu_are_the_formula(name, mode):
    """Each layer's attention forward: QK^T and AV are 2 * (2 B T^2 H) = 4 B T^2 H FLOPs,
    whichever CPU kernel runs it (the fused one, which torch's counter has no formula for,
    without attention dropout: eval, Llama; the matmul path with dropout: GPT-2 in training)."""
    from fedtune.config import ModelConfig
    from fedtune.models import load_model, num_blocks

    model, _ = load_model(ModelConfig(name=name, lora_r=4), 4)
    getattr(model, mode)()
    b, t, h = 2, 12, model.config.hidden_size
    ids = torch.randint(0, 200, (b, t))
    with compute.flop_counter() as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    attention = sum(
        n for op, n in counter.counts.items() if "attention" in str(op) or "bmm" in str(op)
    )
    assert attention == num_blocks(model) * 4 * b * t * t * h


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_counting_flops_does_not_change_the_numbers(name):
    """The counted step computes exactly what the uncounted one does (torch's FlopCounterMode
    decomposed SiLU's backward, so Llama's gradients differed in the last bits)."""
    import contextlib

    from fedtune.config import ModelConfig
    from fedtune.models import load_model

    model, _ = load_model(ModelConfig(name=name, lora_r=4, lora_dropout=0.0), 4)
    model.eval()
    ids = torch.randint(0, 200, (4, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0

    def grads(counting):
        model.zero_grad(set_to_none=True)
        with compute.flop_counter() if counting else contextlib.nullcontext():
            model(input_ids=ids, attention_mask=mask).logits.pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, counted = grads(False), grads(True)
    assert plain.keys() == counted.keys() and all(torch.equal(plain[k], counted[k]) for k in plain)


def test_inference_mode_is_counted_and_unchanged():
    """Under inference mode composite ops reach the counter whole: their matmuls still count
    (the same FLOPs as under no_grad), and the logits are the uncounted ones."""
    from fedtune.config import ModelConfig
    from fedtune.models import load_model

    model, _ = load_model(ModelConfig(name="tiny-llama", lora_r=4), 4)
    model.eval()
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(1))

    def logits(grad_mode, counter=None):
        ctx = torch.inference_mode() if grad_mode == "inference" else torch.no_grad()
        with ctx, counter if counter is not None else contextlib.nullcontext():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.clone()

    import contextlib

    a, b = compute.flop_counter(), compute.flop_counter()
    counted = logits("inference", a)
    logits("no_grad", b)
    assert a.get_total_flops() == b.get_total_flops() > 0
    assert torch.equal(counted, logits("inference"))
