"""What bench/engine.py times: the modes, the run configs, and the two workloads that are
compared (centralized training, fedtune rounds), each with the work it does counted.

Work is counted in FLOPs by fedtune's own meter (:mod:`fedtune.compute`, ``flops=shape``) on a
separate, untimed run: every forward and backward pass of every party (private training,
KD's public inference and distillation on both sides, both halves of a split step). "At equal
work" then compares FLOP/s: a framework that must do 3x the passes of centralized training per
private sample is not charged for them.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fedtune import config
from fedtune.compute import ComputeMeter
from fedtune.context import build_context
from fedtune.execution.jobs import Train
from fedtune.execution.train import num_local_steps, train
from fedtune.runtime import run
from fedtune.runtime.inprocess import InProcess
from fedtune.textdata import default_data_dir

_CPU_TINY = dict(
    model="tiny-llama",
    device="cpu",
    dtype="float32",
    batch=8,
    per_client=32,
    max_length=64,
    rounds=6,
    clients=(3, 30),
    public=64,
    threads=1,
    passes=4,
    tasks=("classification",),
)
MODES = {
    "cpu": _CPU_TINY,
    # a real model on this CPU in about 10 minutes: few steps per configuration, 3 clients
    "cpu-real": dict(
        _CPU_TINY,
        model="smollm2-135m",
        per_client=16,
        max_length=64,
        rounds=2,
        clients=(3,),
        public=16,
        threads=0,
        passes=1,
        tasks=("classification", "generation"),
        gen_per_client=8,  # E2E rows are ~100 tokens, banking77's ~16: half the samples
        gen_public=8,
    ),
    "gpu": dict(
        _CPU_TINY,
        model="smollm2-135m",
        device="cuda",
        dtype="bfloat16",
        batch=16,
        per_client=64,
        max_length=80,
        rounds=4,
        public=512,
        threads=0,
        passes=3,
        tasks=("classification", "generation"),
    ),
}
# (framework, engine) pairs timed per task
FRAMEWORKS = {
    "classification": (
        ("fedllm", "sequential"),
        ("fedllm", "batched"),
        ("kd", "sequential"),
        ("kd", "batched"),
        ("split", "sequential"),
    ),
    "generation": (("fedllm", "sequential"), ("kd", "sequential"), ("split", "sequential")),
}
E2E = {  # E2E NLG as the causal-LM task (configs/demo-compare-gen.toml's prompt)
    "task": "generation",
    "prompt_template": "Describe this restaurant in one sentence: {mr}",
    "response_template": "{ref}",
    "public_size": 500,  # of its 4672 training rows (the official dev split)
}


def run_config(m: dict, n: int, task: str = "classification", **sections) -> config.RunConfig:
    gen = task == "generation"
    per_client = m.get("gen_per_client", m["per_client"]) if gen else m["per_client"]
    public = m.get("gen_public", m["public"]) if gen else m["public"]
    data = {"num_clients": n, "samples_per_client": per_client, "test_size": 8 if gen else 64}
    if gen:
        found = default_data_dir()
        data.update(E2E, path=str((found.parent if found else Path("data")) / "e2e"))
    base = {
        "seed": 0,
        "device": m["device"],
        "threads": m["threads"],
        "flops": "off",
        "progress": False,
        "model": {
            "name": m["model"],
            "dtype": m["dtype"],
            "max_length": m["max_length"] * (2 if gen else 1),  # prompt and response: ~100
        },
        "data": data,
        "train": {"batch_size": m["batch"], "eval_batch_size": 256, "group_by_length": True},
        "fed": {"rounds": m["rounds"], "eval_every": m["rounds"]},
        "kd": {"public_samples": public, "client_eval": False},
        "eval": {"generate_samples": 1, "max_new_tokens": 1, "at_start": False},
    }
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return config.from_dict(base)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tokens(data, idx) -> int:
    """Tokens in rows ``idx`` of a tokenized dataset (unpadded: what the model must read)."""
    return int(sum(len(data.ids[i]) for i in idx))


def centralized(m: dict, n: int, batch: int, task: str = "classification"):
    """One party training over the pooled data of ``n`` clients at ``batch`` per step.
    Returns ``(sample, work)``: ``sample()`` times two passes and returns their seconds;
    ``work`` is one pass's samples, tokens and FLOPs (counted once, untimed: the warm-up)."""
    cfg = run_config(m, n, task, train={"batch_size": batch})
    ctx = build_context(cfg)
    pooled = np.concatenate(ctx.data.client_idx)
    steps = num_local_steps(len(pooled), cfg.train)
    job = Train(ctx.init_state, None, ctx.data.train, pooled, ctx.task.loss(), (0,), steps=steps)
    meter = ComputeMeter(ctx.device, "shape", ctx.flop_cache)
    with meter.measure():  # also the warm-up
        res = train(ctx, job)
    work = {
        "samples": res.samples,
        "tokens": tokens(ctx.data.train, pooled),
        "flops": meter.stats.flops,
    }

    def sample() -> list[float]:
        times = []
        for _ in range(2):  # two passes, like fedtune's two rounds
            sync(m["device"])
            t0 = time.perf_counter()
            train(ctx, job)
            sync(m["device"])
            times.append(time.perf_counter() - t0)
        return times

    return sample, work


def fedtune_run(m: dict, framework: str, engine: str, n: int, task: str = "classification"):
    """fedtune's rounds of one framework and engine. Returns ``(sample, work)``:
    ``sample()`` runs 2 simulated rounds (the context built once) and returns their round
    seconds; ``work`` is one round's private training samples and tokens and every party's
    FLOPs, counted on a separate, untimed round that also warms every cache up."""
    fed = {"framework": framework, "engine": engine, "rounds": 2, "eval_every": 2}
    cfg = run_config(m, n, task, fed=fed)
    ctx = build_context(cfg)
    counted = config.with_overrides(cfg, flops="shape", fed={"rounds": 1, "eval_every": 1})
    # the run's meters follow the context's config: the counting run gets its own view
    row = run(counted, InProcess(), ctx=replace(ctx, cfg=counted), log=None).history[-1]
    idx = np.concatenate(ctx.data.client_idx)
    work = {
        "samples": len(idx),
        "tokens": tokens(ctx.data.train, idx),
        "flops": sum(p["flops"] for p in row["per_client"].values()) + row["server_flops"],
        "client_flops": sum(p["flops"] for p in row["per_client"].values()),
        "server_flops": row["server_flops"],
    }

    def sample() -> list[float]:  # warm: the counting run met every cache first
        history = run(cfg, InProcess(), ctx=ctx, log=None).history
        return [r["round_seconds"] for r in history if r["round"] > 0]

    return sample, work
