"""Benchmark of the simulation engine (not a test): how close do federated rounds get to
centralized training, and how do they compare with a Flower simulation and a plain loop?

Measures in one run, on one machine, the same model, data and per-step batch:
  (a) centralized LoRA training throughput (fedtune's training loop over the pooled client data);
  (b) fedtune simulation throughput and round time for each framework, 3 and 30 clients,
      engine=sequential and (FedLLM, KD) engine=batched;
  (c) the peer: the same FedAvg-LoRA workload as a minimal Flower simulation app (Ray backend,
      one model per client actor, plain HF+PEFT training loop in the ClientApp);
  (d) the eager reference: the same federated work as a plain single-process HF+PEFT loop.
Writes bench/results/engine-<cpu|gpu>.json and .md.

  pip install -e '.[bench]'                      # flwr[simulation] (Ray) for the peer (c)
  python bench/engine.py --quick                 # CPU, tiny-llama, a few minutes
  python bench/engine.py --gpu                   # CUDA, SmolLM2-135M bf16
  python bench/engine.py --memory [--chunk 10]   # peak RSS of 100 SmolLM2 clients

Flower (c) needs ``flwr[simulation]`` in the interpreter's environment; without it (or when
Ray cannot start) the JSON says why and (c) is left out. FLOP metering is off (flops=off)
so that only training is timed; evaluation is outside the timed round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedtune import config
from fedtune.context import build_context
from fedtune.data import load_text_classification, split_federated
from fedtune.execution import engine as batched
from fedtune.execution.jobs import Train
from fedtune.execution.train import num_local_steps, train
from fedtune.models import load_model, load_trainable_state, trainable_state
from fedtune.runtime import run
from fedtune.runtime.inprocess import InProcess

MODES = {
    "cpu": dict(
        model="tiny-llama",
        device="cpu",
        dtype="float32",
        batch=8,
        per_client=32,
        max_length=64,
        rounds=6,
        clients=(3, 30),
        public=64,
        threads=1,
        passes=4,
    ),
    "gpu": dict(
        model="smollm2-135m",
        device="cuda",
        dtype="bfloat16",
        batch=16,
        per_client=64,
        max_length=80,
        rounds=4,
        clients=(3, 30),
        public=512,
        threads=0,
        passes=3,
    ),
}
FRAMEWORKS = {
    "fedllm": ("sequential", "batched"),
    "kd": ("sequential", "batched"),
    "split": ("sequential",),
}


def peak_rss_bytes() -> int:
    """The process's lifetime peak resident set size (Linux ``ru_maxrss``)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def run_config(m: dict, n: int, **sections) -> config.RunConfig:
    base = {
        "seed": 0,
        "device": m["device"],
        "threads": m["threads"],
        "flops": "off",
        "progress": False,
        "model": {"name": m["model"], "dtype": m["dtype"], "max_length": m["max_length"]},
        "data": {"num_clients": n, "samples_per_client": m["per_client"], "test_size": 64},
        "train": {"batch_size": m["batch"], "eval_batch_size": 256, "group_by_length": True},
        "fed": {"rounds": m["rounds"], "eval_every": m["rounds"]},
        "kd": {"public_samples": m["public"], "client_eval": False},
    }
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return config.from_dict(base)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- (a) centralized


def centralized(m: dict, n: int, batch: int):
    """(a): a callable timing one pass of one party over the pooled data of ``n`` clients at
    ``batch``; returns samples/s."""
    cfg = run_config(m, n, train={"batch_size": batch})
    ctx = build_context(cfg)
    pooled = np.concatenate(ctx.data.client_idx)
    steps = num_local_steps(len(pooled), cfg.train)
    job = Train(ctx.init_state, None, ctx.data.train, pooled, ctx.task.loss(), (0,), steps=steps)
    train(ctx, job)  # warm-up

    def sample() -> float:
        sync(m["device"])
        t0 = time.perf_counter()
        res = train(ctx, job)
        sync(m["device"])
        return res.samples / (time.perf_counter() - t0)

    return sample


# ----------------------------------------------------------------------------- (b) fedtune


def fedtune_run(m: dict, framework: str, engine: str, n: int):
    """(b): a callable running 2 simulated rounds (context built once); returns their round
    seconds (the very first round, which builds caches, is dropped)."""
    cfg = run_config(
        m, n, fed={"framework": framework, "engine": engine, "rounds": 2, "eval_every": 2}
    )
    ctx = build_context(cfg)
    first = [True]

    def sample() -> list[float]:
        history = run(cfg, InProcess(), ctx=ctx, log=None).history
        times = [r["round_seconds"] for r in history]
        if first[0]:
            first[0] = False
            return times[1:]
        return times

    return sample


# ----------------------------------------------------------------------------- (c, d) eager loop

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


# ----------------------------------------------------------------------------- memory


def memory_100(model: str = "smollm2-135m", n: int = 100, chunk: int = 0) -> dict:
    """Peak RSS of one local step of ``n`` clients x 1 sample with the batched engine
    (threads=1), fused ``chunk`` clients at a time (0 = all in one step, as
    ``fed.concurrent_clients``); every client's trained state and Adam state is kept."""
    m = dict(MODES["cpu"], model=model, per_client=1, batch=1, threads=1, dtype="float32")
    cfg = run_config(m, n, train={"local_steps": 1})
    ctx = build_context(cfg)
    rss_model = peak_rss_bytes()
    jobs = [
        Train(
            ctx.init_state,
            None,
            ctx.data.train,
            ctx.data.client_idx[c],
            ctx.task.loss(),
            (c,),
            steps=1,
        )
        for c in range(n)
    ]
    size = chunk or n
    t0 = time.perf_counter()
    res = [r for c in range(0, n, size) for r in batched.train_many(ctx, jobs[c : c + size])]
    secs = time.perf_counter() - t0
    state = state_bytes(res[0].state)
    opt = sum(
        t.numel() * t.element_size()
        for s in res[0].opt_state["state"].values()
        for t in s.values()
        if t.dim() > 0
    )
    return {
        "model": model,
        "clients": n,
        "clients_per_fused_step": size,
        "peak_rss_bytes_after_load": rss_model,
        "peak_rss_bytes": peak_rss_bytes(),
        "state_bytes_per_client": state,
        "adam_state_bytes_per_client": opt,
        "clients_kept": len(res),
        "train_seconds": secs,
    }


# ----------------------------------------------------------------------------- main


def machine(m: dict) -> dict:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": m["threads"] or os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": m["device"],
        "loadavg_1min_at_start": os.getloadavg()[0],
    }
    if m["device"].startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown(res: dict) -> str:
    m, cen = res["mode"], res["centralized_samples_per_s"]
    lines = [
        f"# Engine benchmark ({res['mode_name']})",
        "",
        f"Machine: {res['machine']}",
        "",
        f"Model {m['model']} ({m['dtype']}), batch {m['batch']} per client, "
        f"{m['per_client']} samples per client, 1 local epoch. All measurements ran interleaved "
        f"for {m['passes']} passes of 2 rounds each; each keeps its fastest round (the first "
        f"round overall warms up); centralized = best pass; Flower = fastest of rounds "
        f"2-{m['rounds']} of one run (shared machine: slow passes are others' load).",
        "",
        "| run | clients | per-step batch | samples/s | round s | vs centralized "
        "(same per-step batch) | Flower round s / this | eager round s / this |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fl, ea = res["flower"], res["eager"]
    for fw, engines in res["fedtune"].items():
        for eng, by_n in engines.items():
            for n, r in by_n.items():
                step = m["batch"] * (int(n) if eng == "batched" else 1)
                ratio = r["samples_per_s"] / cen[str(step)]
                fr = fl.get(n, {}).get("round_seconds")
                vs_flower = f"{fr / r['round_seconds']:.1f}x" if fr else "n/a"
                vs_eager = f"{ea[n]['round_seconds'] / r['round_seconds']:.1f}x"
                lines.append(
                    f"| fedtune {fw} {eng} | {n} | {step} | {r['samples_per_s']:.0f} | "
                    f"{r['round_seconds']:.3f} | {ratio:.2f}x | {vs_flower} | "
                    f"{vs_eager} |"
                )
    for n in ea:
        lines.append(
            f"| eager HF+PEFT loop (d) | {n} | {m['batch']} | "
            f"{ea[n]['samples_per_s']:.0f} | {ea[n]['round_seconds']:.3f} | "
            f"{ea[n]['samples_per_s'] / cen[str(m['batch'])]:.2f}x | | |"
        )
        f = fl.get(n, {})
        if "round_seconds" in f:
            lines.append(
                f"| Flower sim, Ray (c) | {n} | {m['batch']} | "
                f"{f['samples_per_s']:.0f} | {f['round_seconds']:.3f} | "
                f"{f['samples_per_s'] / cen[str(m['batch'])]:.2f}x | | |"
            )
        else:
            lines.append(
                f"| Flower sim (c) | {n} | | unavailable: {f.get('unavailable')} | | | | |"
            )
    lines += [
        "",
        "Centralized (a), samples/s by per-step batch: "
        + ", ".join(f"{b}: {v:.0f}" for b, v in cen.items()),
        "",
    ]
    lines.append(
        "KD rows count private training samples per round, but a KD round also runs "
        "public-set inference and distillation; split rows include the server half."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--quick", action="store_true", help="CPU, tiny-llama, a few minutes")
    g.add_argument("--gpu", action="store_true", help="CUDA, SmolLM2-135M bf16")
    g.add_argument("--memory", action="store_true", help="peak RSS of 100 SmolLM2 clients")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--no-flower", action="store_true")
    ap.add_argument("--chunk", type=int, default=0, help="--memory: clients per fused step")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.memory:
        torch.set_num_threads(1)
        res = memory_100(chunk=args.chunk)
        suffix = f"-chunk{args.chunk}" if args.chunk else ""
        (out / f"engine-memory{suffix}.json").write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res, indent=2))
        return
    name = "gpu" if args.gpu else "cpu"
    m = MODES[name]
    res: dict = {"mode_name": name, "mode": m, "machine": machine(m)}
    t_all = time.perf_counter()
    steps = sorted({m["batch"]} | {m["batch"] * n for n in m["clients"]})
    # Every measurement is a callable; they run interleaved for several passes and each keeps
    # its best (the CPU is shared: slow passes are other workers' load, not ours).
    jobs: dict[tuple, object] = {
        ("centralized", str(b)): centralized(m, max(m["clients"]), b) for b in steps
    }
    for fw, engines in FRAMEWORKS.items():
        for eng in engines:
            for n in m["clients"]:
                jobs[("fedtune", fw, eng, str(n))] = fedtune_run(m, fw, eng, n)
    for n in m["clients"]:
        jobs[("eager", str(n))] = eager_run(m, n)
    best: dict[tuple, float] = {}
    for p in range(m["passes"]):
        for key, job in jobs.items():
            got = job()
            if key[0] == "centralized":
                best[key] = max(best.get(key, 0.0), got)
            else:
                best[key] = min([best.get(key, float("inf")), *got])
        print(
            f"pass {p + 1}/{m['passes']}",
            {"/".join(k): round(v, 3) for k, v in best.items()},
            flush=True,
        )
    res["centralized_samples_per_s"] = {str(b): best[("centralized", str(b))] for b in steps}
    per_round = {n: n * m["per_client"] for n in m["clients"]}

    def entry(secs: float, n: int) -> dict:
        return {"round_seconds": secs, "samples_per_s": per_round[n] / secs}

    res["fedtune"] = {
        fw: {
            eng: {str(n): entry(best[("fedtune", fw, eng, str(n))], n) for n in m["clients"]}
            for eng in engines
        }
        for fw, engines in FRAMEWORKS.items()
    }
    res["eager"] = {str(n): entry(best[("eager", str(n))], n) for n in m["clients"]}
    res["flower"] = (
        {str(n): {"unavailable": "--no-flower"} for n in m["clients"]}
        if args.no_flower
        else {str(n): flower_run(m, n) for n in m["clients"]}
    )
    print("flower", res["flower"], flush=True)
    # flat summary keys
    res["fedtune_samples_per_s"] = {
        fw: {e: {n: r["samples_per_s"] for n, r in d.items()} for e, d in v.items()}
        for fw, v in res["fedtune"].items()
    }
    res["fedtune_round_seconds"] = {
        fw: {e: {n: r["round_seconds"] for n, r in d.items()} for e, d in v.items()}
        for fw, v in res["fedtune"].items()
    }
    res["flower_round_seconds"] = {n: r.get("round_seconds") for n, r in res["flower"].items()}
    res["eager_round_seconds"] = {n: r["round_seconds"] for n, r in res["eager"].items()}
    res["bench_seconds"] = time.perf_counter() - t_all
    res["machine"]["loadavg_1min_at_end"] = os.getloadavg()[0]
    (out / f"engine-{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"engine-{name}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
