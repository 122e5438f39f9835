"""Command line: ``fedtune run CONFIG.toml [key=value ...] --out RUN_DIR``."""

from __future__ import annotations

import argparse
import json
import sys

from . import config
from .errors import FedtuneError


def _run(args: argparse.Namespace) -> int:
    cfg = config.load(args.config, args.overrides)
    if args.no_progress:
        cfg = config.with_overrides(cfg, progress=False)
    if args.print_config:
        print(config.to_toml(cfg), end="")
        return 0
    from .simulation import simulate

    summary = simulate(cfg, args.out)
    keys = ("framework", "final_accuracy", "best_accuracy", "bytes_up_per_client_per_round",
            "bytes_down_per_client_per_round", "client_flops_per_round",
            "client_seconds_per_round", "wall_seconds")  # fmt: skip
    print(json.dumps({k: summary[k] for k in keys}))
    if args.out:
        print(f"run written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of LLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="run one federated experiment in-process",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a config (TOML preset) with key=value overrides, e.g.\n"
        "  fedtune run configs/demo-fedllm.toml fed.rounds=3 train.lr=5e-4 --out runs/x\n\n"
        "Config keys (dotted path = default  [type]):\n" + config.describe(),
    )
    r.add_argument("config", nargs="?", help="TOML preset (defaults when omitted)")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. fed.rounds=3")
    r.add_argument("--out", help="run directory to write (config, metrics.jsonl, summary.json)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    r.set_defaults(func=_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config and "=" in args.config and not args.config.endswith(".toml"):
        args.overrides.insert(0, args.config)  # `fedtune run key=value` without a preset
        args.config = None
    try:
        return args.func(args)
    except FedtuneError as e:
        print(f"fedtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
