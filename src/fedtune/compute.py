"""Client compute accounting: FLOPs, wall seconds and peak memory of a party's own work.

Training and inference code runs each step through :func:`step` with a key holding the step's
kind and shapes. The first time a run meets a key, the step's cost is measured on a replay of
it (:func:`fedtune.probe.replay`: random state forked, gradients restored) while the meter's
clock is stopped; later steps with that key reuse the cost. The real step always runs
untouched, so counting changes no number and costs no client second.

* FLOPs (``flops`` config key): ``shape`` (default) adds each step's replayed count, with
  torch's formulas plus the CPU attention kernels (:mod:`fedtune.probe`); ``all`` counts every
  op of the real work instead (slower, through Python dispatch; a test checks both agree);
  ``off`` counts none.
* Seconds: wall-clock time of the party's work.
* Peak memory: what a device doing only this party's work needs: the parameters its steps
  read (the split client: embeddings and its blocks, never the server half), the state it
  keeps (:func:`hold`: optimizer moments), and the largest step's inputs plus the tensors it
  creates and keeps alive at once (activations, gradients). Measured on the same replays in
  every ``flops`` mode; never the simulation process, which holds every party.

Work done on the party's behalf by someone else (the split server's half of a step, which in
the simulation runs inside the client's call) is excluded with :meth:`ComputeMeter.pause`.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from dataclasses import dataclass, field

import torch

from .probe import FlopCounter, Probe, StepCost, replay


def flop_counter() -> FlopCounter:
    """A fresh :class:`~fedtune.probe.FlopCounter`; every count in fedtune goes through it."""
    return FlopCounter()


@dataclass
class ComputeStats:
    flops: int = 0
    seconds: float = 0.0
    peak_memory_bytes: int = 0

    def add(self, other: ComputeStats) -> None:
        self.flops += other.flops
        self.seconds += other.seconds
        self.peak_memory_bytes = max(self.peak_memory_bytes, other.peak_memory_bytes)

    def as_dict(self) -> dict:
        return {
            "flops": self.flops,
            "seconds": self.seconds,
            "peak_memory_bytes": self.peak_memory_bytes,
        }


@dataclass
class Memory:
    """A party's memory, built from its steps' costs: the parameters they read (storage ->
    bytes), the state it keeps between steps (:func:`hold`) and the largest step's transient
    bytes. :meth:`total` is what a device doing only this work needs at its peak."""

    params: dict = field(default_factory=dict)
    held: dict = field(default_factory=dict)
    transient: int = 0

    def add(self, cost: StepCost) -> None:
        self.params.update(cost.params)
        self.transient = max(self.transient, cost.transient)

    def total(self) -> int:
        return sum(self.params.values()) + sum(self.held.values()) + self.transient


_CURRENT: contextvars.ContextVar[ComputeMeter | None] = contextvars.ContextVar(
    "fedtune_meter", default=None
)
FLOP_MODES = ("shape", "all", "off")


class ComputeMeter:
    """Measure one party's work: ``with meter.measure(): ...``; exclude parts with ``pause()``.

    ``mode`` is one of :data:`FLOP_MODES`; ``cache`` (shared by the meters of one run) maps a
    step key to its :class:`~fedtune.probe.StepCost`.
    """

    def __init__(
        self, device: torch.device | str = "cpu", mode: str = "shape", cache: dict | None = None
    ) -> None:
        if mode not in FLOP_MODES:
            raise ValueError(f"flops mode must be one of {FLOP_MODES}, got {mode!r}")
        self.device = torch.device(device)
        self.mode = mode
        self.cache = cache if cache is not None else {}
        self.stats = ComputeStats()
        self.memory = Memory()
        self.parties: dict[int, Memory] = {}  # fused work (batched engine): each party's own
        self._flop_mode: FlopCounter | None = None
        self._t0 = 0.0
        self._active = False

    def _start_segment(self) -> None:
        if self.mode == "all":
            self._flop_mode = flop_counter()
            self._flop_mode.__enter__()
        self._t0 = time.perf_counter()

    def _end_segment(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.seconds += time.perf_counter() - self._t0
        if self._flop_mode is not None:
            self._flop_mode.__exit__(None, None, None)
            self.stats.flops += int(self._flop_mode.get_total_flops())
            self._flop_mode = None

    @contextlib.contextmanager
    def measure(self):
        """Count everything inside the block as this party's work."""
        self._active = True
        token = _CURRENT.set(self)
        self._start_segment()
        try:
            yield self
        finally:
            self._end_segment()
            self._active = False
            _CURRENT.reset(token)
            self.stats.peak_memory_bytes = max(self.stats.peak_memory_bytes, self.memory.total())

    @contextlib.contextmanager
    def pause(self):
        """Exclude the block (e.g. the split server's compute) from FLOPs and seconds."""
        if not self._active:
            yield
            return
        self._end_segment()
        token = _CURRENT.set(None)
        try:
            yield
        finally:
            _CURRENT.reset(token)
            self._start_segment()

    def add_cost(self, cost: StepCost) -> None:
        if self.mode == "shape":
            self.stats.flops += cost.flops
        self.memory.add(cost)

    def _cost(self, key: tuple, fn, grads) -> StepCost:
        cost = self.cache.get(key)
        if cost is None:
            with self.pause():  # measuring is not the party's work
                cost = self.cache[key] = replay(fn, grads)
        return cost

    @contextlib.contextmanager
    def _counted(self):
        with Probe() as probe:
            yield
        self.add_cost(probe.cost())


def counted():
    """Wrap work whose cost depends on more than shapes (greedy decoding stops when the model
    says so): it runs op by op under a :class:`~fedtune.probe.Probe` every time (its counting
    overhead stays in the seconds). A no-op with ``flops=off``."""
    meter = _CURRENT.get()
    if meter is None or meter.mode == "off":
        return contextlib.nullcontext()
    return meter._counted()


def step(key: tuple, fn, replay_fn=None, grads=()):
    """Run ``fn()``, one forward and/or backward whose cost depends only on ``key`` (its kind
    and input shapes), and return its result. The first time the run meets ``key`` the cost is
    measured on a replay of ``replay_fn or fn`` (which must do the same work and leave no
    trace: ``grads`` lists the tensors whose ``.grad`` it may write; they are restored)."""
    meter = _CURRENT.get()
    if meter is not None:
        meter.add_cost(meter._cost(key, replay_fn or fn, grads))
    return fn()


@contextlib.contextmanager
def inline(key: tuple):
    """:func:`step` for work that cannot be replayed (it changes state beyond gradients: the
    split server's half with its optimizer step): the first step of ``key`` is measured op by
    op as it runs (same numbers, but its counting overhead lands in this party's seconds)."""
    meter = _CURRENT.get()
    if meter is None or key in meter.cache:
        if meter is not None:
            meter.add_cost(meter.cache[key])
        yield
        return
    with Probe() as probe:
        yield
    meter.add_cost(meter.cache.setdefault(key, probe.cost()))


def party_step(slot: int, key: tuple, fn, grads=()) -> None:
    """Measure (never run) the step ``fn`` that party ``slot`` of fused work would run on its
    own: the batched engine runs many parties' steps as one, but each party's memory is what
    its own step needs."""
    meter = _CURRENT.get()
    if meter is not None:
        meter.parties.setdefault(slot, Memory()).add(meter._cost(key, fn, grads))


def hold(state, slot: int | None = None) -> None:
    """Count an optimizer's state (``{param: {name: tensor}}``, torch's ``opt.state`` or the
    ``"state"`` of its ``state_dict()``) in the party's memory (``slot``: that party's of
    fused work). Keyed by position, so the next optimizer over the same parameters (KD's b8
    after b1, a reset) replaces it: a party holds one at a time."""
    meter = _CURRENT.get()
    if meter is None:
        return
    memory = meter.memory if slot is None else meter.parties.setdefault(slot, Memory())
    for i, tensors in enumerate(state.values()):
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor):
                memory.held[("optimizer", i, name)] = t.numel() * t.element_size()


@contextlib.contextmanager
def paused(meter: ComputeMeter | None):
    """``meter.pause()`` that tolerates ``None``."""
    if meter is None:
        yield
    else:
        with meter.pause():
            yield
