"""Command line.

``fedtune run CONFIG.toml [key=value ...] --out RUN_DIR``: one experiment;
``fedtune compare CONFIG.toml [key=value ...] --out DIR``: FedLLM, KD-FedLLM and Split-FedLLM on
the same config and seeds, with report.md and plots;
``fedtune reproduce paper --out DIR [--quick]``: the paper's case-study grid;
``fedtune plot RUN_DIR... [--out DIR]``: report and plots from existing run directories;
``fedtune flower ...``: real deployment on Flower (see :mod:`fedtune.flower.cli`).
"""

from __future__ import annotations

import argparse
import json
import sys

from . import config
from .errors import FedtuneError


def _run(args: argparse.Namespace) -> int:
    from .runtime.rundir import check_writable

    if args.out is not None:
        check_writable(args.out, "--out")
    if args.resume is not None:
        from pathlib import Path

        from .errors import ConfigError

        check_writable(args.resume, "--resume")
        if args.config or args.overrides or (args.out and args.out != args.resume):
            raise ConfigError(
                "--resume RUN_DIR reads RUN_DIR/config.toml: give no preset, "
                "overrides or other --out"
            )
        preset = Path(args.resume) / "config.toml"
        if not preset.is_file():
            raise ConfigError(f"cannot resume {args.resume}: no config.toml (not a run directory)")
        args.config, args.out = str(preset), args.resume
    cfg = config.load(args.config, [*args.overrides, *_no_progress(args)])
    if args.print_config:
        print(config.to_toml(cfg), end="")
        return 0
    from .runtime import simulate

    summary = simulate(cfg, args.out, resume=args.resume is not None)
    keys = (
        "framework",
        "task",
        "final",
        "final_accuracy",
        "best_accuracy",
        "bytes_up_per_client_per_round",
        "bytes_down_per_client_per_round",
        "client_flops_per_round",
        "client_seconds_per_round",
        "wall_seconds",
    )
    print(json.dumps({k: summary[k] for k in keys}))
    if args.out:
        print(f"run written to {args.out}")
    return 0


def _no_progress(args: argparse.Namespace) -> list[str]:
    """``--no-progress`` as an override, so every command applies it the same way."""
    return ["progress=false"] if args.no_progress else []


def _split_preset(args: argparse.Namespace) -> None:
    """``fedtune run|compare|flower run key=value ...`` without a preset: the first item is
    an override."""
    if args.config and "=" in args.config and not args.config.endswith(".toml"):
        args.overrides.insert(0, args.config)
        args.config = None


def _compare(args: argparse.Namespace) -> int:
    from . import experiments
    from .runtime.rundir import check_writable

    base = config.load(args.config, [*args.overrides, *_no_progress(args)])
    seeds = experiments.parse_seeds(args.seeds) if args.seeds is not None else (base.seed,)
    frameworks = experiments.parse_frameworks(args.frameworks)
    specs = experiments.compare_specs(base, seeds, frameworks)
    check_writable(args.out, "--out")
    paths = experiments.run_all(specs, args.out)
    experiments.write_outputs(paths, args.out, notes=[])
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from . import experiments, paper

    seeds = experiments.parse_seeds(args.seeds) if args.seeds is not None else None
    overrides = [*args.overrides, *_no_progress(args)]
    specs, notes = paper.paper_specs(args.quick, seeds, args.model, overrides)
    if args.dry_run:
        for spec in specs:
            print(spec.name)
        return 0
    from .runtime.rundir import check_writable

    check_writable(args.out, "--out")
    paths = experiments.run_all(specs, args.out)
    title = "fedtune: the paper's case study" + (" (--quick)" if args.quick else "")
    experiments.write_outputs(paths, args.out, notes=notes, title=title)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from . import experiments
    from .errors import ConfigError
    from .report import find_runs

    if args.out is None and len(args.run_dirs) > 1:
        raise ConfigError("--out is required with several run directories")
    out = args.out if args.out is not None else args.run_dirs[0]
    if not find_runs(args.run_dirs):
        raise ConfigError(f"no finished run (summary.json) in {', '.join(args.run_dirs)}")
    from .runtime.rundir import check_writable

    check_writable(out, "--out")
    experiments.write_outputs(args.run_dirs, out, notes=None, title=args.title)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .inference import load_run

    run = load_run(args.run_dir, args.device)
    for text, (label, prob) in zip(args.texts, run.predict(args.texts), strict=True):
        print(f"{label}\t{prob:.4f}\t{text}" if len(args.texts) > 1 else f"{label}\t{prob:.4f}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .inference import load_run

    run = load_run(args.run_dir, args.device)
    for text in run.generate(args.prompts, args.max_new_tokens, args.raw):
        print(text)
    return 0


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too, like every other error (``fedtune: error: ...``, exit
    2); the usage is one ``--help`` away. Subcommand parsers inherit this class."""

    def error(self, message: str):  # type: ignore[override]
        hint = f" (see {self.prog} --help)"
        self.exit(2, f"fedtune: error: {one_line(message)}{hint}\n")


def one_line(text: str) -> str:
    """A message on one line (a library's multi-line text folded)."""
    return " ".join(str(text).split())


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fedtune", description="Federated fine-tuning of LLMs.")
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
    r.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run from its last checkpoint (RUN_DIR/checkpoint)",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    r.set_defaults(func=_run)

    c = sub.add_parser(
        "compare",
        help="FedLLM vs KD-FedLLM vs Split-FedLLM on one config: runs, report.md, plots",
        description="Run the config under fed.framework=fedllm, kd and split for each seed "
        "(DIR/runs/<framework>-s<seed>), then write DIR/report.md and PNG plots. Finished "
        "runs are skipped when run again; unfinished ones resume from their checkpoint.",
    )
    c.add_argument("config", nargs="?", help="TOML preset (defaults when omitted)")
    c.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    c.add_argument("--out", required=True, help="output folder (runs/, report.md, *.png)")
    c.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,42 (default: the config's)")
    c.add_argument("--frameworks", default="fedllm,kd,split", help="default: fedllm,kd,split")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=_compare)

    rp = sub.add_parser(
        "reproduce",
        help="the paper's case-study grid (FedLLM LoRA ranks, KD public set sizes, Split "
        "samples per round), report.md and plots",
        description="Start from configs/paper-{fedllm,kd,split}.toml and vary one factor per "
        "framework: FedLLM model.lora_r 4,8,16; KD-FedLLM kd.public_samples 1000,2500,5002; "
        "Split-FedLLM split.samples_per_round 500,1000,1667; seeds 0,1,42; 100 rounds. GPT-2 "
        "when it is in the local HF cache, else the offline smollm2-135m. Resumable.",
    )
    rp.add_argument("study", choices=["paper"], help="the study to reproduce")
    rp.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    rp.add_argument("--out", required=True, help="output folder (runs/, report.md, *.png)")
    rp.add_argument(
        "--quick",
        action="store_true",
        help="a CPU-sized grid: 3 rounds, 48 samples per client, seed 0 (14 min on 2 cores)",
    )
    rp.add_argument("--seeds", help="comma-separated seeds (default 0,1,42; --quick: 0)")
    rp.add_argument("--model", help="model.name for every run (default: gpt2 if cached)")
    rp.add_argument("--dry-run", action="store_true", help="list the runs, run nothing")
    rp.add_argument("--no-progress", action="store_true", help="no progress bars")
    rp.set_defaults(func=_reproduce)

    pl = sub.add_parser(
        "plot",
        help="redraw report.md and the plots from existing run directories",
        description="Read finished run directories (or folders holding them, e.g. a compare "
        "output) and write report.md and PNG plots.",
    )
    pl.add_argument("run_dirs", nargs="+", help="run directories or folders holding them")
    pl.add_argument("--out", help="output folder (default: the single RUN_DIR given)")
    pl.add_argument("--title", help="report title")
    pl.set_defaults(func=_plot)

    pr = sub.add_parser(
        "predict",
        help="label texts with a finished classification run (base model + its adapter)",
    )
    pr.add_argument("run_dir", help="a finished run directory")
    pr.add_argument("texts", nargs="+", help="texts to classify")
    pr.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    pr.set_defaults(func=_predict)

    ge = sub.add_parser(
        "generate",
        help="respond to prompts with a finished generation run (base model + its adapter)",
    )
    ge.add_argument("run_dir", help="a finished run directory")
    ge.add_argument(
        "prompts",
        nargs="+",
        help="prompts; each fills the run's data.prompt_template when it has one field",
    )
    ge.add_argument("--raw", action="store_true", help="do not apply data.prompt_template")
    ge.add_argument(
        "--max-new-tokens", type=_positive, help="default: the run's eval.max_new_tokens"
    )
    ge.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ge.set_defaults(func=_generate)

    from .flower.cli import add_parser as add_flower_parser  # imports flwr only when run

    add_flower_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "config"):
        _split_preset(args)  # `fedtune run key=value` without a preset
    try:
        return args.func(args)
    except FedtuneError as e:
        print(f"fedtune: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused (full disk, permissions): not a bug
        where = f": {e.filename}" if e.filename else ""
        print(f"fedtune: error: {one_line(e.strerror or e)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
