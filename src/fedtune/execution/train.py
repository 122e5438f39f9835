"""The training loop, inference and evaluation on the shared model, one state at a time.

:func:`train` runs a :class:`~fedtune.execution.jobs.Train` job and :func:`predict` a
:class:`~fedtune.execution.jobs.Predict` job (the sequential executor's work; the batched
executor runs the same jobs for many clients at once, see :mod:`.engine`). Every function loads
a trainable state (``dict[name, Tensor]``) into the shared LoRA model, computes, and returns
new tensors. Nothing keeps a copy of the model: N simulated clients cost one backbone plus N
small states.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import compute, seeds
from ..config import TrainConfig
from ..data import Tokenized, batches
from ..models import load_trainable_state, trainable_state
from .jobs import Predict, Train


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def autocast(device: torch.device, mode: str):
    """Mixed-precision context for ``train.autocast`` ('off', 'bf16', 'fp16')."""
    if mode == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor], amp: str) -> torch.Tensor:
    """Classifier logits ``[B, num_labels]`` (float32) for ``input_ids [B, L]``."""
    with autocast(batch["input_ids"].device, amp):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits.float()


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class LocalResult:
    state: dict[str, torch.Tensor]  # trained trainable state
    opt_state: dict | None  # optimizer state to keep with the client
    loss: float  # mean training loss over steps
    steps: int
    samples: int


def start_training(
    model: nn.Module, state: dict[str, torch.Tensor], opt_state: dict | None, cfg: TrainConfig
) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
    """Load ``state`` into the shared model and rebuild the party's optimizer around it."""
    load_trainable_state(model, state)
    params = trainable_params(model)
    opt = make_optimizer(params, cfg)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    model.train()
    return params, opt


def optimizer_step(opt: torch.optim.Optimizer, params: list, cfg: TrainConfig) -> None:
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()


def finish_training(model, opt, cfg: TrainConfig, loss_sum, steps: int, samples: int):
    """Read the trained state (and, with optimizer_state=keep, the optimizer's) back out."""
    return LocalResult(
        state=trainable_state(model),
        opt_state=opt.state_dict() if cfg.optimizer_state == "keep" else None,
        loss=float(loss_sum) / max(steps, 1),
        steps=steps,
        samples=samples,
    )


def num_local_steps(n: int, cfg: TrainConfig) -> int:
    """Optimizer steps a client with ``n`` samples takes per round."""
    return cfg.local_steps or cfg.local_epochs * -(-n // cfg.batch_size)


def job_batches(job: Train, cfg: TrainConfig, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """The padded batches of a :class:`~fedtune.execution.jobs.Train` job, in order: the same
    sequence for every executor (both draw them from this function)."""
    rng = seeds.rng(job.stream)
    size = job.batch_size or cfg.batch_size
    idx = np.asarray(job.idx)
    steps, passes = 0, 0
    while len(idx) and (steps < job.steps if job.steps else passes < job.epochs):
        pos = idx
        if job.resample is not None:
            pos = idx[rng.choice(len(idx), size=len(idx), p=job.resample)]
        for batch in batches(job.data, pos, size, pad_id, rng, cfg.group_by_length):
            yield batch
            steps += 1
            if job.steps and steps >= job.steps:
                return
        passes += 1


def train(
    model: nn.Module,
    job: Train,
    cfg: TrainConfig,
    pad_id: int,
    device: torch.device,
    progress: bool = False,
) -> LocalResult:
    """The training loop: run ``job`` on the shared model, one step per batch of
    :func:`job_batches`, with the job's loss (cross-entropy, distillation, ...).

    Loads the job's state, rebuilds the optimizer around it, and returns the trained state,
    the optimizer state and the mean loss."""
    seeds.seed_torch(job.stream)
    params, opt = start_training(model, job.state, job.opt_state, cfg)
    loss_fn = job.loss.to(device)
    loss_sum = torch.zeros((), device=device)  # accumulated on device: no sync per step
    steps = samples = 0
    bar = tqdm(total=job.steps or None, leave=False, disable=not progress, unit="step")
    for batch in job_batches(job, cfg, pad_id):
        batch = to_device(batch, device)
        with compute.step((job.loss.name, cfg.autocast, *batch["input_ids"].shape)):
            loss = loss_fn(forward_logits(model, batch, cfg.autocast), batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        optimizer_step(opt, params, cfg)
        loss_sum += loss.detach()
        steps += 1
        samples += len(batch["labels"])
        bar.update(1)
    bar.close()
    return finish_training(model, opt, cfg, loss_sum, steps, samples)


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    state: dict[str, torch.Tensor] | None,
    data: Tokenized,
    idx: np.ndarray,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    amp: str = "off",
) -> torch.Tensor:
    """Logits ``[len(idx), num_labels]`` (float32, CPU, in ``idx`` order) under ``state``.

    Batches are formed from length-sorted samples so little compute goes to padding."""
    if state is not None:
        load_trainable_state(model, state)
    model.eval()
    idx = np.asarray(idx)
    order = np.argsort([len(data.ids[i]) for i in idx], kind="stable")
    out: list[torch.Tensor] = []
    for batch in batches(data, idx[order], batch_size, pad_id):
        batch = to_device(batch, device)
        with compute.step(("infer", amp, *batch["input_ids"].shape)):
            out.append(forward_logits(model, batch, amp))
    logits = torch.cat(out).cpu()
    result = torch.empty_like(logits)
    result[torch.as_tensor(order)] = logits  # back to idx order
    model.train()
    return result


def predict(
    model: nn.Module, job: Predict, cfg: TrainConfig, pad_id: int, device: torch.device
) -> torch.Tensor:
    """Run a :class:`~fedtune.execution.jobs.Predict` job: logits ``[len(idx), C]``."""
    return predict_logits(
        model, job.state, job.data, job.idx, cfg.eval_batch_size, pad_id, device, cfg.autocast
    )


def classification_metrics(logits: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 (over classes present in labels or predictions) and CE loss.

    ``logits [N, C]``, ``labels [N]``."""
    y = torch.as_tensor(labels, dtype=torch.long)
    pred = logits.argmax(-1)
    loss = F.cross_entropy(logits, y).item()
    acc = (pred == y).float().mean().item()
    c = logits.shape[1]
    tp = torch.bincount(y[pred == y], minlength=c).float()
    fp = torch.bincount(pred[pred != y], minlength=c).float()
    fn = torch.bincount(y[pred != y], minlength=c).float()
    present = (torch.bincount(y, minlength=c) + torch.bincount(pred, minlength=c)) > 0
    f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
    return {"accuracy": acc, "macro_f1": f1[present].mean().item(), "loss": loss}


def evaluate(
    model: nn.Module,
    state: dict[str, torch.Tensor] | None,
    data: Tokenized,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    amp: str = "off",
) -> dict[str, float]:
    """Test metrics of ``state`` on all of ``data``."""
    idx = np.arange(len(data))
    logits = predict_logits(model, state, data, idx, batch_size, pad_id, device, amp)
    return classification_metrics(logits, data.labels)
