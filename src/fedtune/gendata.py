"""Generation data: prompt/response pairs from CSV, JSONL or the hub, rendered with the
tokenizer's chat template (or a plain one), tokenized with the prompt's length kept so the
loss falls on the response only, and grouped by prompt for multi-reference scoring.

A row becomes a pair by formatting ``data.prompt_template`` and ``data.response_template``
with its columns: E2E NLG is ``'{mr}'`` -> ``'{ref}'``, Alpaca/Dolly
``'{instruction}\\n\\n{input}'`` -> ``'{output}'``, and Banking77 run as generation is
``'{text}'`` -> ``'{category}'`` (the label's name is the response).
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DataConfig
from .errors import DataError
from .textdata import csv_rows, data_folder, read_text


@dataclass
class Pairs:
    """Rendered pairs and each row's group (the partition key: ``data.partition_column``,
    else the response itself, so a class-name response groups by class)."""

    prompts: list[str]
    responses: list[str]
    groups: list[str]


@dataclass
class GenSet:
    """Distinct test prompts with all their references (E2E has several per meaning
    representation): ``prompts[i]`` token ids (templated, ready to generate from),
    ``texts[i]`` the raw prompt, ``refs[i]`` its references."""

    prompts: list[list[int]]
    texts: list[str]
    refs: list[list[str]]

    def __len__(self) -> int:
        return len(self.prompts)


# ----------------------------------------------------------------------------- reading


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV (header line) or JSONL file as ``{column: text}``; one-line DataError for
    a missing, empty, non-UTF-8 or malformed file (:func:`fedtune.textdata.csv_rows`)."""
    rows: list[dict[str, str]] = []
    if path.suffix != ".jsonl":
        _header, numbered = csv_rows(path)
        rows = [row for _line, row in numbered]
    else:
        for n, line in enumerate(read_text(path).split("\n"), 1):  # not splitlines: U+2028 is text
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: a JSON object per line expected")
            rows.append({str(k): "" if v is None else str(v) for k, v in row.items()})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def split_file(folder: Path, split: str) -> Path | None:
    for ext in (".csv", ".jsonl"):
        if (folder / f"{split}{ext}").is_file():
            return folder / f"{split}{ext}"
    return None


def _hub_rows(name: str) -> tuple[list[dict], list[dict] | None]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"loading {name!r} from the hub needs the 'datasets' package (pip install datasets)"
        ) from None
    try:
        ds = datasets.load_dataset(name)
    except Exception as e:
        raise DataError(f"cannot load dataset {name!r}: {str(e).splitlines()[0]}") from None

    def rows(d) -> list[dict]:
        return [{k: "" if v is None else str(v) for k, v in r.items()} for r in d]

    return rows(ds["train"]), rows(ds["test"]) if "test" in ds else None


def load_rows(cfg: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and test rows from ``data.path`` (train/test .csv or .jsonl) or the hub; without
    a test split a seeded ``data.test_fraction`` of train is held out."""
    path = data_folder(cfg)
    if path is not None:
        if not path.is_dir():
            raise DataError(f"data folder not found: {path}")
        train_path = split_file(path, "train")
        if train_path is None:
            raise DataError(f"{path}: no train.csv or train.jsonl")
        train = read_rows(train_path)
        test_path = split_file(path, "test")
        test = read_rows(test_path) if test_path else None
    else:
        train, test = _hub_rows(cfg.hub_name)
    if test is None:
        perm = np.random.default_rng((seed, 3)).permutation(len(train))
        n = max(1, int(round(cfg.test_fraction * len(train))))
        if n >= len(train):
            raise DataError(f"{len(train)} rows cannot give a held-out test set")
        test = [train[i] for i in np.sort(perm[:n])]
        train = [train[i] for i in np.sort(perm[n:])]
    return train, test


# ----------------------------------------------------------------------------- rendering

_SLOT = re.compile(r"^(\w+)\[(\w+)\]$")


def fields_of(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f]
    except ValueError as e:  # a config from elsewhere (the schema checks its own)
        raise DataError(f"template {template!r} is malformed: {e}") from None


def column_value(row: dict[str, str], column: str) -> str:
    """``row[column]``, or for ``'mr[name]'`` the slot ``name`` of an E2E meaning
    representation ``'name[Alimentum], area[city centre]'`` in column ``mr`` ('' if absent)."""
    m = _SLOT.match(column)
    if m is None:
        return row[column]
    found = re.search(rf"(?:^|,\s*){re.escape(m.group(2))}\[([^\]]*)\]", row[m.group(1)])
    return found.group(1) if found else ""


def render(cfg: DataConfig, rows: list[dict[str, str]], where: str) -> Pairs:
    """Format every row's prompt and response (stripped) and its group."""
    cols = set(rows[0])
    needed = fields_of(cfg.prompt_template) + fields_of(cfg.response_template)
    if cfg.partition == "column":
        m = _SLOT.match(cfg.partition_column)
        needed.append(m.group(1) if m else cfg.partition_column)
    for c in needed:
        if c not in cols:
            raise DataError(f"{where}: no column {c!r} (columns: {', '.join(sorted(cols))})")
    prompts, responses, groups = [], [], []
    for i, row in enumerate(rows, 1):
        try:
            prompts.append(cfg.prompt_template.format(**row).strip())
            responses.append(cfg.response_template.format(**row).strip())
        except KeyError as e:  # JSONL rows need not share the first row's keys
            raise DataError(f"{where} row {i}: no column {e}") from None
        except (IndexError, ValueError, AttributeError) as e:
            raise DataError(f"{where} row {i}: cannot format the templates: {e}") from None
        # An empty pair teaches nothing and scores as a miss: a row without its text.
        for what, text, template in (
            ("prompt", prompts[-1], cfg.prompt_template),
            ("response", responses[-1], cfg.response_template),
        ):
            if not text:
                raise DataError(
                    f"{where} row {i}: empty {what} (data.{what}_template {template!r})"
                )
        part = cfg.partition == "column"
        groups.append(column_value(row, cfg.partition_column) if part else responses[-1])
    return Pairs(prompts, responses, groups)


def whole_groups(prompts: list[str], order: np.ndarray, n: int) -> np.ndarray:
    """Rows of the prompts met first in ``order`` until they hold at least ``n`` rows: a
    test subset that keeps every reference of its prompts (for one row per prompt, simply
    ``order[:n]``)."""
    rows: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        rows.setdefault(p, []).append(i)
    keep: list[int] = []
    for i in order:
        if len(keep) >= n:
            break
        group = rows.pop(prompts[i], None)
        if group is not None:
            keep.extend(group)
    return np.asarray(keep, dtype=np.int64)


def uses_chat(tokenizer, mode: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "chat" and not has:
        raise DataError("data.chat_template=chat but the tokenizer has no chat template")
    return has and mode != "plain"


def prompt_text(tokenizer, prompt: str, chat: bool) -> str:
    """The text the model sees before its response: the chat template's user turn and
    assistant header, or ``prompt + '\\n'``."""
    if chat:
        msgs = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


def encode_prompts(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    """Token ids of the templated prompts (a plain template gets the tokenizer's own
    special tokens, e.g. a BOS; a chat template already holds them)."""
    texts = [prompt_text(tokenizer, p, chat) for p in prompts]
    return tokenizer(texts, add_special_tokens=not chat)["input_ids"]


def encode_pairs(
    tokenizer, pairs: Pairs, max_length: int, chat: bool
) -> tuple[list[list[int]], np.ndarray]:
    """Prompt + response + end-of-sequence token ids, at most ``max_length`` each, and each
    row's prompt length ``[N]`` (the loss starts after it). A prompt that leaves no room keeps
    its last ``max_length - 1`` tokens (the assistant header), the response is cut to fit."""
    eos = tokenizer.eos_token or ""
    prompts = encode_prompts(tokenizer, pairs.prompts, chat)
    responses = tokenizer([r + eos for r in pairs.responses], add_special_tokens=False)
    ids, plen = [], []
    for p, r in zip(prompts, responses["input_ids"], strict=True):
        p = p[-(max_length - 1) :]
        ids.append(p + r[: max_length - len(p)])
        plen.append(len(p))
    return ids, np.asarray(plen, dtype=np.int64)


def eval_set(tokenizer, pairs: Pairs, chat: bool) -> GenSet:
    """The distinct prompts of ``pairs`` (first-appearance order) with all their references."""
    refs: dict[str, list[str]] = {}
    for p, r in zip(pairs.prompts, pairs.responses, strict=True):
        refs.setdefault(p, []).append(r)
    texts = list(refs)
    return GenSet(encode_prompts(tokenizer, texts, chat), texts, [refs[t] for t in texts])
