"""Every seed stream of a run, named in one place.

Each random draw in fedtune is seeded by a tuple that starts with ``cfg.seed`` and names what it
is for, so that a draw never depends on which other draws happened before it (a resumed run, a
run on Flower and an in-process run draw the same numbers). The constants below separate
streams that would otherwise share a tuple; their values are arbitrary large primes and are
part of a run's results: changing one changes every run that uses it.

=====================  ==========================================================================
tuple                  what it seeds
=====================  ==========================================================================
(seed, rnd, cid)       client ``cid``'s training in round ``rnd``: batch order and dropout
(seed, rnd, cid, 1)    its second job of the round (KD's b8 distillation; split's sample choice)
(seed, rnd, SAMPLING)  which clients are sampled in round ``rnd`` (+ attempt on a retry)
(seed, rnd, attempt, cid, DROPOUT)  whether client ``cid`` drops out (fault simulation)
(seed, rnd, KD_SERVER) the KD server's distillation (b5): batch order and dropout
(seed, rnd, BATCHED, cid)  the batched executor's dropout (a fused job's first client)
(seed, PUBLIC_SUBSET)  KD's seeded subset of the public set (``kd.public_samples``)
(seed, rnd, DP_NOISE[, cid])  DP noise, only with ``privacy.reproducible_noise`` (else the OS's)
seed / seed + 1        data split / evaluation subset (:mod:`fedtune.data`)
seed (torch)           the initial LoRA and head (:func:`fedtune.models.init_trainable_state`)
0 (torch)              the frozen random backbone of the tiny test models (same in every process)
=====================  ==========================================================================
"""

from __future__ import annotations

import numpy as np
import torch

SAMPLING = 7919
DROPOUT = 104_729
KD_SERVER = 1_000_003
BATCHED = 1_000_033
PUBLIC_SUBSET = 4243
DP_NOISE = 15_485_863


def client(seed: int, rnd: int, cid: int, job: int = 0) -> tuple[int, ...]:
    """The stream of client ``cid``'s ``job``-th piece of training in round ``rnd``."""
    return (seed, rnd, cid) if job == 0 else (seed, rnd, cid, job)


def batched(stream: tuple[int, ...]) -> tuple[int, ...]:
    """The batched executor's dropout stream for a fused job whose first client has ``stream``:
    :data:`BATCHED` before that client's id (one stream for all the clients fused with it;
    with ``fed.concurrent_clients`` every chunk has its own first client, so its own stream)."""
    return (*stream[:2], BATCHED, *stream[2:])


def rng(stream: tuple[int, ...]) -> np.random.Generator:
    """A numpy generator for ``stream`` (batch order, sampling)."""
    return np.random.default_rng(list(stream))


def torch_seed(stream: tuple[int, ...]) -> int:
    """A 32-bit seed for a torch generator, derived from ``stream``."""
    return int(np.random.SeedSequence(list(stream)).generate_state(1)[0])


def seed_torch(stream: tuple[int, ...]) -> None:
    """Seed torch's RNGs (dropout) from ``stream``."""
    torch.manual_seed(torch_seed(stream))
