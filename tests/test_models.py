import pytest
import torch

from fedtune.config import ModelConfig
from fedtune.errors import ModelError
from fedtune.models import (
    init_trainable_state,
    load_model,
    load_trainable_state,
    trainable_names,
    trainable_state,
)


@pytest.mark.parametrize("name, target", [("tiny-gpt2", "c_attn"), ("tiny-llama", "q_proj")])
def test_lora_targets_and_head_are_the_only_trainable_params(name, target):
    model, tok = load_model(ModelConfig(name=name, lora_r=4), num_labels=5)
    names = trainable_names(model)
    assert names and all(("lora_" in n) or ("score" in n) for n in names)
    assert any(target in n for n in names)
    assert any("score" in n for n in names)
    if name == "tiny-llama":
        assert {"q_proj", "k_proj", "v_proj"} <= {n.split(".")[-4] for n in names if "lora_A" in n}
    assert tok.pad_token_id is not None
    head = [n for n in names if "score" in n]
    assert trainable_state(model)[head[0]].shape == (5, 32)


def test_backbone_is_loaded_once_per_process():
    cfg = ModelConfig(name="tiny-gpt2", lora_r=4)
    a, _ = load_model(cfg, 3)
    b, _ = load_model(cfg, 3)
    assert a is b


def test_state_roundtrip_and_seeded_init():
    model, _ = load_model(ModelConfig(name="tiny-llama", lora_r=4), 3)
    s0 = init_trainable_state(model, seed=0)
    s0b = init_trainable_state(model, seed=0)
    s1 = init_trainable_state(model, seed=1)
    assert all(torch.equal(s0[k], s0b[k]) for k in s0)
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)
    assert all(torch.count_nonzero(v) == 0 for k, v in s0.items() if "lora_B" in k)  # PEFT init
    load_trainable_state(model, s1)
    assert all(torch.equal(trainable_state(model)[k], s1[k]) for k in s1)


def test_bad_state_is_refused():
    model, _ = load_model(ModelConfig(name="tiny-gpt2", lora_r=4), 3)
    state = trainable_state(model)
    name = next(iter(state))
    with pytest.raises(ModelError, match="not a trainable parameter"):
        load_trainable_state(model, {"nope": torch.zeros(1)})
    with pytest.raises(ModelError, match="has shape"):
        load_trainable_state(model, {name: torch.zeros(1)})


def test_head_can_stay_frozen():
    model, _ = load_model(ModelConfig(name="tiny-gpt2", lora_r=2, train_head=False), 4)
    assert all("lora_" in n for n in trainable_names(model))


def test_unknown_model_is_a_one_line_error(tmp_path):
    with pytest.raises(ModelError) as e:
        load_model(ModelConfig(name=str(tmp_path / "no-such-model")), 3)
    assert "\n" not in str(e.value)


def test_gaussian_lora_init_is_normal_with_std_one_over_r():
    """model.lora_init=gaussian (the paper's 'Gaussian initialization'): every LoRA A is
    N(0, 1/r^2), every B zero; the default (Kaiming-uniform A) is bounded by 1/sqrt(fan_in)."""
    import torch

    from fedtune.config import ModelConfig
    from fedtune.models import init_trainable_state, load_model

    r = 4
    model, _ = load_model(ModelConfig(name="tiny-llama", lora_r=r, lora_init="gaussian"), 4)
    state = init_trainable_state(model, 0, "gaussian")
    a = torch.cat([v.flatten() for k, v in state.items() if "lora_A" in k])
    assert all(v.abs().sum() == 0 for k, v in state.items() if "lora_B" in k)
    n, sigma = a.numel(), 1 / r  # 5 standard errors of the sample mean and std of n draws
    assert abs(a.mean().item()) < 5 * sigma / n**0.5
    assert abs(a.std().item() - sigma) < 5 * sigma / (2 * n) ** 0.5
    default = init_trainable_state(model, 0, "default")
    fan_in = next(v for k, v in default.items() if "lora_A" in k).shape[1]
    bound = 1 / fan_in**0.5  # kaiming_uniform(a=sqrt(5)) on [r, fan_in]
    a0 = torch.cat([v.flatten() for k, v in default.items() if "lora_A" in k])
    assert a0.abs().max().item() <= bound and a0.std().item() < 0.6 * (1 / r)


def test_zero_head_init_predicts_uniformly():
    """model.head_init=zero: the trained head starts at 0, so the untrained classifier's
    logits are all 0 (cross-entropy ln C); LoRA's init is unchanged; the default is normal."""
    import math

    import torch

    from fedtune.config import ModelConfig
    from fedtune.models import init_trainable_state, load_model, load_trainable_state

    model, _ = load_model(ModelConfig(name="tiny-gpt2", lora_r=4), 5)
    normal = init_trainable_state(model, 0)
    zero = init_trainable_state(model, 0, head_init="zero")
    heads = [k for k in zero if "score" in k and "lora_" not in k]
    assert heads and all(zero[k].abs().sum() == 0 < normal[k].abs().sum() for k in heads)
    assert all(torch.equal(zero[k], normal[k]) for k in zero if k not in heads)
    load_trainable_state(model, zero)
    model.eval()
    ids = torch.randint(0, 250, (3, 9))
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.equal(logits, torch.zeros(3, 5))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2]))
    assert loss.item() == pytest.approx(math.log(5))
