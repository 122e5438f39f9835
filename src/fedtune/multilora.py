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

import torch
from torch import nn

from .errors import ModelError


class Rows:
    """The per-row client slot index ``[B]`` (int64) shared by all multi-client modules."""

    def __init__(self) -> None:
        self.idx: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if self.idx is None:
            raise ModelError("multi-client network used before set_rows()")
        return self.idx


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
        self.A = nn.Parameter(a.detach().new_zeros((n, *a.shape)))
        self.B = nn.Parameter(b.detach().new_zeros((n, *b.shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        idx = self.rows.get()
        h = self.dropout(x).to(self.A.dtype)
        squeeze = h.dim() == 2  # [B, in] inputs (not used by HF blocks, kept general)
        if squeeze:
            h = h.unsqueeze(1)
        h = torch.bmm(h, self.A[idx].transpose(1, 2))  # [B, L, r]
        h = torch.bmm(h, self.B[idx].transpose(1, 2)) * self.scaling  # [B, L, out]
        if squeeze:
            h = h.squeeze(1)
        return out + h.to(out.dtype)


class MultiHead(nn.Module):
    """Stacked classification head: ``h [B, L, H]`` -> logits ``[B, L, C]`` with ``W[rows[i]]``."""

    def __init__(self, head: nn.Linear, n: int, rows: Rows) -> None:
        super().__init__()
        self.rows = rows
        self.W = nn.Parameter(head.weight.detach().new_zeros((n, *head.weight.shape)))
        self.bias = (
            nn.Parameter(head.bias.detach().new_zeros((n, *head.bias.shape)))
            if head.bias is not None
            else None
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        idx = self.rows.get()
        out = torch.einsum("blh,bch->blc", h.to(self.W.dtype), self.W[idx])
        if self.bias is not None:
            out = out + self.bias[idx].unsqueeze(1)
        return out


class MultiNet:
    """The multi-client network and the map between its stacked tensors and state dicts.

    ``net`` is an HF sequence classifier (call it like one); ``slots[name] = (param, shape)``
    maps every trainable-state name (PEFT naming, model order) to the stacked parameter
    ``[N, *shape]`` that holds it for all clients."""

    def __init__(self, net: nn.Module, slots: dict[str, nn.Parameter], n: int, rows: Rows):
        self.net, self.slots, self.n, self.rows = net, slots, n, rows

    def params(self) -> list[nn.Parameter]:
        """The stacked trainable parameters ``[N, ...]``, in state-name order."""
        return list(self.slots.values())

    def set_rows(self, rows: torch.Tensor) -> None:
        """Client slot of each batch row: ``[B]`` int64 on the network's device."""
        self.rows.idx = rows

    @torch.no_grad()
    def load(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        """Copy a client's trainable state into slot ``slot``; names and shapes must match."""
        if set(state) != set(self.slots):
            extra = sorted(set(state) ^ set(self.slots))[:3]
            raise ModelError(f"state does not match the model's trainable tensors: {extra}")
        for name, p in self.slots.items():
            if tuple(state[name].shape) != tuple(p.shape[1:]):
                raise ModelError(f"state tensor {name!r} has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(p.shape[1:])}")  # fmt: skip
            p[slot].copy_(state[name])

    @torch.no_grad()
    def state(self, slot: int) -> dict[str, torch.Tensor]:
        """Detached copy of slot ``slot`` as a trainable-state dict (same names/order as
        :func:`fedtune.models.trainable_state`)."""
        return {name: p[slot].detach().clone() for name, p in self.slots.items()}


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
    found: dict[str, nn.Parameter] = {}
    for path, mod in list(net.named_modules()):
        if isinstance(mod, LoraLayer):
            adapter = mod.active_adapters[0]
            multi = MultiLoraLinear(mod.base_layer, mod, n, rows)
            found[f"{prefix}{path}.lora_A.{adapter}.weight"] = multi.A
            found[f"{prefix}{path}.lora_B.{adapter}.weight"] = multi.B
        elif isinstance(mod, ModulesToSaveWrapper):
            adapter = mod.active_adapters[0]
            inner = mod.modules_to_save[adapter]
            if not inner.weight.requires_grad:
                continue  # model.train_head = false: the (frozen) head is shared by all rows
            if not isinstance(inner, nn.Linear):
                raise ModelError(f"multi-client engine supports a Linear head, got {type(inner)}")
            multi = MultiHead(inner, n, rows)
            found[f"{prefix}{path}.modules_to_save.{adapter}.weight"] = multi.W
            if multi.bias is not None:
                found[f"{prefix}{path}.modules_to_save.{adapter}.bias"] = multi.bias
        else:
            continue
        parent, _, child = path.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, multi)
    names = [nm for nm, p in peft_model.named_parameters() if p.requires_grad]
    if set(names) != set(found):
        missing = sorted(set(names) ^ set(found))[:3]
        raise ModelError(f"multi-client engine cannot map trainable tensors {missing}")
    return MultiNet(net, {nm: found[nm] for nm in names}, n, rows)
