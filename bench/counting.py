"""Benchmark (not a test): what measuring costs the measured party.

Runs one config under ``flops=off``, ``shape`` and ``all`` in one process (the backbone is
loaded once), in alternating order, and prints per mode the client seconds per round, the
client FLOPs per round, the peak memory and the wall seconds of the run, with the ratios
against ``off``. ``shape`` measures each new step shape on a replay (random state forked)
with the client's clock stopped, so its client seconds should match ``off``'s (its wall time pays for
the replays); ``all`` counts every real op and its client seconds pay for it.

  python bench/counting.py configs/demo-fedllm.toml fed.rounds=2 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import time

from fedtune import config, models
from fedtune.runtime import simulate

MODES = ("off", "shape", "all")


def forget_step_costs() -> None:
    """Empty the step-cost cache the loaded models carry (:func:`fedtune.context.build_context`)."""
    for model, _ in models._MODELS.values():
        model.__dict__.get("_fedtune_step_costs", {}).clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    base = config.load(args.preset, [*args.overrides, "progress=false"])
    simulate(config.with_overrides(base, flops="off", fed={"rounds": 1}), log=None)  # warm up
    got: dict[str, list[dict]] = {m: [] for m in MODES}
    for rep in range(args.repeats):
        for mode in MODES if rep % 2 == 0 else MODES[::-1]:
            forget_step_costs()  # every run measures its shapes afresh, as a new process would
            t0 = time.perf_counter()
            s = simulate(config.with_overrides(base, flops=mode), log=None)
            got[mode].append({**s, "wall": time.perf_counter() - t0})
    off = statistics.median(r["client_seconds_per_round"] for r in got["off"])
    off_wall = statistics.median(r["wall"] for r in got["off"])
    print(f"{args.preset} {' '.join(args.overrides)}: medians of {args.repeats} runs per mode")
    print(
        "| flops | client s / round | vs off | client FLOPs / round | peak memory | wall s | vs off |"
    )
    print("|" + " --- |" * 7)
    for mode in MODES:
        rows = got[mode]
        sec = statistics.median(r["client_seconds_per_round"] for r in rows)
        wall = statistics.median(r["wall"] for r in rows)
        print(
            f"| {mode} | {sec:.2f} | {sec / off:.3f} | {rows[0]['client_flops_per_round']:.4g} "
            f"| {rows[0]['client_peak_memory_bytes'] / 2**20:.1f} MiB | {wall:.1f} "
            f"| {wall / off_wall:.3f} |"
        )


if __name__ == "__main__":
    main()
