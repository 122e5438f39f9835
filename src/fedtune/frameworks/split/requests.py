"""What the split server accepts from a client before computing anything: its round of labels
(c2), checked, then taken batch by batch as its activations (c2) arrive, themselves checked."""

from __future__ import annotations

import torch

from ... import codec
from ...errors import MessageError
from ...messages import Message


def received_labels(msg: Message) -> dict[str, torch.Tensor]:
    """A client's LABELS for the round: ``labels [N]`` (classification) or ``target_pos`` and
    ``target_ids [N, R]`` (generation), as int64."""
    t = msg.tensors
    names = {"labels"} if "labels" in t else {"target_pos", "target_ids"}
    dims = 1 if names == {"labels"} else 2
    if set(t) != names or any(v.is_floating_point() or v.dim() != dims for v in t.values()):
        raise MessageError(f"labels from {msg.sender} are malformed")
    if len({tuple(v.shape) for v in t.values()}) != 1:
        raise MessageError(f"labels from {msg.sender} disagree in shape")
    return {k: v.long() for k, v in t.items()}


def take_labels(
    store: dict[int, dict], cid: int, b: int, length: int, classes: int, device
) -> dict[str, torch.Tensor]:
    """The next ``b`` rows of client ``cid``'s round labels (removed from ``store``), as a
    loss batch for activations of ``length`` positions; generation's are trimmed to the
    batch's widest row. Labels outside ``[0, classes)`` (the classes, or the vocabulary) or
    positions outside the batch are a MessageError, as too few labels are."""
    have = store.get(cid) or {}
    batch = {k: v[:b].to(device) for k, v in have.items()}
    if not batch or len(next(iter(batch.values()))) != b:
        raise MessageError(f"client {cid} sent activations without their labels")
    store[cid] = {k: v[b:] for k, v in have.items()}
    if "target_ids" not in batch:
        y = batch["labels"]
        if (y < 0).any() or (y >= classes).any():
            raise MessageError(f"labels from client {cid} outside [0, {classes})")
        return batch
    tgt, pos = batch["target_ids"], batch["target_pos"]
    if (
        ((tgt != -100) & ((tgt < 0) | (tgt >= classes))).any()
        or (pos < 0).any()
        or (pos >= length).any()
    ):
        raise MessageError(f"response tokens from client {cid} outside the vocabulary or batch")
    r = max(1, int((tgt != -100).sum(1).max()))
    return {k: v[:, :r] for k, v in batch.items()}


def check_activations(cfg, msg: Message) -> int:
    """What a client's ACTIVATIONS must be before anything is allocated or computed from them:
    a bool ``mask [B, L]`` with ``B <= train.batch_size``, ``L <= model.max_length`` and a
    token in every row, values ``[B, L, ...]`` (the codec checks the rest). Returns ``B`` (the
    server also holds each client to its samples per round)."""
    mask = msg.tensors.get("mask")
    if mask is None or mask.dtype != torch.bool or mask.dim() != 2:
        raise MessageError(f"activations from {msg.sender} without a [B, L] bool mask")
    b, length = mask.shape
    if not (1 <= b <= cfg.train.batch_size and 1 <= length <= cfg.model.max_length):
        raise MessageError(
            f"activations from {msg.sender}: {b} x {length} tokens, over train.batch_size "
            f"{cfg.train.batch_size} / model.max_length {cfg.model.max_length}"
        )
    codec.check_names(msg.tensors, ("mask",))
    values = msg.tensors.get("values")
    if values is None or values.dim() != 3 or tuple(values.shape[:2]) != (b, length):
        raise MessageError(f"activations from {msg.sender} do not match their mask")
    if not mask.any(1).all():
        raise MessageError(f"activations from {msg.sender} have a row without tokens")
    return b
