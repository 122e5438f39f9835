"""Benchmark of the simulation engine (not a test): how close do federated rounds get to
centralized training at equal work, and how do they compare with a Flower simulation and a
plain loop?

Measures in one run, on one machine, the same model, data and per-step batch:
  (a) centralized LoRA training (fedtune's training loop over the pooled client data);
  (b) fedtune simulation rounds of every framework (both engines where they exist), for the
      classification task and (real models) the causal-LM task (E2E NLG, tokens/s);
  (c) the peer: the same FedAvg-LoRA workload as a minimal Flower simulation app (Ray backend,
      one model per client actor, plain HF+PEFT training loop in the ClientApp);
  (d) the eager reference: the same federated work as a plain single-process HF+PEFT loop.
"vs centralized at equal work" divides FLOP/s: every party's counted passes (KD's public
inference and distillation, both split halves) against centralized training's
(:mod:`workloads`). Writes bench/results/engine-<mode>.json and .md.

  pip install -e '.[bench]'                          # flwr[simulation] (Ray) for the peer (c)
  python bench/engine.py --quick                     # CPU, tiny-llama, a few minutes
  python bench/engine.py --quick --model smollm2-135m  # CPU, the offline model, ~10 minutes
  python bench/engine.py --gpu                       # CUDA, SmolLM2-135M bf16
  python bench/engine.py --memory [--chunk 10]       # peak RSS of 100 SmolLM2 clients

Flower (c) needs ``flwr[simulation]`` in the interpreter's environment; without it (or when
Ray cannot start) the JSON says why and (c) is left out. FLOP metering is off in the timed
runs (flops=off); evaluation is outside the timed round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peers import eager_run, flower_run
from workloads import FRAMEWORKS, MODES, centralized, fedtune_run, run_config

from fedtune.context import build_context
from fedtune.execution import engine as batched
from fedtune.execution.jobs import Train


def peak_rss_bytes() -> int:
    """The process's lifetime peak resident set size (Linux ``ru_maxrss``)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


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


def rate(work: dict, seconds: float) -> dict:
    return {
        "round_seconds": seconds,
        "samples_per_s": work["samples"] / seconds,
        "tokens_per_s": work["tokens"] / seconds,
        "flops_per_s": work["flops"] / seconds,
        "work": work,
    }


def markdown(res: dict) -> str:
    m = res["mode"]
    lines = [
        f"# Engine benchmark ({res['mode_name']})",
        "",
        f"Machine: {res['machine']}",
        "",
        f"Model {m['model']} ({m['dtype']}), batch {m['batch']} per client, "
        f"{m['per_client']} samples per client ({m.get('gen_per_client', m['per_client'])} for "
        f"generation), 1 local epoch. All measurements ran interleaved for {m['passes']} "
        f"pass(es) of 2 rounds (centralized: 2 passes over the pooled data) each, after an "
        f"untimed round that counted the work and warmed every cache; each keeps its fastest "
        f"round; Flower = fastest of rounds 2-{m['rounds']} of one run. Equal work: the "
        "round's FLOP/s (every party's counted passes) over centralized training's at the same "
        "per-step batch.",
    ]
    fl, ea = res["flower"], res["eager"]
    for task, frameworks in res["fedtune"].items():
        unit = "tokens/s" if task == "generation" else "samples/s"
        key = "tokens_per_s" if task == "generation" else "samples_per_s"
        cen = res["centralized"][task]
        lines += [
            "",
            f"## {task}",
            "",
            f"| run | clients | per-step batch | {unit} | round s | work / private sample "
            "| vs centralized, same batch | vs centralized, equal work | Flower round s / this "
            "| eager round s / this |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, by_n in frameworks.items():
            fw, eng = name.split("/")
            for n, r in by_n.items():
                step = m["batch"] * (int(n) if eng == "batched" else 1)
                c = cen[str(step)]
                per = r["work"]["flops"] / r["work"]["samples"]
                ratio = per / (c["work"]["flops"] / c["work"]["samples"])
                fr = fl.get(n, {}).get("round_seconds") if task == "classification" else None
                vs_flower = f"{fr / r['round_seconds']:.1f}x" if fr else "n/a"
                er = ea.get(n, {}).get("round_seconds") if task == "classification" else None
                vs_eager = f"{er / r['round_seconds']:.1f}x" if er else "n/a"
                lines.append(
                    f"| fedtune {fw} {eng} | {n} | {step} | {r[key]:.3g} | "
                    f"{r['round_seconds']:.3f} | {ratio:.2f}x | {r[key] / c[key]:.2f}x | "
                    f"{r['flops_per_s'] / c['flops_per_s']:.2f}x | {vs_flower} | {vs_eager} |"
                )
        if task != "classification":
            continue
        c = cen[str(m["batch"])]
        for n in ea:
            lines.append(
                f"| eager HF+PEFT loop (d) | {n} | {m['batch']} | {ea[n]['samples_per_s']:.3g} | "
                f"{ea[n]['round_seconds']:.3f} | 1.00x | "
                f"{ea[n]['samples_per_s'] / c['samples_per_s']:.2f}x | | | |"
            )
            f = fl.get(n, {})
            if "round_seconds" in f:
                lines.append(
                    f"| Flower sim, Ray (c) | {n} | {m['batch']} | {f['samples_per_s']:.3g} | "
                    f"{f['round_seconds']:.3f} | 1.00x | "
                    f"{f['samples_per_s'] / c['samples_per_s']:.2f}x | | | |"
                )
            else:
                lines.append(f"| Flower sim (c) | {n} | | unavailable: {f.get('unavailable')} |")
        lines += [
            "",
            "Centralized (a) by per-step batch: "
            + ", ".join(f"{b}: {v['samples_per_s']:.3g} samples/s" for b, v in cen.items()),
        ]
    lines += [
        "",
        "work / private sample: the FLOPs a round does per private training sample, over "
        "centralized training's (KD adds public inference and both distillations; split counts "
        "both halves).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--quick", action="store_true", help="CPU: tiny-llama, or --model's")
    g.add_argument("--gpu", action="store_true", help="CUDA, SmolLM2-135M bf16")
    g.add_argument("--memory", action="store_true", help="peak RSS of 100 SmolLM2 clients")
    ap.add_argument("--model", default="", help="a real model (e.g. smollm2-135m): its sizing")
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
    name = "gpu" if args.gpu else "cpu-real" if args.model else "cpu"
    m = dict(MODES[name], **({"model": args.model} if args.model else {}))
    stem = (
        "engine-gpu"
        if args.gpu
        else f"engine-cpu-{args.model.split('-')[0]}"
        if args.model
        else "engine-cpu"
    )
    res: dict = {"mode_name": name, "mode": m, "machine": machine(m)}
    t_all = time.perf_counter()
    # Every measurement is a callable; they run interleaved for several passes and each keeps
    # its best (the CPU is shared: slow passes are other workers' load, not ours).
    jobs: dict[tuple, Callable[[], list[float]]] = {}
    works: dict[tuple, dict] = {}
    for task in m["tasks"]:
        pairs = FRAMEWORKS[task]
        steps = {m["batch"]} | {
            m["batch"] * n for n in m["clients"] for _, e in pairs if e == "batched"
        }
        for b in sorted(steps):
            key = ("centralized", task, str(b))
            jobs[key], works[key] = centralized(m, max(m["clients"]), b, task)
        for fw, eng in pairs:
            for n in m["clients"]:
                key = ("fedtune", task, f"{fw}/{eng}", str(n))
                jobs[key], works[key] = fedtune_run(m, fw, eng, n, task)
    if "classification" in m["tasks"]:
        for n in m["clients"]:
            jobs[("eager", str(n))] = eager_run(m, n)
    best: dict[tuple, float] = {}
    for p in range(m["passes"]):
        for key, job in jobs.items():
            got = job()
            best[key] = min([best.get(key, float("inf")), *got])  # each returns its rounds
        print(
            f"pass {p + 1}/{m['passes']}",
            {"/".join(k): round(v, 3) for k, v in best.items()},
            flush=True,
        )
    res["centralized"], res["fedtune"] = {}, {}
    for key, secs in best.items():
        if key[0] == "centralized":
            res["centralized"].setdefault(key[1], {})[key[2]] = rate(works[key], secs)
        elif key[0] == "fedtune":
            res["fedtune"].setdefault(key[1], {}).setdefault(key[2], {})[key[3]] = rate(
                works[key], secs
            )
    per_round = {n: n * m["per_client"] for n in m["clients"]}
    res["eager"] = {
        str(n): {
            "round_seconds": best[("eager", str(n))],
            "samples_per_s": per_round[n] / best[("eager", str(n))],
        }
        for n in m["clients"]
        if ("eager", str(n)) in best
    }
    res["flower"] = (
        {str(n): {"unavailable": "--no-flower"} for n in m["clients"]}
        if args.no_flower or "classification" not in m["tasks"]
        else {str(n): flower_run(m, n) for n in m["clients"]}
    )
    print("flower", res["flower"], flush=True)
    res["bench_seconds"] = time.perf_counter() - t_all
    res["machine"]["loadavg_1min_at_end"] = os.getloadavg()[0]
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
