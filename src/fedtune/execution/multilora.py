"""Multi-LoRA batching: one forward/backward through the shared frozen backbone for N clients.

:func:`build` turns the process's PEFT model into a *multi-client network*: a copy of the HF
module tree that shares every frozen backbone tensor with the PEFT model (no weight is
duplicated) and in which

* every LoRA-wrapped Linear becomes :class:`MultiLoraLinear`: the frozen base layer plus
  stacked adapters ``A [N, r, in]``, ``B [N, out, r]``;
* the trainable classification head becomes :class:`MultiHead`: stacked ``W [N, C, H]``.

Row ``i`` of a batch uses the adapters of client slot ``rows[i]`` (set with
:meth:`MultiNet.set_rows`), so the logits of row ``i`` equal what the PEFT model computes for
that row with that client's trainable state loaded. Slot ``n`` converts to and from fedtune's
trainable-state dict (PEFT names, see :func:`fedtune.models.trainable_state`), so messages,
averaging and saved adapters are unchanged.
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
from torch import nn

from ..errors import ModelError


class Rows:
    """Which client slot each batch row uses, shared by all multi-client modules.

    ``idx [B]`` (int64) is the slot of each row. When the batch is ``n`` equal, contiguous
    groups of ``per`` rows (the usual fused step), ``slots [n]`` is set too and layers gather
    ``n`` adapters instead of ``B`` (far less memory traffic)."""

    def __init__(self) -> None:
        self.idx: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None
        self.per = 0

    def get(self) -> torch.Tensor:
        if self.idx is None:
            raise ModelError("multi-client network used before set_rows()")
        return self.idx


def _rowwise(x: torch.Tensor, w: torch.Tensor, rows: Rows) -> torch.Tensor:
    """``x [B, L, i] @ w[slot(row)].T`` for stacked ``w [N, o, i]`` -> ``[B, L, o]``."""
    if rows.slots is not None:  # n equal groups: one bmm over [n, per * L, i]
        n, (b, length, i) = len(rows.slots), x.shape
        y = torch.bmm(x.reshape(n, rows.per * length, i), w[rows.slots].transpose(1, 2))
        return y.reshape(b, length, -1)
    return torch.bmm(x, w[rows.get()].transpose(1, 2))


class MultiLoraLinear(nn.Module):
    """``base(x) + scaling * dropout(x) @ A[n].T @ B[n].T`` with ``n = rows[i]`` per row.

    ``x [B, L, in]`` -> ``[B, L, out]``. ``base`` is the shared frozen layer (nn.Linear or
    GPT-2's Conv1D); the LoRA path runs in the adapters' dtype (float32 master weights when the
    backbone is bf16) and is cast back to the base output's dtype."""

    def __init__(self, base: nn.Module, lora_layer, n: int, rows: Rows) -> None:
        super().__init__()
        name = lora_layer.active_adapters[0]
        a, b = lora_layer.lora_A[name].weight, lora_layer.lora_B[name].weight  # [r, in], [out, r]
        self.base, self.rows = base, rows
        self.dropout = lora_layer.lora_dropout[name]
        self.scaling = float(lora_layer.scaling[name])
        # placeholders: build() replaces them with views of the network's flat [N, P] storage
        self.A = nn.Parameter(torch.empty((n, *a.shape), device="meta"))
        self.B = nn.Parameter(torch.empty((n, *b.shape), device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = self.dropout(x).to(self.A.dtype)
        squeeze = h.dim() == 2  # [B, in] inputs (not used by HF blocks, kept general)
        if squeeze:
            h = h.unsqueeze(1)
        h = _rowwise(_rowwise(h, self.A, self.rows), self.B, self.rows) * self.scaling
        if squeeze:
            h = h.squeeze(1)
        return out + h.to(out.dtype)


class MultiHead(nn.Module):
    """Stacked classification head: ``h [B, L, H]`` -> logits ``[B, L, C]`` with ``W[rows[i]]``."""

    def __init__(self, head: nn.Linear, n: int, rows: Rows) -> None:
        super().__init__()
        self.rows = rows
        self.W = nn.Parameter(torch.empty((n, *head.weight.shape), device="meta"))
        self.bias = (
            nn.Parameter(torch.empty((n, *head.bias.shape), device="meta"))
            if head.bias is not None
            else None
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = _rowwise(h.to(self.W.dtype), self.W, self.rows)
        if self.bias is not None:
            out = out + self.bias[self.rows.get()].unsqueeze(1)
        return out


class MultiNet:
    """The multi-client network and the map between its stacked tensors and state dicts.

    ``net`` is an HF sequence classifier (call it like one). All trainable tensors of all
    clients live in ONE buffer ``flat [N, P]`` (float32 master weights): row ``n`` is client
    slot ``n``'s whole trainable state, so an optimizer step is a handful of kernels over
    ``[N, P]`` whatever the number of LoRA layers. ``slots[name]`` is the stacked parameter
    ``[N, *shape]`` (a strided view of ``flat``) that a layer uses for state tensor ``name``;
    ``layout[name] = (offset, shape, dtype)`` locates it in a row of ``flat``."""

    def __init__(self, net, flat, slots, layout, rows: Rows) -> None:
        self.net, self.flat, self.slots, self.layout, self.rows = net, flat, slots, layout, rows
        self.n = flat.shape[0]

    def params(self) -> list[nn.Parameter]:
        """The stacked trainable parameters ``[N, ...]``, in state-name order."""
        return list(self.slots.values())

    def set_rows(self, rows: torch.Tensor | None, slots: torch.Tensor | None = None) -> None:
        """Client slot of each batch row: ``rows [B]`` int64 on the network's device; ``slots
        [n]`` when the batch is ``n`` equal contiguous groups (one per slot, in order)."""
        self.rows.idx, self.rows.slots = rows, slots
        self.rows.per = len(rows) // len(slots) if slots is not None else 0

    def flat_grad(self) -> torch.Tensor:
        """The gradients of all stacked parameters as one ``[N, P]`` tensor (zeros if none)."""
        return torch.cat(
            [
                p.grad.reshape(self.n, -1)
                if p.grad is not None
                else p.new_zeros((self.n, p[0].numel()))
                for p in self.params()
            ],
            1,
        )

    def view(self, buf: torch.Tensor, slot: int, name: str) -> torch.Tensor:
        """State tensor ``name`` of ``slot`` inside a ``[N, P]`` buffer (a view)."""
        off, shape, _ = self.layout[name]
        return buf[slot, off : off + math.prod(shape)].view(shape)

    @torch.no_grad()
    def load(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        """Copy a client's trainable state into slot ``slot``; names and shapes must match."""
        if set(state) != set(self.layout):
            extra = sorted(set(state) ^ set(self.layout))[:3]
            raise ModelError(f"state does not match the model's trainable tensors: {extra}")
        for name, (_, shape, _) in self.layout.items():
            if tuple(state[name].shape) != shape:
                raise ModelError(
                    f"state tensor {name!r} has shape {tuple(state[name].shape)}, expected {shape}"
                )
            self.view(self.flat, slot, name).copy_(state[name])

    @torch.no_grad()
    def state(self, slot: int) -> dict[str, torch.Tensor]:
        """Slot ``slot`` as a trainable-state dict: the names, order and dtypes of
        :func:`fedtune.models.trainable_state`."""
        return {
            name: self.view(self.flat, slot, name).to(dtype, copy=True)
            for name, (_, _, dtype) in self.layout.items()
        }


def build(peft_model: nn.Module, n: int) -> MultiNet:
    """A multi-client network with ``n`` slots over ``peft_model``'s frozen backbone.

    The HF module tree is copied with every existing tensor shared (``deepcopy`` memo), then
    LoRA layers and the trainable head are swapped for their stacked versions. Slots start at
    zero: load states with :meth:`MultiNet.load`."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    base = peft_model.get_base_model()
    prefix = next(name for name, mod in peft_model.named_modules() if mod is base)
    prefix = f"{prefix}." if prefix else ""
    memo = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    # Module objects are copied, tensors shared (the backbone is already frozen; never change
    # requires_grad here: the PEFT model's own LoRA tensors are shared too, and replaced below).
    net = copy.deepcopy(base, memo)
    rows = Rows()
    owners: dict[str, tuple[nn.Module, str]] = {}  # state name -> (module, attribute)
    for path, mod in list(net.named_modules()):
        if isinstance(mod, LoraLayer):
            adapter = mod.active_adapters[0]
            multi = MultiLoraLinear(mod.base_layer, mod, n, rows)
            owners[f"{prefix}{path}.lora_A.{adapter}.weight"] = (multi, "A")
            owners[f"{prefix}{path}.lora_B.{adapter}.weight"] = (multi, "B")
        elif isinstance(mod, ModulesToSaveWrapper):
            adapter = mod.active_adapters[0]
            inner = mod.modules_to_save[adapter]
            if not inner.weight.requires_grad:
                continue  # model.train_head = false: the (frozen) head is shared by all rows
            if not isinstance(inner, nn.Linear):
                raise ModelError(f"multi-client engine supports a Linear head, got {type(inner)}")
            multi = MultiHead(inner, n, rows)
            owners[f"{prefix}{path}.modules_to_save.{adapter}.weight"] = (multi, "W")
            if multi.bias is not None:
                owners[f"{prefix}{path}.modules_to_save.{adapter}.bias"] = (multi, "bias")
        else:
            continue
        parent, _, child = path.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, multi)
    params = {nm: p for nm, p in peft_model.named_parameters() if p.requires_grad}
    if set(params) != set(owners):
        missing = sorted(set(params) ^ set(owners))[:3]
        raise ModelError(f"multi-client engine cannot map trainable tensors {missing}")
    layout, off = {}, 0
    for name, p in params.items():
        layout[name] = (off, tuple(p.shape), p.dtype)
        off += p.numel()
    device = next(iter(params.values())).device
    flat = torch.zeros((n, off), dtype=torch.float32, device=device)
    slots = {}
    for name, (o, shape, _) in layout.items():
        strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
        view = flat.as_strided((n, *shape), (off, *strides), o)  # shares flat's storage
        module, attr = owners[name]
        slots[name] = nn.Parameter(view)
        setattr(module, attr, slots[name])
    return MultiNet(net, flat, slots, layout, rows)
