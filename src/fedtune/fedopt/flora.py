"""FLoRA (Wang et al. 2024): stacking, the exact aggregate of the clients' LoRA products.

Every round each sampled client trains a fresh LoRA (the shared initialization at its rank
``r_i``, a new optimizer) on a backbone that holds every earlier round's aggregate. The server
stacks the uploads, per LoRA module::

    A_t = [w_1 A_1; ...; w_n A_n]    [Σ r_i, in]       w_i = n_i / Σ_j n_j
    B_t = [B_1, ..., B_n]            [out, Σ r_i]
    B_t A_t = Σ_i w_i B_i A_i                           the weighted mean product, exactly

and merges ``ΔW += s B_t A_t`` (``s = lora_alpha / model.lora_r``, the scaling every client
trained with: a rank-``r`` client trains zero-padded to ``model.lora_r``) into the global
model's dense residual of the module's frozen weight. The next a1 carries ``(A_t, B_t)`` to
each client, which merges it into its own residual, so every party's backbone is ``W + ΔW``.
a1's bytes grow with the number of clients a round aggregated: ``Σ r_i`` ranks, not ``r``.

The process's backbone is shared by every simulated party, so a party's ``ΔW`` is part of its
state: ``residual.<weight name>`` tensors (float32, in the weight's own layout: GPT-2's Conv1D
stores ``Wᵀ``), which :func:`fedtune.models.load_trainable_state` adds to a pristine copy of
the frozen weights. A client that missed rounds (not sampled, dropped) gets every stack since
the last one it merged, named ``flora.<k>.<LoRA name>``; it reports how many it has merged,
and the server keeps a stack until every client has merged it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..aggregate import update_problem
from ..errors import ConfigError
from ..models import RESIDUAL
from .ranks import is_a, is_b, rank_pad, rank_slice

State = dict[str, torch.Tensor]
PIECE = "flora."  # prefix of a stack's tensors in a message and in the server's history


def partner(a_name: str) -> str:
    return a_name.replace(".lora_A.", ".lora_B.")


def weight_name(a_name: str) -> str:
    """The frozen weight a LoRA module adds to: ``<module>.base_layer.weight``."""
    return a_name.split(".lora_A.")[0] + ".base_layer.weight"


def lora_part(state: State) -> State:
    return {n: t for n, t in state.items() if is_a(n) or is_b(n)}


def dense_part(state: State) -> State:
    """What FedAvg averages under FLoRA: everything but the LoRA factors (the head)."""
    return {n: t for n, t in state.items() if not (is_a(n) or is_b(n))}


@torch.no_grad()
def stack(uploads: Sequence[State], weights: Sequence[float]) -> State:
    """One round's stack of the clients' LoRA factors ``A_i [r_i, in]``, ``B_i [out, r_i]``:
    ``A [Σ r_i, in]`` (rows scaled by ``w_i / Σ w``) and ``B [out, Σ r_i]``, by LoRA name."""
    total = float(sum(weights))
    out = {}
    for a in (n for n in uploads[0] if is_a(n)):
        out[a] = torch.cat([(w / total) * s[a] for s, w in zip(uploads, weights, strict=True)])
        out[partner(a)] = torch.cat([s[partner(a)] for s in uploads], dim=1)
    return out


@torch.no_grad()
def merge(model: nn.Module, residual: State, piece: State) -> State:
    """``residual`` plus ``s B A`` of every module of ``piece`` (a new table, float32, in each
    frozen weight's layout); ``model`` gives each module's scaling and layout."""
    out = dict(residual)
    for a in (n for n in piece if is_a(n)):
        module = model.get_submodule(a.split(".lora_A.")[0])
        delta = (piece[partner(a)].double() @ piece[a].double()) * module.scaling["default"]
        delta = (delta.T if module.fan_in_fan_out else delta).float()
        key = RESIDUAL + weight_name(a)
        out[key] = out[key] + delta if key in out else delta
    return out


def history_since(history: State, k: int) -> State:
    """The stacks numbered ``k`` and later, as a message carries them."""
    return {n: t for n, t in history.items() if int(n.split(".")[1]) >= k}


def numbered(k: int, piece: State) -> State:
    return {f"{PIECE}{k}.{n}": t for n, t in piece.items()}


def pieces(tensors: State, lora: State, max_rank: int) -> dict[int, State] | str:
    """The stacks a message carries, by number, checked against the LoRA factors ``lora``
    (any rank): each stack holds every module's A ``[m, in]`` and B ``[out, m]`` of ``lora``'s
    dtype, one ``m`` in ``1..max_rank`` for all, finite; numbers consecutive. A reason when not."""
    found: dict[int, State] = {}
    for n, t in tensors.items():
        num, _, name = n[len(PIECE) :].partition(".")
        if not n.startswith(PIECE) or not num.isdigit() or name not in lora:
            return f"unexpected tensor {n!r}"
        found.setdefault(int(num), {})[name] = t
    ks = sorted(found)
    if ks != list(range(ks[0], ks[-1] + 1) if ks else []):
        return f"stacks {ks} are not consecutive"
    for k in ks:
        if set(found[k]) != set(lora):
            return f"stack {k} does not hold every LoRA factor"
        a0 = next(n for n in lora if is_a(n))
        m = found[k][a0].shape[0] if found[k][a0].dim() == 2 else 0
        if not 1 <= m <= max_rank:
            return f"stack {k} has rank {m}, expected 1..{max_rank}"
        for n, t in found[k].items():
            want = (m, lora[n].shape[1]) if is_a(n) else (lora[n].shape[0], m)
            if tuple(t.shape) != want or t.dtype != lora[n].dtype:
                return f"stack {k}: {n!r} is {t.dtype} {tuple(t.shape)}, expected {want}"
            if not torch.isfinite(t).all():
                return f"stack {k}: {n!r} holds NaN or Inf"
    return found


def check_residual(model: nn.Module, residual: State, where: str) -> None:
    """``residual`` (from a checkpoint or a run's export) names frozen weights of ``model``
    with their shapes; ConfigError (one line) when not."""
    params = dict(model.named_parameters())
    for key, t in residual.items():
        p = params.get(key[len(RESIDUAL) :]) if key.startswith(RESIDUAL) else None
        if p is None or p.requires_grad:
            raise ConfigError(f"{where}: {key!r} is not a frozen weight of the model")
        if t.shape != p.shape or not torch.isfinite(t).all():
            raise ConfigError(f"{where}: {key!r} is not a finite {tuple(p.shape)} tensor")


RESIDUAL_FILE = "residual.safetensors"  # beside a FLoRA run's adapter
_PEFT = "base_model.model."


def save_residual(path, residual: State) -> None:
    """A run's residual under the base model's own weight names (``...c_attn.weight``): a
    PEFT user adds each tensor to that weight of the base model before loading the adapter."""
    from safetensors.torch import save_file

    out = {}
    for key, t in residual.items():
        name = key[len(RESIDUAL) :].replace(".base_layer.", ".")
        out[name.removeprefix(_PEFT)] = t.detach().float().contiguous().cpu()
    save_file(out, str(path), metadata={"fedtune": "FLoRA: add to the base model's weights"})


def load_residual(path, model: nn.Module) -> State:
    """:func:`save_residual`'s file as ``residual.*`` entries of ``model`` (checked)."""
    from safetensors.torch import load_file

    try:
        found = load_file(str(path))
    except Exception as e:  # a truncated or foreign file
        raise ConfigError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    out = {}
    for name, t in found.items():
        module = name.removesuffix(".weight")
        out[f"{RESIDUAL}{_PEFT}{module}.base_layer.weight"] = t
    check_residual(model, out, str(path))
    return out


def count(x) -> bool:
    """Whether ``x`` (from a message or a checkpoint) is a non-negative int."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class Stacking:
    """The server's FLoRA state: the global model's residual, the stacks that not every client
    has merged yet (``flora.<k>.<LoRA name>``), each client's merge count, and the number of
    merges so far."""

    def __init__(self, num_clients: int) -> None:
        self.residual: State = {}
        self.history: State = {}
        self.synced = [0] * num_clients
        self.merges = 0

    def downlink(self, cid: int, rank: int) -> tuple[State, dict]:
        """a1's stacks for client ``cid`` (those it has not merged) and the message's meta."""
        return history_since(self.history, self.synced[cid]), {"merges": self.merges, "rank": rank}

    def note(self, cid: int, meta: dict) -> str | None:
        """A reply's merge count; the reason to reject it when the client did not train on the
        global backbone of this round."""
        got = meta.get("merged")
        if not count(got) or got != self.merges:
            return f"merged {got!r:.20} of the {self.merges} stacks sent"
        self.synced[cid] = got
        return None

    def absorb(self, model: nn.Module, uploads: Sequence[State], weights: Sequence[float]) -> None:
        """Merge the stack of this round's accepted LoRA uploads into the global residual and
        keep it for the clients; forget the stacks every client has merged."""
        piece = stack(uploads, weights)
        self.residual = merge(model, self.residual, piece)
        self.history.update(numbered(self.merges, piece))
        self.merges += 1
        self.history = history_since(self.history, min(self.synced))

    def state_dict(self) -> dict:
        return {
            "residual": self.residual,
            "history": self.history,
            "synced": list(self.synced),
            "merges": self.merges,
        }

    def load_state_dict(self, d: dict, model: nn.Module, lora: State, max_rank: int) -> None:
        check_residual(model, d["residual"], "checkpoint server.flora.residual")
        found = pieces(d["history"], lora, max_rank)
        synced, merges = d["synced"], d["merges"]
        counts = all(count(s) and s <= merges for s in synced) and count(merges)
        if isinstance(found, str) or not counts:
            raise ConfigError(
                f"checkpoint server.flora: {found if isinstance(found, str) else 'merge counts'}"
            )
        dev = next(model.parameters()).device
        self.residual = {n: t.to(dev) for n, t in d["residual"].items()}
        self.history = {n: t.to(dev) for n, t in d["history"].items()}
        self.synced, self.merges = list(synced), merges


class Merged:
    """A client's FLoRA state: its residual and how many stacks it has merged."""

    def __init__(self) -> None:
        self.residual: State = {}
        self.merged = 0

    def receive(
        self, model: nn.Module, tensors: State, meta: dict, init: State, max_rank: int
    ) -> tuple[State, int] | None:
        """Merge a1's stacks (those not merged yet); returns the start of this round's
        training, the fresh LoRA at the rank the server chose (zero-padded) with the received
        head and this client's residual, and that rank; None for a message that is not a
        consistent a1 (nothing changes then)."""
        lora = lora_part(init)
        top = next(t.shape[0] for n, t in lora.items() if is_a(n))
        found = pieces({n: t for n, t in tensors.items() if n.startswith(PIECE)}, lora, max_rank)
        rank, target = meta.get("rank"), meta.get("merges")
        dense = {n: t for n, t in tensors.items() if not n.startswith(PIECE)}
        if isinstance(found, str) or not (count(rank) and count(target)) or not 1 <= rank <= top:
            return None
        if update_problem(dense, dense_part(init)):
            return None
        ks = sorted(found)
        if target < self.merged or (
            ks[0] > self.merged or ks[-1] + 1 != target if ks else target != self.merged
        ):
            return None  # a gap, or a count that is not what was sent
        for k in ks[self.merged - ks[0] :] if ks else []:
            self.residual = merge(model, self.residual, found[k])
        self.merged = target
        fresh = rank_pad(rank_slice(lora, rank), lora)
        return {**fresh, **dense, **self.residual}, rank

    def state_dict(self) -> dict:
        return {"residual": self.residual, "merged": self.merged}

    def load_state_dict(self, d: dict, model: nn.Module) -> None:
        check_residual(model, d["residual"], "checkpoint client flora residual")
        if not count(d["merged"]):
            raise ConfigError(f"checkpoint client flora: merged {d['merged']!r:.20} is not a count")
        dev = next(model.parameters()).device
        self.residual = {n: t.to(dev) for n, t in d["residual"].items()}
        self.merged = d["merged"]
