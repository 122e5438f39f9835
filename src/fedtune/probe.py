"""What one step of a party's work costs, measured op by op: FLOPs and memory.

:class:`FlopCounter` counts FLOPs with torch's formulas; :class:`Probe` adds the step's memory:
the bytes of every tensor storage the step reads that it did not create (split into the
party's parameters, which it holds for the whole run, and other inputs: the batch, saved
activations of an earlier step) plus the peak of the storages it creates and keeps alive
(activations saved for backward, gradients). That is what a device running only this party's
ops must hold: the split client's probe sees its blocks' weights and never the server half's.

:func:`replay` runs a step's function once more under a probe, its random state forked and
the gradients it writes restored, so the real step runs untouched and uncounted: counting costs
no client seconds and changes no number.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

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
        out = self._run(func, args, kwargs)
        if formula is not None:
            n = int(formula(*args, **kwargs, out_val=out))
            self.counts[func._overloadpacket] = self.counts.get(func._overloadpacket, 0) + n
        return out

    def _run(self, func, args, kwargs):
        return func(*args, **kwargs)

    def get_total_flops(self) -> int:
        return sum(self.counts.values())


@dataclass
class StepCost:
    """One step's measured cost. ``params``: storage key -> bytes of the parameters it read
    (held by the party all along); ``transient``: peak bytes of its other inputs plus the
    storages it created that were alive at once."""

    flops: int = 0
    params: dict = field(default_factory=dict)
    transient: int = 0


def _tensors(values):
    """The tensors among an op's arguments or results (aten ops nest them one list deep)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, tuple | list):
            yield from (x for x in v if isinstance(x, torch.Tensor))


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested: no plain storage
        return None


class Probe(FlopCounter):
    """:class:`FlopCounter` plus the memory of the work it watches (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.params: dict = {}  # storage key -> bytes
        self.inputs = 0  # bytes of non-parameter storages read that the step did not create
        self.live = 0  # bytes of storages the step created that are still alive
        self.peak = 0  # max of inputs + live
        self._known: dict[int, object] = {}  # id(storage) -> weakref: seen or created

    def _known_alive(self, st) -> bool:
        ref = self._known.get(id(st))
        return ref is not None and ref() is st

    def _remember(self, st, created_bytes: int = 0) -> None:
        self._known[id(st)] = weakref.ref(st)
        if created_bytes:
            self.live += created_bytes
            weakref.finalize(st, self._freed, created_bytes)

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def _read(self, t: torch.Tensor) -> None:
        st = _storage(t)
        if st is None or self._known_alive(st):
            return
        self._remember(st)
        if isinstance(t, torch.nn.Parameter):
            self.params[_param_key(st)] = st.nbytes()
        else:
            self.inputs += st.nbytes()

    def _run(self, func, args, kwargs):
        for t in _tensors(args):
            self._read(t)
        for t in _tensors(kwargs.values()):
            self._read(t)
        out = func(*args, **kwargs)
        for t in _tensors(out if isinstance(out, tuple | list) else (out,)):
            st = _storage(t)
            if st is not None and not self._known_alive(st):
                self._remember(st, st.nbytes())
        self.peak = max(self.peak, self.inputs + self.live)
        return out

    def cost(self) -> StepCost:
        return StepCost(self.get_total_flops(), dict(self.params), self.peak)


def _param_key(st) -> tuple:
    """A parameter's storage, the same in every step that reads it (data pointers outlive the
    Python storage objects, which are made afresh)."""
    try:
        return (st.device.type, st.data_ptr())
    except RuntimeError:  # a storage without data (meta): only this object names it
        return ("object", id(st))


def replay(fn, grads=()) -> StepCost:
    """The cost of ``fn()`` measured on a run of it that leaves no trace: under a
    :class:`Probe`, the random state forked (the real step draws the same dropout masks) and
    ``grads``, the tensors whose ``.grad`` the step may write, restored afterwards. ``fn`` must
    change nothing else (no optimizer step). A replay on fake tensors (shapes only) measures
    the same FLOPs and memory but takes longer on CPU, where fake-tensor dispatch costs more
    than a small model's arithmetic."""
    grads = list(grads)
    saved = [p.grad for p in grads]
    try:
        with torch.random.fork_rng(devices=_cuda_devices(grads)), Probe() as probe:
            fn()
        return probe.cost()
    finally:
        for p, g in zip(grads, saved, strict=True):
            p.grad = g


def _cuda_devices(tensors) -> list[int]:
    devices = {t.device.index or 0 for t in tensors if t.device.type == "cuda"}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices.add(torch.cuda.current_device())
    return sorted(devices)
