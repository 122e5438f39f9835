"""Paper-fidelity switches: data.pad_to_max_length changes the cost of a step, not its result."""

import copy

import numpy as np
import pytest
import torch

from fedtune.config import ModelConfig
from fedtune.data import Tokenized, batches
from fedtune.frameworks.split.model import client_forward, server_forward
from fedtune.models import load_model
from fedtune.tasks import get as get_task

TEXTS = ["x", "my card fee", "please send a wire transfer to the machine, plus the extra cost"]


def padding_tolerance(dtype: torch.dtype, scale: float) -> float:
    """How far two forwards of the same rows may drift when only the padding differs.

    Every real token's inputs are the same numbers in both (right padding is causal-invisible,
    pooling reads the last real token), so only a kernel's summation order may change with the
    tensor's shape (BLAS blocking over more rows, SDPA tiling over more keys). Two orders of a
    sum of n terms differ by at most 2 (n - 1) u sum|terms| (Higham, Accuracy and Stability of
    Numerical Algorithms, 2nd ed., section 4.2), u the unit roundoff. The tiny models' longest
    reduction is n = 128 (GPT-2's MLP, 4 x 32; attention sums over at most 80 keys) and a
    logit passes through D = 4 blocks x 6 reductions (qkv, q.k, p.v, out, MLP up, MLP down)
    + the head = 25 of them. To first order, with the norms and softmax passing an error on
    unamplified (activations O(1): weights ~N(0, 0.2^2)) and sum|terms| <= 1 + max|logit|:
    tol = D * 2 n u * (1 + max|logit|). float32: ~1.4e-3 at |logit| ~ 2.6; float64: ~2.6e-12.
    (Measured: under 1e-6 and 1e-15; a pooling that read a pad instead, as the last check
    shows, is off by far more than tol.)"""
    u = torch.finfo(dtype).eps / 2
    return 25 * 2 * 128 * u * (1 + scale)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads and lose much on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_fixed_padding_gives_the_same_logits(name, dtype, one_thread):
    """Rows of 1, 11 and 63 tokens as one batch padded to its longest (63) and to 80: the
    classifier's logits (HF's head, what FedLLM and KD-FedLLM run) and Split-FedLLM's (client
    blocks, server blocks, the task's pooling on the mask) agree within
    :func:`padding_tolerance`."""
    base, tok = load_model(ModelConfig(name=name, lora_r=4, max_length=80), num_labels=5)
    model = copy.deepcopy(base).to(dtype)  # the loaded backbone is shared across tests
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at 0: random trainables make the adapters count
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=dtype))
    model.eval()  # no LoRA dropout
    task = get_task("classification")
    ids = [tok(t)["input_ids"] for t in TEXTS]
    assert [len(x) for x in ids] == [1, 11, 63]  # byte-level tokenizer: one token per byte
    hf, split, width = [], [], []
    for pad_to in (None, 80):
        data = Tokenized(ids, np.zeros(3, dtype=np.int64), pad_to=pad_to)
        batch = next(batches(data, np.arange(3), 3, tok.pad_token_id))
        width.append(batch["input_ids"].shape[1])
        assert batch["attention_mask"].sum(1).tolist() == [1, 11, 63]
        with torch.no_grad():
            hf.append(task.logits(model, batch, "off"))
            h = client_forward(model, batch["input_ids"], batch["attention_mask"], 2)
            hidden = server_forward(model, h, batch["attention_mask"], 2)
            pooled = task.pool(hidden, batch["attention_mask"])
            split.append(task.head(model, pooled, batch, "off"))
            last_position = task.head(model, hidden[:, -1], batch, "off")  # ignores the mask
    assert width == [63, 80]
    tol = padding_tolerance(dtype, hf[0].abs().max().item())
    assert (hf[0] - hf[1]).abs().max().item() <= tol
    assert (split[0] - split[1]).abs().max().item() <= tol
    assert (hf[1] - split[1]).abs().max().item() <= tol  # both paths pool the same token
    assert (last_position - split[1]).abs().max().item() > 10 * tol  # the check can fail


@pytest.mark.parametrize("framework", ["fedllm", "kd", "split"])
def test_every_paper_preset_value_says_where_it_comes_from(framework):
    """Each setting of configs/paper-*.toml is labelled '# the paper...' (its text gives it)
    or '# assumption...' (it does not), so a reader sees what is fidelity and what is a guess."""
    from pathlib import Path

    preset = Path(__file__).parents[1] / "configs" / f"paper-{framework}.toml"
    unlabelled = []
    for line in preset.read_text().splitlines():
        if "=" not in line or line.startswith("#") or line.startswith("name ="):
            continue  # comments, [tables] and the run's name are no settings
        label = line.partition("#")[2].strip()
        if not label.startswith(("the paper", "assumption")):
            unlabelled.append(line)
    assert unlabelled == []
