"""Which samples a split client trains on, and where each client's model is cut."""

from __future__ import annotations

import math

import numpy as np
import torch

from ... import compute, seeds
from ...config import RunConfig
from ...context import Context, ServerContext
from ...errors import ConfigError
from ...messages import (
    ACTIVATIONS,
    GRADIENTS,
    LABELS,
    METADATA,
    PARAMETERS,
    SERVER,
    Message,
    encode,
)
from ...models import num_blocks
from .config import is_u_shaped
from .model import client_forward, compress, part_names


def samples_per_round(cfg: RunConfig, size: int) -> int:
    """Samples a client holding ``size`` samples trains on per round: ``split.samples_per_round``,
    else ``train.local_steps`` batches, else ``train.local_epochs`` passes."""
    t = cfg.train
    return cfg.split.samples_per_round or (t.local_steps * t.batch_size) or t.local_epochs * size


def round_samples(cfg: RunConfig, samples: np.ndarray, cid: int, rnd: int) -> np.ndarray:
    """The positions in ``samples`` (client ``cid``'s) it trains on in round ``rnd``
    (shuffled, seeded); more than one pass concatenates fresh permutations."""
    n = samples_per_round(cfg, len(samples))
    rng = seeds.rng(seeds.client(cfg.seed, rnd, cid, job=1))
    return np.concatenate([rng.permutation(samples) for _ in range(-(-n // len(samples)))])[:n]


def client_step_flops(ctx: Context, k: int) -> int:
    """FLOPs of one client forward + backward (c1 + c5) at split layer ``k`` on a full-length
    batch ``[batch_size, model.max_length]``, counted with torch's flop counter (:func:`fedtune.compute.flop_counter`)."""
    b, length = ctx.cfg.train.batch_size, ctx.cfg.model.max_length
    ids = torch.ones(b, length, dtype=torch.long, device=ctx.device)
    with compute.flop_counter() as counter:
        h = client_forward(ctx.model, ids, torch.ones_like(ids), k, ctx.cfg.train.autocast)
        h.float().sum().backward()
    ctx.model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def wire_bytes_per_round(ctx: Context, k: int, num_samples: int) -> int:
    """Estimated bytes (up + down) one client at split layer ``k`` puts on the wire per round:
    the real messages encoded, with every batch padded to ``model.max_length``."""
    cfg, b = ctx.cfg, ctx.cfg.train.batch_size
    s, hidden = cfg.split, ctx.model.config.hidden_size

    def size(kind: str, tensors: dict, meta: dict | None = None) -> int:
        return len(encode(Message(kind, 1, SERVER, "client-0", tensors, meta or {})))

    steps = -(-num_samples // b)
    h = compress(torch.zeros(b, cfg.model.max_length, hidden), s.compression, s.topk_ratio)
    mask = {"mask": torch.ones(b, cfg.model.max_length, dtype=torch.bool)}
    per_batch = size(ACTIVATIONS, {**h, **mask})  # c2: h [B, L, H] and the mask up
    u = is_u_shaped(cfg)
    if u:  # pooled states [B, H] down, their gradient up, then dL/dh down
        full = torch.zeros(b, cfg.model.max_length, hidden)
        pooled = ctx.task.pool(full, torch.ones(b, cfg.model.max_length, dtype=torch.long))
        pooled = compress(pooled, s.compression, s.topk_ratio)  # [B, H]; generation [B, L, H]
        per_batch += size(ACTIVATIONS, pooled) + size(GRADIENTS, pooled) + size(GRADIENTS, h)
    else:  # c4: dL/dh down with the batch loss (a float: 1/3 has a typical repr length)
        per_batch += size(GRADIENTS, h, {"loss": 1 / 3})
    once = 0
    if not u:  # c2 (labels) up once per round, and the server's acknowledgement
        labels = {"labels": torch.zeros(num_samples, dtype=torch.long)}
        if ctx.task.model_kind == "causal":  # the response tokens and their positions
            t = torch.zeros(num_samples, cfg.model.max_length - 1, dtype=torch.int32)
            labels = {"target_pos": t, "target_ids": t}
        once += size(LABELS, labels)
        once += size(METADATA, {}, {"received": num_samples})
    state = {n: ctx.init_state[n] for n in part_names(ctx.model, k, "client", u)}
    once += size(PARAMETERS, state, {"split_layer": k})  # cc3 down
    once += size(PARAMETERS, state, {"num_samples": num_samples, "loss": 1 / 3, "steps": steps})
    return steps * per_batch + once


def choose_split_layers(ctx: ServerContext) -> list[int]:
    """Each client's split layer ``k`` (``1 <= k < n`` blocks).

    policy=fixed: ``split.client_split_layers`` or ``split.split_layer`` for all.
    policy=budget: the deepest ``k`` whose estimated client FLOPs per round (full-length
    batches) and bytes per round fit the client's budgets. Deeper cuts keep more of the model,
    and more of the raw input's traces, on the client, and both costs grow with ``k`` (client
    blocks; client LoRA exchanged in cc1/cc3), so the deepest layer that fits is the most the
    client can afford. No fitting layer is a ConfigError."""
    s, n = ctx.cfg.split, num_blocks(ctx.model)
    num_clients = ctx.data.num_clients
    for key in ("client_split_layers", "client_compute_budgets", "client_bandwidth_budgets"):
        values = getattr(s, key)
        if values and len(values) != num_clients:
            raise ConfigError(
                f"config key split.{key}: needs {num_clients} values "
                f"(one per client), got {len(values)}"
            )
    layers = list(s.client_split_layers) or [s.split_layer] * num_clients
    if s.policy == "budget":
        # Client FLOPs are linear in k from k = 1 on (identical blocks), so two counts suffice.
        f1, f2 = client_step_flops(ctx, 1), client_step_flops(ctx, 2)
        full = client_step_flops(ctx, n)  # whole model on the client: the base of relative budgets
        layers = []
        for cid in range(num_clients):
            m = samples_per_round(ctx.cfg, ctx.data.client_sizes[cid])
            steps = -(-m // ctx.cfg.train.batch_size)
            compute_budget = s.client_compute_budgets[cid] if s.client_compute_budgets else math.inf
            if compute_budget <= 1:
                compute_budget *= full * steps
            bw_budget = s.client_bandwidth_budgets[cid] if s.client_bandwidth_budgets else math.inf
            fits = [
                k
                for k in range(1, n)
                if steps * (f1 + (k - 1) * (f2 - f1)) <= compute_budget
                and wire_bytes_per_round(ctx, k, m) <= bw_budget
            ]
            if not fits:
                raise ConfigError(
                    f"config key split.client_compute_budgets: no split layer fits client {cid}; "
                    f"layer 1 needs {steps * f1:.3g} FLOPs and "
                    f"{wire_bytes_per_round(ctx, 1, m):.3g} bytes per round"
                )
            layers.append(max(fits))
    for cid, k in enumerate(layers):
        if not 1 <= k < n:
            raise ConfigError(
                f"config key split.split_layer: client {cid} split layer {k} must "
                f"be in [1, {n - 1}] for a model with {n} blocks"
            )
    return layers
