"""Client compute accounting: FLOPs, wall seconds and peak memory of a client's own work.

FLOPs are measured with torch's FLOP formulas (forward and backward; :class:`FlopCounter`),
never estimated from parameter counts. Two exact modes (``flops`` config key):

* ``all``: every op of the client's work runs under :class:`FlopCounter` (costs ~10-30% speed
  on CPU through Python dispatch);
* ``shape`` (default): training/inference code wraps each step in :func:`step` with a key
  holding the step's kind and input shape. The first step of each key is counted under
  :class:`FlopCounter`; later steps with the same key reuse that count. A step's FLOPs depend
  only on its shapes, so the total equals ``all`` (a test checks this) at almost no cost.
  Counting runs every op as it runs uncounted, so ``shape``, ``all`` and ``off`` compute the
  same numbers (a test checks the gradients).

Seconds are wall-clock time of the client's work. Peak memory is
``torch.cuda.max_memory_allocated`` on GPU; on CPU it is the process's peak resident set size
sampled every 5 ms while the client works (it includes the shared backbone, as a real client
machine would hold it).

Work done on the client's behalf by someone else (the split server's half of a step, which in
the simulation runs inside the client's call) is excluded with :meth:`ComputeMeter.pause`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import (
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
    shape_wrapper,
)


def _sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """``q [B, h, T, d]`` against ``k, v [B, h_kv, S, d]``: QK^T and AV, ``4 B h T S d``."""
    return sdpa_flop_count(query, key, value)


def _sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's flop counter has formulas for the CUDA attention kernels but not for the fused CPU
# one, which CPU SDPA takes whenever attention dropout is off (eval, Llama-style models):
# without these every such attention counted 0 FLOPs on CPU and 4·B·T²·H on GPU.
ATTENTION_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
}
FORMULAS = {**flop_registry, **{op: shape_wrapper(f) for op, f in ATTENTION_FORMULAS.items()}}


class FlopCounter(TorchDispatchMode):
    """Counts the FLOPs of every op with a formula (torch's, for matmuls, convolutions and
    attention, plus :data:`ATTENTION_FORMULAS`) and runs every op exactly as it runs
    uncounted. torch's ``FlopCounterMode`` instead decomposes every op it has no formula for, so
    ``silu_backward`` (Llama, SmolLM2) ran as other elementwise ops and the counted step's
    gradients differed in the last bits from the uncounted one's: counting changed training.
    ``counts``: FLOPs per op."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = FORMULAS.get(func._overloadpacket)
        if formula is None and torch.is_inference_mode_enabled():
            # Under inference mode composite ops (linear, matmul, attention) arrive whole:
            # run their own decomposition, which is what eager runs, so their matmuls count.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if formula is not None:
            n = int(formula(*args, **kwargs, out_val=out))
            self.counts[func._overloadpacket] = self.counts.get(func._overloadpacket, 0) + n
        return out

    def get_total_flops(self) -> int:
        return sum(self.counts.values())


def flop_counter() -> FlopCounter:
    """A fresh :class:`FlopCounter`; every count in fedtune goes through it."""
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


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # non-Linux: fall back to ru_maxrss (process lifetime peak)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _RssSampler:
    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _RssSampler:
        self.peak = _rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


_CURRENT: contextvars.ContextVar[ComputeMeter | None] = contextvars.ContextVar(
    "fedtune_meter", default=None
)
FLOP_MODES = ("shape", "all", "off")


class ComputeMeter:
    """Measure one party's work: ``with meter.measure(): ...``; exclude parts with ``pause()``.

    ``mode`` is one of :data:`FLOP_MODES`; ``cache`` (shared by the meters of one run) maps a
    step key to its FLOPs in ``shape`` mode.
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
        """Count everything inside the block as this client's work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            sampler = contextlib.nullcontext()
        else:
            sampler = _RssSampler()
        self._active = True
        token = _CURRENT.set(self)
        with sampler:
            self._start_segment()
            try:
                yield self
            finally:
                self._end_segment()
                self._active = False
                _CURRENT.reset(token)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = sampler.peak
        self.stats.peak_memory_bytes = max(self.stats.peak_memory_bytes, peak)

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

    @contextlib.contextmanager
    def _counted(self):
        with flop_counter() as counter:
            yield
        self.stats.flops += int(counter.get_total_flops())

    @contextlib.contextmanager
    def _step(self, key: tuple):
        if key in self.cache:
            self.stats.flops += self.cache[key]
            yield
            return
        with flop_counter() as counter:
            yield
        self.cache[key] = int(counter.get_total_flops())
        self.stats.flops += self.cache[key]


def counted():
    """Wrap work whose FLOPs depend on more than shapes (greedy decoding stops when the model
    says so): in ``shape`` mode it is counted every time, op by op. A no-op otherwise."""
    meter = _CURRENT.get()
    if meter is None or meter.mode != "shape":
        return contextlib.nullcontext()
    return meter._counted()


def step(key: tuple):
    """Wrap one forward(+backward) whose FLOPs depend only on ``key`` (kind + shapes).

    A no-op unless the active meter counts in ``shape`` mode."""
    meter = _CURRENT.get()
    if meter is None or meter.mode != "shape":
        return contextlib.nullcontext()
    return meter._step(key)


@contextlib.contextmanager
def paused(meter: ComputeMeter | None):
    """``meter.pause()`` that tolerates ``None``."""
    if meter is None:
        yield
    else:
        with meter.pause():
            yield
