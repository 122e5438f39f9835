"""The peers bench/engine.py compares fedtune with, on the same FedAvg-LoRA work (the
classification task): (d) the eager reference, a plain single-process HF+PEFT loop, and (c)
a Flower simulation (Ray backend, one model per client actor, that loop in the ClientApp)."""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from workloads import run_config, sync

from fedtune.data import load_text_classification, split_federated
from fedtune.models import load_model, load_trainable_state, trainable_state

_EAGER: dict = {}


def eager_setup(m: dict, n: int):
    """Plain HF+PEFT pieces: the LoRA model, tokenizer, and each client's texts and labels."""
    key = (m["model"], n)
    if key not in _EAGER:
        cfg = run_config(m, n)
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
        names, train, _ = load_text_classification(cfg.data)
        _, clients = split_federated(train.labels, cfg.data, cfg.seed)
        device = torch.device(m["device"])
        model, tok = load_model(cfg.model, len(names), device)
        parts = [([train.texts[i] for i in c], train.labels[c]) for c in clients]
        init = {k: v.clone() for k, v in trainable_state(model).items()}
        _EAGER.clear()
        _EAGER[key] = (model, tok, parts, init, device, cfg)
    return _EAGER[key]


def eager_client_update(m: dict, n: int, cid: int, state: dict, seed: int):
    """One client's local epoch, written as a plain HF+PEFT loop (tokenise per batch, fresh
    Adam, ``loss.item()`` per step). Returns ``(new_state, num_samples)``."""
    model, tok, parts, _, device, cfg = eager_setup(m, n)
    texts, labels = parts[cid]
    load_trainable_state(model, state)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    order = np.random.default_rng(seed).permutation(len(texts))
    for s in range(0, len(order), m["batch"]):
        b = order[s : s + m["batch"]]
        enc = tok(
            [texts[i] for i in b],
            padding=True,
            truncation=True,
            max_length=m["max_length"],
            return_tensors="pt",
        ).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=m["dtype"] == "bfloat16"):
            logits = model(**enc).logits
        loss = F.cross_entropy(logits.float(), torch.as_tensor(labels[b], device=device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()
    return {k: v.detach().cpu() for k, v in trainable_state(model).items()}, len(texts)


def fedavg(states: list[dict], weights: list[float]) -> dict:
    total = sum(weights)
    return {
        k: sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True)) for k in states[0]
    }


def eager_run(m: dict, n: int):
    """(d): a callable running 2 FedAvg rounds as one plain loop in this process; returns
    their round seconds (the very first round is dropped)."""
    first = [True]

    def sample() -> list[float]:
        *_, init, _, _ = eager_setup(m, n)
        state, times = init, []
        for rnd in (1, 2):
            t0 = time.perf_counter()
            outs = [eager_client_update(m, n, c, state, rnd * 1000 + c) for c in range(n)]
            state = fedavg([o[0] for o in outs], [o[1] for o in outs])
            sync(m["device"])
            times.append(time.perf_counter() - t0)
        if first[0]:
            first[0] = False
            return times[1:]
        return times

    return sample


def flower_run(m: dict, n: int) -> dict:
    """(c): the same rounds as a Flower simulation (Ray backend; one model per client actor)."""
    try:
        from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
        from flwr.clientapp import ClientApp
        from flwr.serverapp import Grid, ServerApp
        from flwr.simulation import run_simulation
    except ImportError as e:
        return {"unavailable": f"flwr[simulation] not importable: {e}"}

    client_app = ClientApp()

    @client_app.train()
    def train(msg, context):
        cid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["round"])
        state = msg.content["arrays"].to_torch_state_dict()
        new, k = eager_client_update(m, n, cid, state, rnd * 1000 + cid)
        return Message(
            RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord({"num-examples": k})}),
            reply_to=msg,
        )

    server_app = ServerApp()
    times: list[float] = []

    @server_app.main()
    def main(grid: Grid, context) -> None:
        from flwr.app import ConfigRecord

        *_, init, _, _ = eager_setup(m, n)
        state = {k: v.cpu() for k, v in init.items()}
        nodes = list(grid.get_node_ids())
        while len(nodes) < n:  # nodes register asynchronously
            time.sleep(0.2)
            nodes = list(grid.get_node_ids())
        for rnd in range(1, m["rounds"] + 1):
            t0 = time.perf_counter()
            msgs = [
                Message(
                    RecordDict(
                        {"arrays": ArrayRecord(state), "config": ConfigRecord({"round": rnd})}
                    ),
                    dst_node_id=nid,
                    message_type="train",
                )
                for nid in nodes
            ]
            replies = [r for r in grid.send_and_receive(msgs) if r.has_content()]
            if len(replies) != n:
                raise RuntimeError(f"round {rnd}: {len(replies)} of {n} replies")
            states = [r.content["arrays"].to_torch_state_dict() for r in replies]
            weights = [float(r.content["metrics"]["num-examples"]) for r in replies]
            state = fedavg(states, weights)
            times.append(time.perf_counter() - t0)

    gpu = 1.0 if m["device"].startswith("cuda") else 0.0
    # One CPU for Ray: the same compute budget as the single-threaded fedtune process.
    cpus = m["threads"] or os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": gpu},
        "init_args": {"num_cpus": cpus, "include_dashboard": False},
    }
    try:
        t0 = time.perf_counter()
        run_simulation(server_app, client_app, num_supernodes=n, backend_config=backend)
        total = time.perf_counter() - t0
    except Exception as e:  # Ray may not start on a locked-down machine
        return {"unavailable": f"Flower simulation failed: {type(e).__name__}: {e}"}
    if len(times) < m["rounds"]:
        return {"unavailable": f"Flower simulation ran {len(times)} of {m['rounds']} rounds"}
    secs = min(times[1:])
    return {
        "round_seconds": secs,
        "samples_per_s": n * m["per_client"] / secs,
        "first_round_seconds": times[0],
        "total_seconds_with_startup": total,
    }
