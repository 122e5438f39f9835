"""Frozen dataclass configs, TOML presets and ``key=value`` overrides.

A run is described by one :class:`RunConfig`. Its scalar fields are top-level TOML keys; each
section (``model``, ``data``, ``train``, ``fed``, and one per registered framework that has
options, e.g. ``kd``, ``split``) is a TOML table. On the command line a key is addressed by its
dotted path: ``train.lr=1e-4``, ``seed=1``. Every field carries a ``help`` string, so
``fedtune run --help`` documents every key. The schema is in :mod:`.schema`, reading and
writing in :mod:`.io`.
"""

from dataclasses import replace

from .io import (
    describe,
    from_dict,
    load,
    merge_overrides,
    parse_override,
    resume_key,
    to_dict,
    to_toml,
    with_overrides,
)
from .schema import (
    DataConfig,
    EvalConfig,
    FedConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    check,
    check_device_name,
    complete_sections,
    opt,
    section_classes,
    validate,
)

__all__ = [
    "RunConfig",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "FedConfig",
    "EvalConfig",
    "check",
    "check_device_name",
    "opt",
    "load",
    "from_dict",
    "to_dict",
    "to_toml",
    "describe",
    "with_overrides",
    "merge_overrides",
    "parse_override",
    "resume_key",
    "complete_sections",
    "section_classes",
    "validate",
    "replace",
]
