import dataclasses
from pathlib import Path

import pytest

from fedtune import config
from fedtune.errors import ConfigError


def test_presets_load_and_roundtrip(tmp_path):
    for name in ("demo-fedllm", "paper-fedllm"):
        cfg = config.load(f"configs/{name}.toml")
        p = tmp_path / f"{name}.toml"
        p.write_text(config.to_toml(cfg))
        assert config.load(p) == cfg


def test_paper_preset_matches_the_paper():
    cfg = config.load("configs/paper-fedllm.toml")
    assert (cfg.model.name, cfg.model.lora_alpha, cfg.model.lora_dropout) == ("gpt2", 32.0, 0.1)
    assert (cfg.model.max_length, cfg.train.lr, cfg.train.optimizer) == (80, 1e-3, "adam")
    assert (cfg.data.public_size, cfg.data.num_clients, cfg.data.samples_per_client) == (
        5002,
        3,
        1667,
    )
    assert cfg.fed.rounds == 100


def test_overrides_are_typed():
    cfg = config.load(
        None,
        [
            "train.lr=5e-4",
            "seed=42",
            "model.target_modules=q_proj,v_proj",
            "progress=false",
            "model.lora_alpha=16",
        ],
    )
    assert cfg.train.lr == 5e-4 and cfg.seed == 42 and cfg.progress is False
    assert cfg.model.target_modules == ("q_proj", "v_proj")
    assert cfg.model.lora_alpha == 16.0 and isinstance(cfg.model.lora_alpha, float)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'; valid keys here: train.optimizer"),
        ("bogus=1", "unknown config key 'bogus'"),
        ("train.batch_size=abc", "train.batch_size: expected an integer"),
        ("train.batch_size=0", "train.batch_size: must be >= 1"),
        ("fed.framework=nope", "fed.framework: 'nope' is not one of"),
        ("model.lora_dropout=1.5", "model.lora_dropout: must be in [0, 1)"),
        ("train=3", "config key train: expected a table"),
        ("noequals", "is not of the form key=value"),
    ],
)
def test_bad_input_gives_one_line_error(override, fragment):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)


def test_describe_documents_every_key():
    text = config.describe()
    for section in ("model", "data", "train", "fed", "kd", "split"):  # kd, split: registered
        sub = getattr(config.RunConfig(), section)
        for f in dataclasses.fields(sub):
            assert f"{section}.{f.name} =" in text


def test_configs_are_frozen():
    cfg = config.RunConfig()
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]


def test_comma_lists_from_the_command_line_are_typed():
    cfg = config.load(
        None,
        [
            "fed.client_slowdown=1,2.5,3",
            "data.client_sizes=10,20,30",
            "data.partition=sizes",
            "model.target_modules=q_proj,v_proj",
        ],
    )
    assert cfg.fed.client_slowdown == (1.0, 2.5, 3.0) and cfg.data.client_sizes == (10, 20, 30)
    assert cfg.model.target_modules == ("q_proj", "v_proj")
    with pytest.raises(ConfigError, match="fed.client_slowdown: expected a number, got 'x'"):
        config.load(None, ["fed.client_slowdown=1,x,3"])


def test_fault_and_validation_keys_are_checked():
    cfg = config.load(
        None,
        [
            "fed.dropout=0.3",
            "fed.aggregator=trimmed_mean",
            "fed.trim_ratio=0.2",
            "kd.aggregate=median",
        ],
    )
    assert (cfg.fed.dropout, cfg.fed.aggregator, cfg.kd.aggregate) == (
        0.3,
        "trimmed_mean",
        "median",
    )
    for bad in (
        "fed.deadline_s=-1",
        "fed.max_update_norm=-1",
        "fed.max_retries=-1",
        "fed.poison_scale=0",
        "fed.checkpoint_every=-1",
        "fed.on_too_few=wait",
    ):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            config.load(None, [bad])


def test_pad_multiple_is_checked():
    assert config.RunConfig().data.pad_multiple == 1
    assert config.load(None, ["data.pad_multiple=8"]).data.pad_multiple == 8
    for bad in ("0", "-8", "4096"):
        with pytest.raises(ConfigError, match=r"data.pad_multiple: must be in \[1, 1024\]"):
            config.load(None, [f"data.pad_multiple={bad}"])


def test_pad_to_max_length_and_the_paper_presets():
    """data.pad_to_max_length is off by default (dynamic padding) and on in the paper presets,
    which also reset FedLLM's and Split-FedLLM's optimizer every round (an assumption)."""
    assert config.RunConfig().data.pad_to_max_length is False
    assert config.load(None, ["data.pad_to_max_length=true"]).data.pad_to_max_length is True
    with pytest.raises(ConfigError, match="data.pad_to_max_length: expected true/false"):
        config.load(None, ["data.pad_to_max_length=maybe"])
    for framework, optimizer_state in (("fedllm", "reset"), ("kd", "keep"), ("split", "reset")):
        cfg = config.load(f"configs/paper-{framework}.toml")
        assert cfg.fed.framework == framework
        assert (cfg.data.pad_to_max_length, cfg.model.max_length) == (True, 80)
        assert (cfg.train.optimizer_state, cfg.model.lora_init) == (optimizer_state, "gaussian")


def test_every_preset_loads():
    presets = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))
    assert len(presets) >= 12
    for p in presets:
        cfg = config.load(p)
        assert cfg.name == p.stem, p  # each preset names itself
