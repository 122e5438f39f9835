"""Client faults and attacks for robustness experiments (plain functions any runtime can call).

* :func:`drops_out` - seeded per-round client dropout (``fed.dropout``): the client receives the
  round's first message and never answers;
* :func:`misses_deadline` - straggler deadline (``fed.deadline_s``): a client whose measured
  compute seconds in the round, times its ``fed.client_slowdown`` factor, exceed the deadline is
  lost; its reply is discarded (never counted as received). Measured seconds vary from run to
  run, so deterministic tests use a slowdown factor far beyond any real variation;
* :func:`too_few` - the round cannot be aggregated (fewer than ``fed.min_clients`` clients
  left); the runtime then retries or skips it (``fed.on_too_few``);
* :func:`poison` - attack simulation (``fed.poison_clients``, ``fed.poison_scale``): a
  malicious client's reply, for testing validation and robust aggregation.
"""

from __future__ import annotations

import torch

from .. import seeds
from ..config import FedConfig
from ..messages import Message


def drops_out(p: float, seed: int, rnd: int, cid: int, attempt: int = 0) -> bool:
    """Whether client ``cid`` drops out of attempt ``attempt`` of round ``rnd``: one uniform
    draw seeded by ``(seed, round, attempt, client)``, so the decision does not depend on which
    other clients were sampled, nor on the order they are visited in."""
    if p <= 0:
        return False
    return bool(seeds.rng((seed, rnd, attempt, cid, seeds.DROPOUT)).random() < p)


def misses_deadline(seconds: float, cid: int, fed: FedConfig) -> bool:
    """Whether ``seconds`` of measured client compute, scaled by the client's slowdown factor,
    exceed ``fed.deadline_s`` (0 = no deadline)."""
    if fed.deadline_s <= 0:
        return False
    slowdown = fed.client_slowdown[cid] if fed.client_slowdown else 1.0
    return seconds * slowdown > fed.deadline_s


def too_few(alive: int, min_clients: int) -> bool:
    """A round needs replies from at least ``min_clients`` clients to be aggregated."""
    return alive < min_clients


@torch.no_grad()
def poison(reply: Message, sent: Message, scale: float) -> Message:
    """A malicious client's version of ``reply`` (attack simulation, off by default).

    Every floating tensor that the server also sent (same name and shape) becomes
    ``sent + scale * (reply - sent)``: the client's update scaled (a model-replacement /
    boosting attack). Other floating tensors (e.g. logits) are multiplied by ``scale``."""
    out = {}
    for name, t in reply.tensors.items():
        ref = sent.tensors.get(name)
        if not t.is_floating_point():
            out[name] = t
        elif ref is not None and ref.shape == t.shape:
            ref = ref.to(t.device, t.dtype)
            out[name] = ref + scale * (t - ref)
        else:
            out[name] = t * scale
    return Message(reply.kind, reply.round, reply.sender, reply.receiver, out, dict(reply.meta))
