"""The paper's case study (Yan, Su, Deng, Schober, arXiv 2501.04436): its Table I claims and its
experiment grid, kept apart from the generic report (:mod:`.report`) and runner
(:mod:`.experiments`).

* :data:`CLAIMS` / :func:`table_one`: Table I as ranks, rebuilt from measured numbers at the
  paper's base configuration (:func:`base_rows`); :func:`sweep_lines`: the sweeps (Fig. 3);
* :data:`PAPER_GRID` / :func:`paper_specs`: ``fedtune reproduce paper``'s runs.
"""

from __future__ import annotations

from pathlib import Path

from . import config
from .experiments import RunSpec, configs_dir
from .report import fmt_si, title

FRAMEWORKS = ("fedllm", "kd", "split")  # the paper's three, in its order

# The paper's Table I (arXiv 2501.04436) as strict ranks, 1 = best: most accurate, fewest bytes
# per client per round, least client compute. A claim is (the paper's words, the ranks it
# allows). The paper orders each column: accuracy FedLLM > Split > KD, communication
# KD < FedLLM < Split, client compute Split < FedLLM < KD.
CLAIMS: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {
    "accuracy": {
        "fedllm": ("high", (1,)),
        "kd": ("lower (depends on the public data)", (3,)),
        "split": ("high (close to FedLLM)", (2,)),
    },
    "communication": {
        "fedllm": ("high (all LoRA parameters each round)", (2,)),
        "kd": ("low (logits)", (1,)),
        "split": ("highest (activations + gradients per batch)", (3,)),
    },
    "client compute": {
        "fedllm": ("high (full model on the client)", (2,)),
        "kd": ("high, plus logit generation and distillation", (3,)),
        "split": ("low (first blocks only)", (1,)),
    },
}


# On a generative task the paper qualifies KD's communication claim: KD-FedLLM is "most
# communication-efficient for classification tasks, where logits are relatively small, but
# become[s] less efficient for generative tasks" (logits over the vocabulary, per token).
GENERATION_CLAIMS = {
    **CLAIMS,
    "communication": {
        **CLAIMS["communication"],
        "kd": ("less efficient on generative tasks (per-token logits over the vocabulary)", (2, 3)),
    },
}


def claims_for(rows: list[dict]) -> dict:
    """Table I's claims for the rows' task (generation rows: :data:`GENERATION_CLAIMS`)."""
    generative = bool(rows) and all(r.get("task") == "generation" for r in rows)
    return GENERATION_CLAIMS if generative else CLAIMS


# ----------------------------------------------------------------------------- Table I

# Table I compares the frameworks at one configuration, the paper's base: LoRA rank 8, KD on the
# full public set, Split on all of a client's samples per round. The sweeps of its Fig. 3 vary
# one factor each; averaging over them would make the ranks depend on the sweep ranges.
BASE_LORA_R = 8
# Sample counts whose base value is "all of it" (0 = all). ``--quick`` scales the sweeps down, so
# the largest value a framework was run with stands for the full set.
FULL_KEYS = ("kd.public_samples", "split.samples_per_round")
BASE_WORDS = "LoRA r8, the full public set, all samples per round"


def _count(row: dict, key: str) -> float:
    """A row's sample count ``key``, with 0 (= all) above every number."""
    value = row.get("config", {}).get(key, 0)
    return float("inf") if value == 0 else float(value)


def base_rows(mine: list[dict]) -> list[dict]:
    """One framework's rows at the base configuration: ``model.lora_r`` =
    :data:`BASE_LORA_R` and, per :data:`FULL_KEYS`, the largest value among ``mine`` (0 = all
    counts as the largest). A framework with a single row is its own base (a plain ``fedtune
    compare``). Empty: no run at the base; several: the base is ambiguous."""
    if len(mine) <= 1:
        return list(mine)
    # A row without a config (not from report.aggregate) has the schema's defaults: r8, all.
    at = [r for r in mine if r.get("config", {}).get("model.lora_r", BASE_LORA_R) == BASE_LORA_R]
    for key in FULL_KEYS:
        full = max(_count(r, key) for r in mine)
        at = [r for r in at if _count(r, key) == full]
    return at


def base_points(rows: list[dict]) -> tuple[dict[str, dict], str]:
    """Per framework of :data:`FRAMEWORKS`, its base row (:func:`base_rows`), and why Table I
    cannot be built ("" when it can)."""
    bases, missing = {}, []
    for fw in FRAMEWORKS:
        mine = [r for r in rows if r["framework"] == fw]
        if not mine:
            return {}, "Table I needs runs of all three frameworks; not rebuilt."
        at = base_rows(mine)
        if len(at) == 1:
            bases[fw] = at[0]
            continue
        labels = ", ".join(_setting(r) for r in (at or mine))
        how = "several runs there" if at else "no run there"
        missing.append(f"{title(fw)} has {how} (its settings: {labels})")
    if missing:
        return bases, (
            f"Table I cannot be built at the base configuration ({BASE_WORDS}): "
            f"{'; '.join(missing)}. The sweeps are not averaged instead."
        )
    return bases, ""


def rank(values: dict[str, float], higher_is_better: bool) -> dict[str, int]:
    """Competition ranking (1 = best; equal values share a rank: 1, 1, 3)."""
    sign = -1 if higher_is_better else 1
    return {k: 1 + sum(sign * w < sign * v for w in values.values()) for k, v in values.items()}


def _quantities(row: dict, use_flops: bool) -> dict[str, float]:
    """A row's three Table I quantities (client compute: FLOPs, or seconds when not counted)."""
    return {
        "accuracy": row["accuracy_mean"],
        "communication": row["bytes_total"],
        "client compute": row["client_flops" if use_flops else "client_seconds"],
    }


def _use_flops(rows: list[dict]) -> bool:
    return any(r["client_flops"] > 0 for r in rows)


def table_one(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Rows ``{metric, framework, claim, claimed_ranks, value, rank, agrees}``, each framework
    at its base point (:func:`base_points`), and one disagreement line per mismatch. Empty
    when there is no base point for each of the three frameworks."""
    bases, problem = base_points(rows)
    if problem:
        return [], []
    values = {fw: _quantities(bases[fw], _use_flops(rows)) for fw in FRAMEWORKS}
    table, disagreements = [], []
    for metric, claims in claims_for(rows).items():
        ranks = rank({fw: values[fw][metric] for fw in FRAMEWORKS}, metric == "accuracy")
        for fw in FRAMEWORKS:
            words, allowed = claims[fw]
            agrees = ranks[fw] in allowed
            table.append(
                {
                    "metric": metric,
                    "framework": fw,
                    "claim": words,
                    "claimed_ranks": allowed,
                    "value": values[fw][metric],
                    "rank": ranks[fw],
                    "agrees": agrees,
                }
            )
            if not agrees:
                disagreements.append(
                    f"Disagreement on {metric}: {title(fw)} ranks {ranks[fw]} measured, "
                    f"the paper implies rank {_ranks(allowed)}: {words}."
                )
    return table, disagreements


def _ranks(allowed: tuple[int, ...]) -> str:
    return (
        "-".join(str(a) for a in (allowed[0], allowed[-1])) if len(allowed) > 1 else str(allowed[0])
    )


def _setting(row: dict) -> str:
    """``lora_r=8``: a row's setting, short keys ("its only run" for a framework's only one)."""
    return " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in row["setting"]) or "its only run"


def _metric_value(metric: str, value: float, use_flops: bool, generative: bool = False) -> str:
    if metric == "accuracy":
        return f"{value:.1f} BLEU" if generative else f"{value:.4f}"
    if metric == "communication":
        return fmt_si(value, "B")
    return fmt_si(value, "FLOP") if use_flops else f"{value:.3g} s"


def table_one_lines(rows: list[dict]) -> list[str]:
    """Table I at the base configuration, its verdict, then each framework's sweep."""
    bases, problem = base_points(rows)
    use_flops = _use_flops(rows)
    generative = claims_for(rows) is GENERATION_CLAIMS
    sweeps = sweep_lines(rows, bases, use_flops, generative)
    if problem:
        return [f"**{problem}**", *sweeps]
    table, disagreements = table_one(rows)
    unit = "FLOPs" if use_flops else "seconds (FLOPs were not counted)"
    counts = {fw: sum(r["framework"] == fw for r in rows) for fw in FRAMEWORKS}
    used = "; ".join(
        f"{title(fw)}: {_setting(bases[fw])}"
        + (f" (1 of {counts[fw]} settings)" if counts[fw] > 1 else "")
        for fw in FRAMEWORKS
    )
    lines = [
        "Ranks: 1 = best (most accurate, by BLEU on a generative task; fewest bytes up + down "
        f"per client per round; least client compute per round, in {unit}), each framework at "
        f"the paper's base configuration ({BASE_WORDS}; a framework run once is its own base). "
        "Sweeps are not averaged in: they are listed below, as in the paper's Fig. 3. The "
        "paper's claims are qualitative orders, taken as strict ranks (accuracy FedLLM > Split "
        "> KD, communication KD < FedLLM < Split, client compute Split < FedLLM < KD); on a "
        "generative task the paper allows KD's communication rank 2 or 3.",
        "",
        f"Base point per framework: {used}.",
        "",
        "| metric | framework | paper claim | paper rank | measured | measured rank | agrees |",
        "|" + " --- |" * 7,
    ]
    for t in table:
        lines.append(
            f"| {t['metric']} | {title(t['framework'])} | {t['claim']} "
            f"| {_ranks(t['claimed_ranks'])} "
            f"| {_metric_value(t['metric'], t['value'], use_flops, generative)} "
            f"| {t['rank']} | {'yes' if t['agrees'] else '**no**'} |"
        )
    lines.append("")
    if disagreements:
        metrics = ", ".join(dict.fromkeys(t["metric"] for t in table if not t["agrees"]))
        lines.append(
            f"**Verdict: the measurement disagrees with the paper on {len(disagreements)} of "
            f"{len(table)} claims ({metrics}).**"
        )
        lines += [f"- **{d}**" for d in disagreements]
    else:
        lines.append("Verdict: the measured ranks agree with every claim.")
    return lines + chance_lines(bases) + sweeps


CLEARLY_ABOVE_CHANCE = 5  # x chance: below it, an accuracy rank says little about the method


def chance_lines(bases: dict[str, dict]) -> list[str]:
    """A caveat per framework whose base accuracy is below :data:`CLEARLY_ABOVE_CHANCE` times
    chance (1 / classes): too little training to rank it, whatever its rank says."""
    out = []
    for fw in FRAMEWORKS:
        row = bases[fw]
        c = row.get("num_labels")
        if row.get("task", "classification") != "classification" or not c:
            continue
        bar = CLEARLY_ABOVE_CHANCE / c
        if row["accuracy_mean"] < bar:
            out.append(
                f"- **Caveat: {title(fw)}'s accuracy {row['accuracy_mean']:.4f} is below "
                f"{CLEARLY_ABOVE_CHANCE}x chance ({CLEARLY_ABOVE_CHANCE}/{c} = {bar:.4f}): it has "
                f"not trained enough for its accuracy rank to say anything.**"
            )
    return out


def sweep_lines(
    rows: list[dict], bases: dict[str, dict], use_flops: bool, generative: bool = False
) -> list[str]:
    """Per framework run with several settings, a table of its sweep (the paper's Fig. 3):
    setting -> accuracy, bytes per client per round, client compute; its base point marked.
    Shown beside Table I, not used for its ranks."""
    lines = []
    for fw in dict.fromkeys(r["framework"] for r in rows):
        mine = [r for r in rows if r["framework"] == fw]
        if len(mine) < 2:
            continue
        keys = ", ".join(k.rsplit(".", 1)[-1] for k, _ in mine[0]["setting"])
        compute = "client FLOPs / round" if use_flops else "client s / round"
        lines += [
            "",
            f"{title(fw)} sweep over {keys} (not used for the ranks):",
            "",
            f"| {keys} | {'BLEU' if generative else 'accuracy'} | bytes up + down / client / round "
            f"| {compute} | Table I base |",
            "|" + " --- |" * 5,
        ]
        for r in mine:
            q = _quantities(r, use_flops)
            cells = [", ".join(str(v) for _, v in r["setting"])]
            cells += [_metric_value(m, q[m], use_flops, generative) for m in q]
            cells.append("yes" if bases.get(fw) is r else "")
            lines.append("| " + " | ".join(cells) + " |")
    return ["", "### Sweeps (the paper's Fig. 3)", *lines] if lines else []


# ----------------------------------------------------------------------------- the grid

# The paper's case study (arXiv 2501.04436, section V): one factor varied per framework.
# framework -> (preset, config key, values, run-name prefix)
PAPER_GRID = {
    "fedllm": ("paper-fedllm.toml", "model.lora_r", (4, 8, 16), "r"),
    "kd": ("paper-kd.toml", "kd.public_samples", (1000, 2500, 5002), "pub"),
    "split": ("paper-split.toml", "split.samples_per_round", (500, 1000, 1667), "spr"),
}
PAPER_SEEDS = (0, 1, 42)
PAPER_SAMPLES_PER_CLIENT = 1667

# --quick: the demo recipe, sized for a 2-core CPU. The sample-count factors of the grid (public
# samples, samples per round) shrink by the same ratio as the client data. Three rounds at
# lr 3e-3 (the paper's 1e-3 is for 100 rounds: at 1e-3 two rounds left every framework near
# chance); batches padded to their longest row, not to 80 (half the compute on Banking77).
QUICK = {
    "fed.rounds": 3,
    "data.samples_per_client": 48,
    "data.test_size": 120,
    "data.pad_to_max_length": False,
    "data.pad_multiple": 8,  # fewer batch widths, so fewer first-step measurements
    "model.head_init": "zero",  # uniform predictions at the start, not a random head's bias
    # PEFT's Gaussian A (std 1/r: 5x Kaiming's at r=8) makes each Adam step on B 5x larger;
    # at lr 3e-3 FedLLM r4 stayed at chance (0.8% after 3 rounds), so --quick uses Kaiming
    "model.lora_init": "default",
    "train.lr": 3e-3,
    "train.batch_size": 8,
    "train.autocast": "bf16",
    "train.group_by_length": True,
    # KD's global model learns only in b5: at T=2 and one pass a round it stayed at one class
    "kd.temperature": 1.0,
    # 5 server epochs: with 3 (and no b8) the global model collapsed to one class at 72 public
    # samples (0.017; 29 / 144: 0.108 / 0.117); with 5: 0.092 / 0.083 / 0.117
    "kd.server_epochs": 5,
    # No b8: with 48 private samples a client, distilling the near-chance global model over
    # 72 or 144 public samples undid the clients' learning (public 144: teacher 0.076 and
    # global 0.017 after 3 rounds; without b8 0.278 and 0.117). The full presets keep b8.
    "kd.client_distill_epochs": 0,
    "kd.client_eval": False,  # testing every KD client's model too would double KD's eval time
}
QUICK_SEEDS = (0,)  # one seed: 9 runs fit the 20-minute CPU budget (--seeds 0,1 for a spread)
SCALED_KEYS = ("kd.public_samples", "split.samples_per_round")

# Without a local GPT-2: the offline SmolLM2-135M (30 blocks), cut at half the depth like the
# GPT-2 preset's 6 of 12 (an assumption: the paper's text does not give the cut).
FALLBACK_MODEL = "smollm2-135m"
FALLBACK_SPLIT_LAYER = 15


def gpt2_available() -> bool:
    """Whether GPT-2 is in the local Hugging Face cache (this must work without network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    files = ("model.safetensors", "pytorch_model.bin")
    return isinstance(try_to_load_from_cache("gpt2", "config.json"), str) and any(
        isinstance(try_to_load_from_cache("gpt2", f), str) for f in files
    )


def paper_specs(
    quick: bool = False,
    seeds: tuple[int, ...] | None = None,
    model: str | None = None,
    overrides: list[str] | None = None,
    presets: Path | None = None,
) -> tuple[list[RunSpec], list[str]]:
    """The case-study grid and notes for the report (model choice, quick scaling)."""
    presets = presets or configs_dir()
    seeds = seeds or (QUICK_SEEDS if quick else PAPER_SEEDS)
    notes = []
    if model is None:
        model = "gpt2" if gpt2_available() else FALLBACK_MODEL
        if model == FALLBACK_MODEL:
            notes.append(
                f"GPT-2 is not in the local Hugging Face cache (no network): the offline "
                f"{FALLBACK_MODEL} stands in; Split-FedLLM cuts it at block "
                f"{FALLBACK_SPLIT_LAYER} of 30 (the GPT-2 preset: 6 of 12, an assumption)."
            )
    common = [f"model.name={model}"]
    if model == FALLBACK_MODEL:
        common.append(f"split.split_layer={FALLBACK_SPLIT_LAYER}")
    scale = 1.0
    if quick:
        common += [f"{k}={_literal(v)}" for k, v in QUICK.items()]
        scale = QUICK["data.samples_per_client"] / PAPER_SAMPLES_PER_CLIENT
        notes.append(
            f"--quick: {QUICK['fed.rounds']} rounds, {QUICK['data.samples_per_client']} "
            f"samples per client, {QUICK['data.test_size']} test samples, lr "
            f"{QUICK['train.lr']:g}, batch {QUICK['train.batch_size']} padded to its longest "
            f"row (rounded up to a multiple of {QUICK['data.pad_multiple']}), bf16 autocast, "
            f"a zero-initialized head, LoRA A Kaiming-uniform (PEFT's default: at lr "
            f"{QUICK['train.lr']:g} the paper's Gaussian A overshoots); KD: temperature {QUICK['kd.temperature']:g}, "
            f"{QUICK['kd.server_epochs']} server epochs a round and no client distillation (b8: "
            f"toward a near-chance global model it undid the clients' learning; the global "
            f"logits are still sent); public samples and samples per "
            f"round scaled by {scale:.4f} (= {QUICK['data.samples_per_client']}/"
            f"{PAPER_SAMPLES_PER_CLIENT}). Numbers show the method, not the paper's "
            f"accuracy."
        )
    specs = []
    for fw, (preset, key, values, prefix) in PAPER_GRID.items():
        for value in values:
            v = max(1, round(value * scale)) if key in SCALED_KEYS else value
            item = [*common, f"{key}={v}", *(overrides or [])]
            for seed in seeds:
                cfg = config.load(presets / preset, [*item, f"seed={seed}"])
                specs.append(RunSpec(f"{fw}-{prefix}{v}-s{seed}", cfg))
    return specs, notes


def _literal(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)
