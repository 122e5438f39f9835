"""Client compute accounting: FLOPs, wall seconds and peak memory of a client's own work.

FLOPs are counted for *every* step (forward and backward) with ``torch.utils.flop_counter``,
not estimated from one step. Seconds are wall-clock time of the client's work. Peak memory is
``torch.cuda.max_memory_allocated`` on GPU; on CPU it is the process's peak resident set size
sampled every 2 ms while the client works (it includes the shared backbone, as a real client
machine would hold it).

Work done on the client's behalf by someone else (the split server's half of a step, which in
the simulation runs inside the client's call) is excluded with :meth:`ComputeMeter.pause`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode


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
        return {"flops": self.flops, "seconds": self.seconds, "peak_memory_bytes": self.peak_memory_bytes}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # non-Linux: fall back to ru_maxrss (process lifetime peak)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _RssSampler:
    def __init__(self, interval: float = 0.002) -> None:
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


class ComputeMeter:
    """Measure one client's work: ``with meter.measure(): ...``; exclude parts with ``pause()``.

    ``count_flops=False`` skips the FLOP counter (its per-op Python dispatch costs a few %).
    """

    def __init__(self, device: torch.device | str = "cpu", count_flops: bool = True) -> None:
        self.device = torch.device(device)
        self.count_flops = count_flops
        self.stats = ComputeStats()
        self._flop_mode: FlopCounterMode | None = None
        self._t0 = 0.0
        self._active = False

    def _start_segment(self) -> None:
        if self.count_flops:
            self._flop_mode = FlopCounterMode(display=False)
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
        with sampler:
            self._start_segment()
            try:
                yield self
            finally:
                self._end_segment()
                self._active = False
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
        try:
            yield
        finally:
            self._start_segment()


@contextlib.contextmanager
def paused(meter: ComputeMeter | None):
    """``meter.pause()`` that tolerates ``None``."""
    if meter is None:
        yield
    else:
        with meter.pause():
            yield
