"""Shared fixtures: tiny configs (random 4-block models) and a small synthetic CSV dataset."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

from fedtune import config

WORDS = {
    "card": ["card", "visa", "plastic", "mastercard"],
    "transfer": ["transfer", "send", "wire", "payment"],
    "cash": ["atm", "cash", "withdraw", "machine"],
    "fee": ["fee", "charge", "cost", "extra"],
}


def write_synthetic(folder: Path, n_train: int = 240, n_test: int = 80, seed: int = 0) -> Path:
    """A 4-class keyword dataset a tiny model can learn in a few steps."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.csv", n_train), ("test.csv", n_test)):
        with (folder / name).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "category"])
            for i in range(n):
                label = list(WORDS)[i % len(WORDS)]
                words = rng.sample(WORDS[label], 2) + rng.sample(["my", "the", "a", "please"], 2)
                rng.shuffle(words)
                w.writerow([" ".join(words), label])
    return folder


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("synth"))


def tiny_cfg(data_dir: Path, model: str = "tiny-gpt2", **sections) -> config.RunConfig:
    """A seconds-long FedLLM config on the synthetic data."""
    base = {
        "seed": 0,
        "device": "cpu",
        "threads": 1,  # tiny models gain nothing from 2 threads and suffer when the box is busy
        "progress": False,
        "model": {"name": model, "lora_r": 4, "max_length": 32},
        "data": {"path": str(data_dir), "public_size": 60, "num_clients": 3},
        "train": {"batch_size": 8, "lr": 5e-3},
        "fed": {"rounds": 2},
    }
    for k, v in sections.items():
        if isinstance(v, dict):
            base.setdefault(k, {}).update(v)
        else:
            base[k] = v
    return config.from_dict(base)


def gen_cfg(data_dir: Path, model: str = "tiny-gpt2", **sections) -> config.RunConfig:
    """:func:`tiny_cfg` as a generation task: the synthetic data's category name is the
    response to its text (classification run as generation)."""
    gen = {
        "data": {
            "task": "generation",
            "prompt_template": "{text}",
            "response_template": "{category}",
        },
        "model": {"max_length": 48},
        "eval": {"generate_samples": 4, "max_new_tokens": 6},
    }
    for k, v in sections.items():
        gen[k] = {**gen.get(k, {}), **v} if isinstance(v, dict) else v
    model_opts = gen.pop("model")
    return config.with_overrides(tiny_cfg(data_dir, model=model, **gen), model=model_opts)
