"""One codec for the compressed tensors the frameworks put on the wire.

KD-FedLLM sends logits ``[S, C]`` and Split-FedLLM sends cut-layer activations and their
gradients ``[..., H]``; both compress along the last dimension ``D``, row by row, with the same
three tools combined in this order:

1. **top-k** (``topk > 0``): keep k entries per row, either the k largest values
   (``select='largest'``: logits, where the tail carries little knowledge) or the k largest
   magnitudes (``select='magnitude'``: activations and gradients, where a large negative value
   matters as much as a large positive one). Their positions go in ``indices``.
2. **cast**: ``float32``, ``float16`` or ``bfloat16`` values as they are, or
3. **int8**: one float32 ``scale`` per row and values rounded to ``[-127, 127]`` steps of it:
   symmetric (``scale = absmax / 127``) or, with ``center=True``, after subtracting the row's
   mid-range ``(hi + lo) / 2`` (``scale = (hi - lo) / 254``). The mid-range is *not* sent, so
   centring is only for data whose meaning ignores a per-row constant (logits: softmax is
   shift-invariant); it buys up to one extra bit of precision on rows that are not centred at 0.

Tensors on the wire (``R = x.shape[:-1]``, the rows; ``k = topk or D``):

* ``values [*R, k]``: float32 / float16 / bfloat16 / int8;
* ``indices [*R, k]``: top-k only; the smallest integer dtype that holds ``D - 1``
  (:func:`index_dtype`);
* ``scale [*R]``: int8 only, float32.

:func:`decode` needs only the tensors and ``D`` (the receiver knows it: its number of classes or
its model's hidden size), so no metadata travels with them. It checks what it receives, since
the tensors come from another party over the network (a NaN or infinite value would poison
whatever trains on it), and raises
:class:`~fedtune.errors.MessageError` with a one-line reason.
"""

from __future__ import annotations

import torch

from .errors import MessageError

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
}
SELECTS = ("largest", "magnitude")
NAMES = ("values", "indices", "scale")  # every tensor name the codec writes


def index_dtype(dim: int) -> torch.dtype:
    """Smallest integer dtype that holds an index in ``[0, dim)``: uint8 up to 256 (Banking77's
    77 classes), int16 up to 32767 (hidden sizes), else int32."""
    if dim <= 256:
        return torch.uint8
    return torch.int16 if dim <= 32767 else torch.int32


def encode(
    x: torch.Tensor,
    dtype: str = "float32",
    topk: int = 0,
    select: str = "largest",
    center: bool = False,
) -> dict[str, torch.Tensor]:
    """Compress ``x [..., D]`` row by row into the named tensors that go on the wire.

    Args:
        x: any float tensor ``[..., D]`` (at least 1-D); it is detached and read as float32.
        dtype: ``float32``, ``float16``, ``bfloat16`` or ``int8`` for ``values``.
        topk: keep only k entries per row (``1 <= k <= D``); 0 keeps the whole row.
        select: top-k by value (``largest``) or by absolute value (``magnitude``).
        center: int8 only: drop the per-row mid-range before quantising (shift-invariant data
            only, e.g. logits); without it int8 is symmetric around 0.

    Returns:
        ``values [..., k]``; with top-k ``indices [..., k]`` (:func:`index_dtype` of ``D``);
        with int8 ``scale [...]`` (float32). Per value the int8 error is at most ``scale / 2``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; one of {tuple(DTYPES)}")
    if select not in SELECTS:
        raise ValueError(f"unknown top-k selection {select!r}; one of {SELECTS}")
    if x.dim() < 1 or not 0 <= topk <= x.shape[-1]:
        raise ValueError(f"top-k {topk} needs 0 <= k <= D for a tensor of shape {list(x.shape)}")
    values, idx = x.detach().float(), None
    if topk:
        if select == "largest":
            values, idx = values.topk(topk, dim=-1)  # [..., k], sorted descending
        else:
            idx = values.abs().topk(topk, dim=-1).indices
            values = values.gather(-1, idx)
    return encode_sparse(values, idx, x.shape[-1], dtype, center)


def encode_sparse(
    values: torch.Tensor,
    indices: torch.Tensor | None,
    dim: int,
    dtype: str = "float32",
    center: bool = False,
) -> dict[str, torch.Tensor]:
    """:func:`encode` of entries already selected: ``values [..., k]`` at ``indices [..., k]``
    of rows of ``dim`` entries (``indices`` None: the whole rows, k = dim). For when the
    dense rows would not fit in memory (per-token logits over a 49k vocabulary)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; one of {tuple(DTYPES)}")
    values, out = values.detach().float(), {}
    if indices is not None:
        out["indices"] = indices.to(index_dtype(dim))
    if dtype == "int8":
        if center:  # 2 * 127 steps span [lo, hi]; the floor keeps a constant row finite
            hi, lo = values.amax(-1, keepdim=True), values.amin(-1, keepdim=True)
            scale = ((hi - lo) / 254).clamp(min=1e-8)  # [..., 1]
            values = values - (hi + lo) / 2
        else:  # 127 steps span [0, absmax]; the floor keeps an all-zero row finite
            scale = values.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
        # The clamp only guards the int8 cast against rounding at the row's extremes.
        out["values"] = torch.round(values / scale).clamp(-127, 127).to(torch.int8)
        out["scale"] = scale.squeeze(-1)
    else:
        out["values"] = values.to(DTYPES[dtype])
    return out


def check_names(tensors: dict[str, torch.Tensor], extra: tuple[str, ...] = ()) -> None:
    """A message holds only codec tensors (and the ``extra`` names its receiver expects):
    anything else is a :class:`~fedtune.errors.MessageError`, not silently ignored."""
    unknown = sorted(set(tensors) - set(NAMES) - set(extra))
    if unknown:
        raise MessageError(f"unexpected tensors {[n[:40] for n in unknown[:3]]}")


def decode(tensors: dict[str, torch.Tensor], dim: int, fill: float = 0.0) -> torch.Tensor:
    """Inverse of :func:`encode`: float32 ``[..., dim]``.

    ``dim`` is the receiver's own ``D`` (never read from the message). With top-k the entries
    that were not sent are ``fill``: ``-inf`` for logits (softmax gives them exactly 0 and
    renormalises the kept mass), 0 for activations and gradients. A centred int8 row comes back
    up to its dropped mid-range. Tensors other than :data:`NAMES` are ignored (a message may
    carry more, e.g. an attention mask).

    Raises:
        MessageError: missing ``values``, an unexpected dtype, NaN or infinite values or
            scales, shapes of ``values`` / ``indices`` / ``scale`` that disagree with each
            other or with ``dim``, or indices outside ``[0, dim)`` or repeated within a row.
    """
    values, idx = decode_sparse(tensors, dim)
    if idx is None:
        return values
    rows = list(values.shape[:-1])
    full = torch.full((*rows, dim), fill, dtype=torch.float32, device=values.device)
    return full.scatter_(-1, idx, values)


def decode_sparse(
    tensors: dict[str, torch.Tensor], dim: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The checked entries of an :func:`encode` d message without filling the gaps: float32
    ``values [..., k]`` and int64 ``indices [..., k]`` (None when whole rows were sent).
    Raises :class:`~fedtune.errors.MessageError` as :func:`decode` does."""
    if "values" not in tensors:
        raise MessageError("compressed tensor without 'values'")
    values, idx, scale = tensors["values"], tensors.get("indices"), tensors.get("scale")
    if values.dtype not in DTYPES.values():
        raise MessageError(f"compressed values of dtype {values.dtype} are not supported")
    if values.dim() < 1:
        raise MessageError("compressed values must have at least one dimension")
    shape, rows = list(values.shape), list(values.shape[:-1])
    if (values.dtype == torch.int8) != (scale is not None):
        raise MessageError("int8 values and a 'scale' must come together")
    if scale is not None:
        if scale.dtype != torch.float32 or list(scale.shape) != rows:
            raise MessageError(
                f"scale {scale.dtype} {list(scale.shape)} does not fit values {shape}: "
                f"expected float32 {rows}"
            )
        if not torch.isfinite(scale).all():
            raise MessageError("compressed scale holds NaN or Inf")
        values = values.float() * scale.unsqueeze(-1)
    values = values.float()
    if not torch.isfinite(values).all():  # what the sender encodes is always finite
        raise MessageError("compressed values hold NaN or Inf")
    if idx is None:
        if shape[-1] != dim:
            raise MessageError(f"compressed values {shape}: expected {dim} entries per row")
        return values, None
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise MessageError(f"indices of dtype {idx.dtype} are not integers")
    if list(idx.shape) != shape or shape[-1] > dim:
        raise MessageError(f"indices {list(idx.shape)} do not fit values {shape} and {dim} entries")
    idx = idx.long()
    if idx.numel() and (idx.min() < 0 or idx.max() >= dim):
        raise MessageError(f"indices out of range [0, {dim})")
    # A repeated index would make scatter keep an arbitrary one of its values.
    if shape[-1] > 1 and (idx.sort(-1).values.diff(dim=-1) == 0).any():
        raise MessageError("indices repeat within a row")
    return values, idx
