"""Training, evaluation and inference on the shared model, one trainable state at a time.

Every function takes the shared LoRA model and a trainable state (``dict[name, Tensor]``),
loads the state into the model, computes, and returns new tensors. Nothing here keeps a copy of
the model, so N simulated clients cost one backbone plus N small states.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import compute
from .config import TrainConfig
from .data import Tokenized, batches
from .models import load_trainable_state, trainable_state


def seed_everything(*parts: int) -> None:
    """Seed torch's RNGs (dropout) from a tuple such as (seed, round, client)."""
    torch.manual_seed(int(np.random.SeedSequence(list(parts)).generate_state(1)[0]))


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


def train_local(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    opt_state: dict | None,
    data: Tokenized,
    idx: np.ndarray,
    cfg: TrainConfig,
    rng: np.random.Generator,
    pad_id: int,
    device: torch.device,
    desc: str = "local",
    progress: bool = False,
) -> LocalResult:
    """Fine-tune ``state`` on ``data[idx]`` with cross-entropy (FedLLM a2, KD b1).

    Runs ``cfg.local_steps`` steps, or ``cfg.local_epochs`` passes of shuffled batches
    (``input_ids [B, L]`` dynamically padded). Returns the new state and optimizer state."""
    params, opt = start_training(model, state, opt_state, cfg)
    total = num_local_steps(len(idx), cfg)
    loss_sum = torch.zeros((), device=device)  # accumulated on device: no sync per step
    steps = samples = 0
    bar = tqdm(total=total, desc=desc, leave=False, disable=not progress, unit="step")
    while steps < total:
        for batch in batches(data, idx, cfg.batch_size, pad_id, rng, cfg.group_by_length):
            batch = to_device(batch, device)
            with compute.step(("train", cfg.autocast, *batch["input_ids"].shape)):
                loss = F.cross_entropy(forward_logits(model, batch, cfg.autocast), batch["labels"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
            optimizer_step(opt, params, cfg)
            loss_sum += loss.detach()
            steps += 1
            samples += len(batch["labels"])
            bar.update(1)
            if steps >= total:
                break
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
