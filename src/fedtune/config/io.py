"""Configs in and out: nested dicts and TOML, ``key=value`` overrides, ``--help`` text."""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .schema import SHARED_SECTIONS, RunConfig, _fields, section_classes


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a TOML/CLI value to the field's declared type, or raise a one-line ConfigError."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):  # "1,2" from the command line: numbers read as numbers
            value = [
                v if inner is str else _literal(v)
                for v in (s.strip() for s in value.split(","))
                if v
            ]
        elif not isinstance(value, list | tuple):
            value = [value]
        return tuple(_coerce(v, inner, key) for v in value)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"config key {key}: unsupported type {tp}")  # pragma: no cover
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key {key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):  # nan slips through range checks, inf through most
                raise ConfigError(f"config key {key}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"config key {key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # a true/false option that also has 'auto'
            return str(value).lower()
        raise ConfigError(f"config key {key}: expected a string, got {value!r}")
    raise ConfigError(f"config key {key}: unsupported type {tp}")  # pragma: no cover


def _literal(raw: str) -> Any:
    """A TOML literal (number, boolean), else the string itself."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    names = _fields(cls)
    kwargs: dict[str, Any] = {}
    sections = section_classes() if cls is RunConfig else {}
    built = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path}: expected a table [{path}]")
            built.append((key, _build(sections[key], value, f"{path}.")))
            continue
        if key not in names:
            valid = ", ".join(f"{prefix}{n}" for n in [*names, *sections])
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {valid}")
        tp = hints[key]
        if is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path}: expected a table [{path}]")
            kwargs[key] = _build(tp, value, f"{path}.")
        else:
            kwargs[key] = _coerce(value, tp, path)
            choices = names[key].metadata.get("choices")
            if choices and kwargs[key] not in choices:
                raise ConfigError(
                    f"config key {path}: {kwargs[key]!r} is not one of {', '.join(choices)}"
                )
    if built:
        kwargs["sections"] = tuple(built)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from nested dicts (as parsed from TOML)."""
    return _build(RunConfig, data, "")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value``; the value is read as a TOML literal, else kept as a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    return key.split("."), _literal(raw)


def merge_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings onto nested config dicts (returns a new dict)."""
    out = _deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[path[-1]] = value
    return out


def _deepcopy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a TOML preset (or defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"config file {p} is not UTF-8 text (TOML is UTF-8)") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    return from_dict(merge_overrides(data, overrides or []))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists), suitable for TOML or JSON. Of the framework
    sections, those of the built-in frameworks and of the run's own framework: a config file
    then loads wherever fedtune is installed, with or without other plug-ins registered."""
    out: dict[str, Any] = {}
    for f in _fields(type(cfg)).values():
        v = getattr(cfg, f.name)
        if is_dataclass(v):
            out[f.name] = to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    if isinstance(cfg, RunConfig):
        from .. import frameworks

        keep = {*frameworks.builtin_names(), cfg.fed.framework, *SHARED_SECTIONS}
        out.update({n: to_dict(section) for n, section in cfg.sections if n in keep})
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: RunConfig) -> str:
    """Serialise a config as TOML that :func:`load` reads back to an equal config."""
    d = to_dict(cfg)
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def with_overrides(cfg: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """Programmatic overrides: ``with_overrides(cfg, train={"lr": 1e-4}, seed=1)``."""
    d = to_dict(cfg)
    for k, v in sections.items():
        if isinstance(v, dict):
            d.setdefault(k, {}).update(v)
        else:
            d[k] = v
    return from_dict(d)


def describe() -> str:
    """Every config key with its type, default and help: the text of ``fedtune run --help``."""
    rows: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = _hints(cls)
        for f in _fields(cls).values():
            tp = hints[f.name]
            if is_dataclass(tp):
                rows.append(f"\n[{prefix}{f.name}]")
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
            if typing.get_origin(tp) is tuple:
                tname = f"list[{typing.get_args(tp)[0].__name__}]"
            choices = f.metadata.get("choices")
            extra = f" (one of: {', '.join(choices)})" if choices else ""
            rows.append(f"  {prefix}{f.name} = {_toml_value(to_dict_value(default))}  [{tname}]")
            rows.append(f"      {f.metadata.get('help', '')}{extra}")

    walk(RunConfig, "")
    for name, cls in section_classes().items():
        rows.append(f"\n[{name}]")
        walk(cls, f"{name}.")
    return "\n".join(rows)


def resume_key(cfg: RunConfig) -> dict[str, Any]:
    """The part of ``cfg`` a run's results depend on (``to_dict`` minus display-only keys and
    the sections of other frameworks): an unfinished run is resumed only under an equal key."""
    d = to_dict(cfg)
    d.pop("progress")
    for name in section_classes():
        if name not in (cfg.fed.framework, *SHARED_SECTIONS):
            d.pop(name, None)
    return d


def to_dict_value(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
