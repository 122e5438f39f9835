"""Split-FedLLM's cc2: every tensor averaged over the parties that trained it."""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


def combine(
    strategy,
    global_state: State,
    weights: dict[int, float],
    uploads: dict[int, State],
    trained: dict[int, State],
    slots: dict[int, object],
) -> State:
    """cc2: each tensor over the parties that trained it, weighted by samples (``weights``):
    the clients' ``uploads`` of their blocks (none when DP or the secure sum already
    aggregated the client side) and, for server-side tensors, the server model(s) that served
    each client (``trained[cid]`` from ``slots[cid]``); one shared server model counts once,
    with the samples of all clients it served. The strategy is called once per group of
    tensors with the same parties and weights. Returns the new values of those tensors."""
    parties: dict[str, dict[tuple, list]] = {}  # tensor -> party -> [tensor, weight]
    for cid, w in weights.items():
        for n, t in uploads.get(cid, {}).items():
            parties.setdefault(n, {})[("client", cid)] = [t, w]
        for n, t in trained[cid].items():
            entry = parties.setdefault(n, {}).setdefault(("server", slots[cid]), [None, 0.0])
            entry[0], entry[1] = t, entry[1] + w
    groups: dict[tuple, list[str]] = {}
    for n, by_party in parties.items():
        groups.setdefault(tuple((p, w) for p, (_, w) in by_party.items()), []).append(n)
    out: State = {}
    for key, names in groups.items():
        dev = {n: global_state[n].device for n in names}  # uploads arrive on the CPU
        states = [{n: parties[n][p][0].to(dev[n]) for n in names} for p, _ in key]
        ref = {n: global_state[n] for n in names}
        out.update(strategy(ref, states, [w for _, w in key]))
    return out
