"""Cutting the shared LoRA classifier into a client part and a server part (Split-FedLLM).

The cut reuses the HF model's own forward instead of re-implementing it. For a split layer
``k`` of a model with ``n`` transformer blocks:

* client part: the body (``GPT2Model`` / ``LlamaModel``) runs with its block list temporarily
  sliced to ``blocks[:k]`` and its final norm replaced by ``nn.Identity``. The model itself
  embeds the tokens (GPT-2 adds its position embeddings here), builds the causal + padding
  mask and the rotary tables, and returns the hidden states after block ``k - 1``:
  ``h [B, L, H]``.
* server part: the body runs with ``blocks[k:]`` and its final norm. It is called with
  ``inputs_embeds=h`` and the received attention mask, so it rebuilds the same causal +
  padding mask and the same position ids (``arange(L)``) and rotary tables from the mask and
  length; a forward pre-hook on block ``k`` replaces that block's input with ``h`` itself (for
  GPT-2 the body would otherwise add position embeddings a second time).
* pooling and head: the task's (:mod:`fedtune.tasks`); for classification, like HF's sequence
  classifiers, each row is read at its last non-pad position, derived from the attention mask
  (the server never sees the token ids).

:func:`compress` / :func:`decompress` encode what crosses the cut (activations and their
gradients) with :mod:`fedtune.codec`: fp32, fp16, bf16, int8 with one scale per token, or
per-token top-k.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ... import codec
from ...errors import MessageError, ModelError
from ...models import Parts, autocast, parts

COMPRESSIONS = ("none", "fp16", "bf16", "int8", "topk")


def block_of(model: nn.Module) -> dict[str, int | None]:
    """Trainable parameter name -> index of the block holding it (``None`` for the head)."""
    p = parts(model)
    where = {id(q): i for i, blk in enumerate(p.blocks) for q in blk.parameters()}
    head = {id(q) for q in p.head.parameters()}
    out: dict[str, int | None] = {}
    for name, q in model.named_parameters():
        if not q.requires_grad:
            continue
        if id(q) not in where and id(q) not in head:
            raise ModelError(
                f"split learning needs every trainable tensor inside a transformer "
                f"block or the head; {name!r} is neither"
            )
        out[name] = where.get(id(q))
    return out


def part_names(model: nn.Module, k: int, side: str, u_shaped: bool = False) -> list[str]:
    """Trainable names owned by ``side`` ('client' or 'server') at split layer ``k``.

    The client owns the LoRA of blocks ``< k``, the server those of blocks ``>= k``; the head
    goes to the server, or to the client in the U-shaped variant."""
    owner = {}
    for name, b in block_of(model).items():
        if b is None:
            owner[name] = "client" if u_shaped else "server"
        else:
            owner[name] = "client" if b < k else "server"
    return [n for n, s in owner.items() if s == side]


@contextlib.contextmanager
def _only_blocks(p: Parts, start: int, stop: int, final_norm: bool, first_input=None):
    """Run ``p.body`` on ``blocks[start:stop]`` only; optionally feed block ``start`` with
    ``first_input`` instead of what the body computed from ``inputs_embeds``."""
    full, norm = p.blocks, getattr(p.body, p.norm_attr)
    setattr(p.body, p.blocks_attr, full[start:stop])
    if not final_norm:
        setattr(p.body, p.norm_attr, nn.Identity())
    hook = None
    if first_input is not None:

        def replace_input(module, args, kwargs):
            if args:
                return (first_input, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": first_input}

        hook = full[start].register_forward_pre_hook(replace_input, with_kwargs=True)
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()
        setattr(p.body, p.blocks_attr, full)
        setattr(p.body, p.norm_attr, norm)


class Freed(nn.Module):
    """A block this process freed: the split server runs it."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, *args, **kwargs):
        raise ModelError(f"block {self.index} is not held here: the split server runs it")


def keep_client_half(model: nn.Module, k: int) -> None:
    """Free blocks ``[k, n)`` of a model that is the client's alone (a deployed node): a split
    client runs the embeddings and its first ``k`` blocks (and, U-shaped, the head), so its
    process holds only those. A later, deeper cut is refused."""
    p = parts(model)
    kept = [i for i, b in enumerate(p.blocks) if not isinstance(b, Freed)]
    if k > len(kept):
        raise MessageError(f"split layer {k}: this client holds blocks 0-{len(kept) - 1} only")
    if len(kept) == k:
        return
    from ...models import release

    release(model)
    for i in range(k, len(p.blocks)):
        p.blocks[i] = Freed(i)


def client_forward(
    model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, k: int, amp: str = "off"
) -> torch.Tensor:
    """c1: embeddings and blocks ``[0, k)``. ``input_ids, mask [B, L]`` -> ``h [B, L, H]``."""
    p = parts(model)
    with _only_blocks(p, 0, k, final_norm=False), autocast(input_ids.device, amp):
        return p.body(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state


def server_forward(
    model: nn.Module, h: torch.Tensor, mask: torch.Tensor, k: int, amp: str = "off"
) -> torch.Tensor:
    """c3: blocks ``[k, n)`` and the final norm: ``h [B, L, H]`` -> last hidden states
    ``[B, L, H]`` (the task pools them for its head)."""
    p = parts(model)
    with _only_blocks(p, k, len(p.blocks), final_norm=True, first_input=h), autocast(h.device, amp):
        return p.body(inputs_embeds=h, attention_mask=mask, use_cache=False).last_hidden_state


# ----------------------------------------------------------------------------- compression

# split.compression -> fedtune.codec.encode dtype. top-k keeps float32 values.
_DTYPES = {"none": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8"}


def compress(x: torch.Tensor, mode: str, topk_ratio: float = 0.1) -> dict[str, torch.Tensor]:
    """Encode ``x [..., H]`` for the wire with :func:`fedtune.codec.encode` (names ``values``,
    ``indices``, ``scale``); no metadata: the receiver knows the mode and ``H``.

    none: float32; fp16/bf16: a cast; int8: symmetric, one float32 scale per row
    (``absmax / 127``), ~4x smaller than fp32 (activations are not shift-invariant, so no
    centring); topk: per row the ``ceil(ratio * H)`` largest-magnitude values (float32) and
    their indices (uint8 up to H = 256, then int16)."""
    if mode == "topk":
        k = max(1, math.ceil(topk_ratio * x.shape[-1]))
        return codec.encode(x, "float32", k, select="magnitude")
    if mode not in _DTYPES:
        raise ValueError(f"unknown compression {mode!r}; one of {COMPRESSIONS}")
    return codec.encode(x, _DTYPES[mode])


def decompress(tensors: dict[str, torch.Tensor], mode: str, hidden: int) -> torch.Tensor:
    """Inverse of :func:`compress`: float32 ``[..., hidden]``, top-k gaps filled with 0.

    ``mode`` and ``hidden`` are the receiver's own (``split.compression``, its model's hidden
    size); tensors in another encoding than ``mode`` are a MessageError, like any malformed
    ones (:func:`fedtune.codec.decode`). Other tensors (the attention mask) are ignored."""
    if mode not in COMPRESSIONS:
        raise ValueError(f"unknown compression {mode!r}; one of {COMPRESSIONS}")
    values, topk = tensors.get("values"), "indices" in tensors
    want = codec.DTYPES[_DTYPES.get(mode, "float32")]
    if values is not None and (values.dtype != want or topk != (mode == "topk")):
        raise MessageError(
            f"values {values.dtype} {'with' if topk else 'without'} indices are not "
            f"split.compression={mode}"
        )
    return codec.decode(tensors, hidden, fill=0.0)
