"""Reading a text classification dataset: two columns of a CSV folder, or a hub dataset."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DataConfig
from .errors import DataError


@dataclass
class TextDataset:
    """Raw texts with integer labels in ``[0, num_labels)``; generation: prompts, their
    ``responses`` and the index of each row's group (its partition key) as label."""

    texts: list[str]
    labels: np.ndarray  # [N] int64
    responses: list[str] | None = None


def data_folder(cfg: DataConfig) -> Path | None:
    """``data.path`` (a relative path not found from here is also tried from the repository
    root, so a preset's ``../shared/data/e2e`` works from any directory), else
    :func:`default_data_dir`."""
    if not cfg.path:
        return default_data_dir()
    path = Path(cfg.path)
    if not path.is_absolute() and not path.exists():
        beside = Path(__file__).resolve().parents[2] / path
        if beside.exists():
            return beside
    return path


def default_data_dir() -> Path | None:
    """``$FEDTUNE_DATA``, else ``../shared/data/banking77`` beside the working dir or the repo."""
    candidates = [os.environ.get("FEDTUNE_DATA", "")]
    candidates.append(str(Path.cwd().parent / "shared" / "data" / "banking77"))
    candidates.append(str(Path(__file__).resolve().parents[3] / "shared" / "data" / "banking77"))
    for c in candidates:
        if c and (Path(c) / "train.csv").is_file():
            return Path(c)
    return None


def read_text(path: Path) -> str:
    """A data file's text; one-line DataError for a missing file, a file that is not UTF-8
    (with the line of the first bad byte) or holds a NUL byte (a binary file). A UTF-8 byte
    order mark (spreadsheet exports) is dropped, so it does not become part of a column name."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save it as UTF-8"
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DataError(f"{path}:{line}: holds a NUL byte (a binary file?)")
    return text


def csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and the rows of a CSV file, each row with its line number. One-line
    DataError for an empty file, a repeated column name, a row whose number of fields is not
    the header's (a missing label would otherwise become a class of its own) and for what the
    csv module rejects (mostly an unclosed quote that swallows the rest of the file)."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    rows: list[tuple[int, dict[str, str]]] = []
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: empty file (no header line)")
        twice = sorted({c for c in header if header.count(c) > 1})
        if twice:
            raise DataError(f"{path}: column {twice[0]!r} appears twice in the header")
        for fields in reader:
            if not fields:  # a blank line
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{path}:{reader.line_num}: {len(fields)} fields, but the header has "
                    f"{len(header)} ({', '.join(header)})"
                )
            rows.append((reader.line_num, dict(zip(header, fields, strict=True))))
    except csv.Error as e:
        raise DataError(
            f"{path}:{reader.line_num}: not valid CSV ({e}; an unclosed quote?)"
        ) from None
    return header, rows


def read_csv(path: Path, text_col: str, label_col: str) -> tuple[list[str], list[str]]:
    """Read two columns of a CSV; one-line DataError for a missing file, column or empty file,
    a malformed row (:func:`csv_rows`) and a row without a text or a label."""
    header, rows = csv_rows(path)
    for c in (text_col, label_col):
        if c not in header:
            raise DataError(f"{path}: no column {c!r} (columns: {', '.join(header) or 'none'})")
    texts, labels = [], []
    for line, row in rows:
        for c in (text_col, label_col):
            if not row[c].strip():
                raise DataError(f"{path}:{line}: empty {c!r}")
        texts.append(row[text_col])
        labels.append(row[label_col])
    if not texts:
        raise DataError(f"{path}: no rows")
    return texts, labels


def _load_hub(name: str, text_col: str, label_col: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            "no local data folder found (set data.path) and the 'datasets' package for "
            f"loading {name!r} from the hub is not installed"
        ) from None
    try:
        ds = datasets.load_dataset(name)
    except Exception as e:
        raise DataError(
            f"cannot load dataset {name!r} from the hub: {str(e).splitlines()[0]}"
        ) from None
    out = []
    for split in ("train", "test"):
        d = ds[split]
        col = label_col if label_col in d.column_names else "label"
        feat = d.features[col]
        labels = [feat.int2str(x) if hasattr(feat, "int2str") else str(x) for x in d[col]]
        out.append((list(d[text_col]), labels))
    return out


def load_text_classification(cfg: DataConfig) -> tuple[list[str], TextDataset, TextDataset]:
    """Load train/test. Returns ``(label_names, train, test)`` with labels indexed by the
    sorted set of training labels; a test label unseen in training is a DataError."""
    path = data_folder(cfg)
    if path is not None:
        if not path.is_dir():
            raise DataError(f"data folder not found: {path}")
        train = read_csv(path / "train.csv", cfg.text_column, cfg.label_column)
        test = read_csv(path / "test.csv", cfg.text_column, cfg.label_column)
    else:
        train, test = _load_hub(cfg.hub_name, cfg.text_column, cfg.label_column)
    names = sorted(set(train[1]))
    index = {n: i for i, n in enumerate(names)}
    unseen = sorted(set(test[1]) - set(names))
    if unseen:
        more = f" and {len(unseen) - 3} more" if len(unseen) > 3 else ""
        raise DataError(f"test labels unseen in training: {', '.join(unseen[:3])}{more}")
    if len(names) < 2:
        raise DataError(f"training data has {len(names)} label(s); need at least 2")

    def encode(texts: list[str], labels: list[str]) -> TextDataset:
        return TextDataset(texts, np.array([index[x] for x in labels], dtype=np.int64))

    return names, encode(*train), encode(*test)
