"""The training loop, inference and evaluation on the shared model, one state at a time.

:func:`train` runs a :class:`~fedtune.execution.jobs.Train` job and :func:`predict` a
:class:`~fedtune.execution.jobs.Predict` job, on the model, task and settings of a context (the sequential executor's work; the batched
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
from torch import nn
from tqdm.auto import tqdm

from .. import compute, seeds
from ..config import TrainConfig
from ..context import Context
from ..data import Tokenized, batches
from ..fedopt import drift_step
from ..models import load_trainable_state, trainable_state
from .jobs import Predict, Train


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def shape_of(batch: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """What a step's FLOPs depend on: ``(B, L)``, and for generation the response positions
    ``R`` (the LM head runs there only)."""
    extra = tuple(batch["target_pos"].shape[1:]) if "target_pos" in batch else ()
    return (*batch["input_ids"].shape, *extra)


@dataclass
class LocalResult:
    state: dict[str, torch.Tensor]  # trained trainable state
    opt_state: dict | None  # optimizer state to keep with the client
    loss: float  # mean training loss over steps
    steps: int
    samples: int


def start_training(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    opt_state: dict | None,
    cfg: TrainConfig,
    frozen: tuple[str, ...] = (),
) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
    """Load ``state`` into the shared model and rebuild the party's optimizer around it; the
    ``frozen`` tensors are loaded, then left out of training until :func:`thaw`."""
    load_trainable_state(model, state)
    if frozen:
        params = dict(model.named_parameters())
        for n in frozen:
            params[n].requires_grad_(False)
    params = trainable_params(model)
    opt = make_optimizer(params, cfg)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    model.train()
    return params, opt


def thaw(model: nn.Module, frozen: tuple[str, ...]) -> None:
    """Make the tensors a job froze trainable again (the shared model outlives the job)."""
    params = dict(model.named_parameters())
    for n in frozen:
        params[n].requires_grad_(True)


def optimizer_step(opt: torch.optim.Optimizer, params: list, cfg: TrainConfig) -> None:
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()


def finish_training(model, opt, cfg: TrainConfig, loss_sum, steps: int, samples: int):
    """Read the trained state (and, with optimizer_state=keep, the optimizer's) back out."""
    compute.hold(opt.state)  # the party held this optimizer state while it trained
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


def train(ctx: Context, job: Train) -> LocalResult:
    """The training loop: run ``job`` on ``ctx``'s shared model, one step per batch of
    :func:`job_batches`, with the job's loss on the task's outputs.

    Loads the job's state, rebuilds the optimizer around it, and returns the trained state,
    the optimizer state and the mean loss. A private job under ``privacy.dpsgd`` takes
    Poisson batches and Opacus's clipped, noised steps instead (:mod:`fedtune.privacy.dpsgd`)."""
    model, cfg = ctx.model, ctx.cfg.train
    seeds.seed_torch(job.stream)
    try:
        params, opt = start_training(model, job.state, job.opt_state, cfg, job.frozen)
        return _train(ctx, job, params, opt)
    finally:
        thaw(model, job.frozen)


def _train(ctx: Context, job: Train, params: list, opt) -> LocalResult:
    model, cfg, device = ctx.model, ctx.cfg.train, ctx.device
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # fedopt's drift terms, moved to the device once per job, not once per step
    anchor = {n: job.state[n].to(device) for n, _ in named} if job.prox_mu > 0 else None
    correction = job.correction and {n: t.to(device) for n, t in job.correction.items()}
    loss_fn = job.loss.to(device)
    loss_sum = torch.zeros((), device=device)  # accumulated on device: no sync per step
    steps = samples = 0
    bar = tqdm(total=job.steps or None, leave=False, disable=not ctx.progress, unit="step")
    if job.private and ctx.cfg.privacy.dpsgd:
        stepping, batches_ = dpsgd_job(ctx, job, opt)
    else:
        stepping, batches_ = contextlib.nullcontext(opt), job_batches(job, cfg, ctx.data.pad_id)
    with stepping as step_opt:
        for batch in batches_:
            batch = to_device(batch, device)

            def forward_backward(batch=batch):
                loss = loss_fn(ctx.task.logits(model, batch, cfg.autocast), batch)
                step_opt.zero_grad(set_to_none=True)
                loss.backward()
                return loss

            key = (job.loss.name, cfg.autocast, *shape_of(batch))
            key += ("frozen", len(job.frozen)) if job.frozen else ()  # no gradients for them
            loss = compute.step(key, forward_backward, grads=params)
            if anchor is not None or correction:
                drift_step(named, job.prox_mu, anchor, correction)
            optimizer_step(step_opt, params, cfg)
            loss_sum += loss.detach()
            steps += 1
            samples += len(batch["labels"])
            bar.update(1)
    bar.close()
    return finish_training(model, opt, cfg, loss_sum, steps, samples)


def dpsgd_job(ctx: Context, job: Train, opt: torch.optim.Optimizer):
    """A private job under ``privacy.dpsgd``: Opacus around the shared model and ``opt``, and
    the job's Poisson batches (an empty draw is skipped: no step, no data read)."""
    from ..privacy import dp, dpsgd

    p = ctx.cfg.privacy
    q, steps, z = dpsgd.plan(ctx.cfg, len(job.idx))
    gen = dp.generator(p.reproducible_noise, (*job.stream, seeds.DP_NOISE))
    draws = dpsgd.poisson_batches(np.asarray(job.idx), q, steps, seeds.rng(job.stream))
    pad_id = ctx.data.pad_id
    batches_ = (next(batches(job.data, sel, len(sel), pad_id)) for sel in draws if len(sel))
    return dpsgd.private_training(ctx.model, opt, p, z, ctx.cfg.train.batch_size, gen), batches_


@torch.inference_mode()
def outputs(
    ctx: Context,
    state: dict[str, torch.Tensor] | None,
    data: Tokenized,
    idx: np.ndarray,
    reduce=None,
) -> torch.Tensor:
    """The task's per-row scores (:meth:`~fedtune.tasks.Task.scores`; classification: logits
    ``[len(idx), C]``; float32, CPU, in ``idx`` order) under ``state`` (None: what the model
    holds), in ``train.eval_batch_size`` batches of length-sorted samples, so little compute
    goes to padding. ``reduce(logits, batch)`` replaces the task's scores when given."""
    model, amp = ctx.model, ctx.cfg.train.autocast
    reduce = reduce or ctx.task.scores
    if state is not None:
        load_trainable_state(model, state)
    model.eval()
    idx = np.asarray(idx)
    order = np.argsort([len(data.ids[i]) for i in idx], kind="stable")
    out: list[torch.Tensor] = []
    for batch in batches(data, idx[order], ctx.cfg.train.eval_batch_size, ctx.data.pad_id):
        batch = to_device(batch, ctx.device)
        key = ("infer", amp, *shape_of(batch))
        out.append(compute.step(key, lambda b=batch: reduce(ctx.task.logits(model, b, amp), b)))
    logits = torch.cat(out).cpu()
    result = torch.empty_like(logits)
    result[torch.as_tensor(order)] = logits  # back to idx order
    model.train()
    return result


def predict(ctx: Context, job: Predict) -> torch.Tensor:
    """Run a :class:`~fedtune.execution.jobs.Predict` job: outputs ``[len(idx), C]``."""
    return outputs(ctx, job.state, job.data, job.idx, job.reduce)


def generate_job(ctx: Context, job) -> list[list[int]]:
    """Run a :class:`~fedtune.execution.jobs.Generate` job: each row's new token ids."""
    from ..generate import generate_ids

    data = job.data
    prompts = [data.ids[i][: int(data.prompt_len[i])] for i in job.idx]
    cfg = ctx.cfg.eval
    return generate_ids(
        ctx.model, ctx.tokenizer, prompts, job.max_new_tokens, cfg.generate_batch_size, job.state
    )


def evaluate(ctx: Context, state: dict[str, torch.Tensor] | None, data: Tokenized) -> dict:
    """The task's test metrics of ``state`` on all of ``data``."""
    return ctx.task.metrics(outputs(ctx, state, data, np.arange(len(data))), data.labels)


def clients_mean(evals: list[dict]) -> dict:
    """Several clients' own models, each tested by :func:`evaluate`: the mean and the list of
    their accuracies (generation: perplexities)."""
    key, many = (
        ("accuracy", "accuracies") if "accuracy" in evals[0] else ("perplexity", "perplexities")
    )
    values = [e[key] for e in evals]
    return {f"client_{key}": float(np.mean(values)), f"client_{many}": values}
