"""A malicious fedtune client for tests/test_adversarial.py.

:class:`Adversary` wraps an honest client and, in the rounds its schedule names, tampers with
what it sends: its upload (every framework) or, for Split-FedLLM, its per-batch requests to the
server. The honest work is done first, so every attack is the real message with one thing
wrong. ``silent`` (no work, no reply) and ``mute`` (the work done, its upload withheld) are
the references: what the honest clients get when client 0's part is simply missing.

Imported by a SuperNode (``fedtune flower supernode --plugin adversary``, with this folder on
``PYTHONPATH``), it makes that node's client 0 an :class:`Adversary`, with the schedules in the
``FEDTUNE_ADVERSARY`` environment variable (JSON ``{"schedules": {framework: {round:
attack}}, "stall": seconds}``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Generator

import torch

from fedtune import frameworks
from fedtune.messages import ACTIVATIONS, LABELS, METADATA, Message, client_name


def _first_float(tensors: dict) -> str:
    return next(n for n, t in tensors.items() if t.is_floating_point())


def _with(msg: Message, tensors=None, meta=None, **routing) -> Message:
    return Message(
        routing.get("kind", msg.kind),
        routing.get("round", msg.round),
        routing.get("sender", msg.sender),
        routing.get("receiver", msg.receiver),
        msg.tensors if tensors is None else tensors,
        msg.meta if meta is None else meta,
    )


def _set(msg: Message, value: float) -> Message:
    """The message with one entry of its first floating tensor set to ``value``."""
    t = dict(msg.tensors)
    name = _first_float(t)
    x = t[name].clone()
    x.view(-1)[0] = value
    return _with(msg, {**t, name: x})


def _scaled(msg: Message, factor: float) -> Message:
    t = {n: v * factor if v.is_floating_point() else v for n, v in msg.tensors.items()}
    return _with(msg, t)


def _cut(msg: Message) -> Message:
    t = dict(msg.tensors)
    name = _first_float(t)
    return _with(msg, {**t, name: t[name][..., :-1].contiguous()})


# What a client's upload can get wrong (every framework).
UPLOADS = {
    "nan": lambda m: _set(m, float("nan")),
    "inf": lambda m: _set(m, float("inf")),
    "huge": lambda m: _scaled(m, 1e30),  # finite: a model-replacement attack
    "shape": _cut,
    "names": lambda m: _with(m, {**m.tensors, "extra.weight": torch.zeros(3)}),
    "samples": lambda m: _with(m, meta={**m.meta, "num_samples": 10**12}),
    "forge": lambda m: _with(m, sender=client_name(1)),
    "replay": lambda m: _with(m, round=m.round - 1),
}


def _long(m: Message) -> Message:
    """Activations over ``model.max_length``: 64 more positions (an allocation it sizes)."""
    v, mask = m.tensors["values"], m.tensors["mask"]
    pad = 64
    v = torch.cat([v, v[:, -1:].expand(-1, pad, -1)], 1)
    mask = torch.cat([mask, mask[:, -1:].expand(-1, pad)], 1)
    return _with(m, {**m.tensors, "values": v, "mask": mask})


def _wide(m: Message) -> Message:
    """A batch 64 times ``train.batch_size``."""
    t = {n: v.repeat(64, *([1] * (v.dim() - 1))) for n, v in m.tensors.items()}
    return _with(m, t)


# What a split client's requests can get wrong: (kind it tampers with, how).
REQUESTS = {
    "act_nan": (ACTIVATIONS, lambda m: _set(m, float("nan"))),
    "act_huge": (ACTIVATIONS, lambda m: _scaled(m, 1e30)),
    "act_long": (ACTIVATIONS, _long),
    "act_wide": (ACTIVATIONS, _wide),
    "act_hidden": (ACTIVATIONS, _cut),
    "act_nomask": (ACTIVATIONS, lambda m: _with(m, {"values": m.tensors["values"]})),
    "act_codec": (
        ACTIVATIONS,
        lambda m: _with(m, {**m.tensors, "indices": torch.zeros(1, dtype=torch.int16)}),
    ),
    "labels_range": (LABELS, lambda m: _with(m, {"labels": m.tensors["labels"] + 1000})),
    "no_labels": (LABELS, None),  # activations before (without) their labels
    "budget": (ACTIVATIONS, "twice"),  # every batch sent twice: over its samples per round
    "req_forge": (ACTIVATIONS, lambda m: _with(m, sender=client_name(1))),
    "req_replay": (ACTIVATIONS, lambda m: _with(m, round=m.round - 1)),
    # the first batch honest (the server trains on it), the second replayed: all undone
    "late_replay": (ACTIVATIONS, "late"),
}
STALL = "stall"  # Flower: opens its split stream and sends nothing for `stall_seconds`


class EvilLink:
    """The split client's link, with its requests of one kind tampered with."""

    def __init__(self, link, attack: str) -> None:
        self.link, (self.kind, self.how) = link, REQUESTS[attack]
        self.calls = 0

    def call(self, msg: Message) -> Message:
        if msg.kind != self.kind:
            return self.link.call(msg)
        if self.how is None:  # dropped: the server sees activations without labels
            return Message(METADATA, msg.round, msg.receiver, msg.sender, {}, {"received": 0})
        if self.how == "twice":
            self.link.call(msg)
            return self.link.call(msg)
        if self.how == "late":
            self.calls += 1
            return self.link.call(msg if self.calls == 1 else _with(msg, round=msg.round - 1))
        return self.link.call(self.how(msg))


class Adversary:
    """``honest`` client, misbehaving in the rounds of ``schedule`` (``{round: attack}``)."""

    def __init__(self, honest, schedule: dict[int, str], stall_seconds: float = 0.0) -> None:
        self.honest, self.schedule, self.stall_seconds = honest, schedule, stall_seconds

    def __getattr__(self, name: str):  # its state, for evaluation and checkpoints
        return getattr(self.__dict__["honest"], name)

    def handle(self, msg: Message, link=None):
        """The honest client's work (a generator of jobs, or split's reply), tampered with."""
        attack = self.schedule.get(msg.round)
        if attack == "silent":
            return None
        if attack == STALL:
            time.sleep(self.stall_seconds)
        elif attack in REQUESTS and link is not None:
            link = EvilLink(link, attack)
        work = self.honest.handle(msg, link)
        if isinstance(work, Generator):
            return self._tampered(work, attack)
        return tamper(work, attack)

    @staticmethod
    def _tampered(work: Generator, attack: str) -> Generator:
        return tamper((yield from work), attack)


def tamper(reply: Message | None, attack: str | None) -> Message | None:
    """The reply as the attack sends it: with one thing wrong, or none at all (``mute``:
    the honest work done, the upload withheld)."""
    if reply is None or attack == "mute":
        return None
    return UPLOADS[attack](reply) if attack in UPLOADS else reply


def install(schedules: dict[str, dict[int, str]], stall_seconds: float = 0.0) -> None:
    """Make client 0 of each framework in ``schedules`` an :class:`Adversary` in this process."""
    for name, schedule in schedules.items():
        fw = frameworks.get(name)

        def client(ctx, fw=fw, schedule=schedule):
            honest = fw.client(ctx)
            return Adversary(honest, schedule, stall_seconds) if ctx.cid == 0 else honest

        frameworks.register(
            name,
            fw.server,
            client,
            config=fw.config,
            title=fw.title,
            client_eval=fw.client_eval,
        )


if os.environ.get("FEDTUNE_ADVERSARY"):  # imported by a SuperNode as a plug-in
    spec = json.loads(os.environ["FEDTUNE_ADVERSARY"])
    schedules = {fw: {int(r): a for r, a in s.items()} for fw, s in spec["schedules"].items()}
    install(schedules, float(spec.get("stall", 0)))
