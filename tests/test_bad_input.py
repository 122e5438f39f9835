"""Bad input from users, through the CLI in-process: every malformed config, data file, run
directory, checkpoint and command-line value is exit code 2 and ONE stderr line
``fedtune: error: ...`` (no traceback, nothing silently accepted), and a run that fails
before its first round leaves no run directory behind (a rerun is not refused as an
unfinished run)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import tiny_cfg
from fedtune import config
from fedtune.cli import main
from fedtune.runtime import checkpoint, simulate


def cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_line(rc: int, err: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("fedtune: error:"), err
    assert fragment in lines[0] and "Traceback" not in err, err


@pytest.fixture(scope="session")
def preset(synth_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preset") / "tiny.toml"
    path.write_text(config.to_toml(tiny_cfg(synth_dir, fed={"rounds": 1})))
    return path


@pytest.fixture(scope="session")
def finished(synth_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    simulate(tiny_cfg(synth_dir, fed={"rounds": 1}), out, log=None)
    return out


class Stop(Exception):
    pass


@pytest.fixture(scope="session")
def half(synth_dir, tmp_path_factory) -> Path:
    """A run of 2 rounds interrupted after round 1's checkpoint."""

    def log(line: str) -> None:
        if line.startswith("round 1/"):
            raise Stop

    out = tmp_path_factory.mktemp("half") / "run"
    with pytest.raises(Stop):
        simulate(tiny_cfg(synth_dir, fed={"rounds": 2}), out, log=log)
    return out


# ----------------------------------------------------------------------------- configs

CONFIG_CASES = [
    (["seed = = 3\n"], "is not valid TOML"),
    ([b'name = "\xff"\n'], "is not UTF-8 text"),
    (["seeed = 1\n"], "unknown config key 'seeed'"),
    (["[optim]\nlr = 1\n"], "unknown config key 'optim'"),
    (["model = 3\n"], "config key model: expected a table"),
    (['[fed]\nrounds = "three"\n'], "fed.rounds: expected an integer"),
    (["fed.rounds=2.5"], "fed.rounds: expected an integer, got 2.5"),
    (["train.lr=-1"], "train.lr: must be > 0"),
    (["train.lr=inf"], "train.lr: expected a finite number, got inf"),
    (["train.lr=nan"], "train.lr: expected a finite number, got nan"),
    (["data.num_clients=0"], "data.num_clients: must be >= 1"),
    (["model.lora_r=0"], "model.lora_r: must be >= 1"),
    (["fed.min_clients=5"], "fed.min_clients: 5 is more than data.num_clients=3"),
    (["data.client_sizes=10,10,10"], "data.client_sizes: only with data.partition=sizes"),
    (["data.partition_column=x"], "data.partition_column: only with data.partition=column"),
    (["seed=-1"], "seed: must be >= 0"),
    (["device=gpu"], "device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["fed.rounds"], "is not of the form key=value"),
    (["=3"], "has an empty key"),
    (["fed=3"], "config key fed: expected a table"),
    (["fed.rounds.x=1"], "'rounds' is not a section"),
    (["kd.foo=1"], "unknown config key 'kd.foo'"),
    (["kd.temperature=0"], "kd.temperature: must be > 0"),
    (["split.topk_ratio=2"], "split.topk_ratio: must be in (0, 1]"),
    (["data.prompt_template={text"], "data.prompt_template: '{text' is not a valid template"),
    (["data.response_template={0}"], "fields name columns"),
    (["fed.framework=nope"], "fed.framework: 'nope' is not one of"),
]


@pytest.mark.parametrize(("items", "fragment"), CONFIG_CASES, ids=lambda x: str(x)[:40])
def test_bad_configs(capsys, tmp_path, preset, items, fragment):
    """A preset file (``str`` with a newline, or bytes) or an override on the tiny preset."""
    raw = items[0]
    if isinstance(raw, bytes) or "\n" in raw:
        path = tmp_path / "bad.toml"
        path.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
        args = [path]
    else:
        args = [preset, *items]
    out = tmp_path / "run"
    assert_one_line(*cli(capsys, "run", *args, "--out", out, "--no-progress"), fragment)
    assert not out.exists()


FRAMEWORK_CASES = [
    (["fed.framework=kd", "data.public_size=0"], "KD-FedLLM needs a public set"),
    (["fed.framework=kd", "kd.public_samples=500"], "kd.public_samples: 500 > public set"),
    (["fed.framework=kd", "kd.level=sequence"], "'sequence' needs a generation task"),
    (["fed.framework=split", "split.split_layer=99"], "split.split_layer: client 0 split"),
    (["fed.framework=split", "split.client_split_layers=1,2"], "needs 3 values"),
    (["model.target_modules=nope_proj"], "cannot apply LoRA to 'tiny-gpt2'"),
]


@pytest.mark.parametrize(("overrides", "fragment"), FRAMEWORK_CASES, ids=lambda x: str(x)[:40])
def test_framework_errors_leave_no_run_directory(capsys, tmp_path, preset, overrides, fragment):
    """Found only once the model is loaded and the framework is built: still no run
    directory, so the same command fails the same way again (not "continue it with
    --resume")."""
    out = tmp_path / "run"
    for _ in range(2):
        rc, err = cli(capsys, "run", preset, *overrides, "--out", out, "--no-progress")
        assert_one_line(rc, err, fragment)
        assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine(capsys, tmp_path, preset):
    out = tmp_path / "run"
    rc, err = cli(capsys, "run", preset, "device=cuda", "--out", out, "--no-progress")
    assert_one_line(rc, err, "device cuda: no CUDA device is available here")
    assert not out.exists()


# ----------------------------------------------------------------------------- data files

HDR = "text,category\n"
ROWS = "".join(f"{w} card,card\n{w} cash,cash\n" for w in ("my", "the", "a", "new") * 10)
BAD = HDR + ROWS  # 81 good lines: a bad row appended is line 82, data row 81
GEN = ["data.task=generation", "data.response_template={category}"]
JL = '{"text": "a", "category": "b"}\n'

# id -> (train file, its content, extra overrides, fragment); test.csv is always fine
DATA_CASES = {
    "empty": ("train.csv", "", [], "empty file (no header line)"),
    "header only": ("train.csv", HDR, [], "no rows"),
    "not utf-8": ("train.csv", BAD.encode() + b"caf\xe9,card\n", [], ":82: not UTF-8 text"),
    "nul byte": ("train.csv", BAD + "a\x00b,card\n", [], ":82: holds a NUL byte"),
    "no label column": ("train.csv", "text,intent\n" + ROWS, [], "no column 'category'"),
    "row without label": ("train.csv", BAD + "lonely\n", [], ":82: 1 fields, but the header"),
    "empty label": ("train.csv", BAD + "some text,\n", [], ":82: empty 'category'"),
    "empty text": ("train.csv", BAD + " ,card\n", [], ":82: empty 'text'"),
    "ragged": ("train.csv", BAD + "a,card,more\n", [], ":82: 3 fields, but the header has 2"),
    "unclosed quote": ("train.csv", BAD + '"' + "x" * 140_000, [], "an unclosed quote?"),
    "column twice": ("train.csv", "text,text,category\n", [], "column 'text' appears twice"),
    "one class": ("train.csv", HDR + "a,card\nb,card\n", [], "training data has 1 label(s)"),
    "few rows": ("train.csv", HDR + "a,card\nb,cash\n", [], "2 samples cannot feed 3 clients"),
    "gen: jsonl not json": ("train.jsonl", JL + "{oops\n", GEN, ":2: not JSON"),
    "gen: jsonl not utf-8": ("train.jsonl", b'{"text": "\xe9"}\n', GEN, ":1: not UTF-8 text"),
    "gen: jsonl list": ("train.jsonl", "[1, 2]\n", GEN, ":1: a JSON object per line expected"),
    "gen: jsonl row lacks": ("train.jsonl", JL + '{"text": "c"}\n', GEN, "row 2: no column"),
    "gen: ragged": ("train.csv", BAD + "a,card,more\n", GEN, ":82: 3 fields"),
    "gen: empty response": ("train.csv", BAD + "x,\n", GEN, "train row 81: empty response"),
    "gen: template column": ("train.csv", "mr,ref\na,b\n", GEN, "train: no column 'text'"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_files(capsys, tmp_path, preset, case):
    name, train, extra, fragment = DATA_CASES[case]
    data = tmp_path / "data"
    data.mkdir()
    (data / name).write_bytes(train if isinstance(train, bytes) else train.encode())
    (data / "test.csv").write_text(HDR + "x card,card\n")
    out = tmp_path / "run"
    args = [f"data.path={data}", "data.public_size=0", *extra, "--out", out, "--no-progress"]
    assert_one_line(*cli(capsys, "run", preset, *args), fragment)
    assert not out.exists()


# ----------------------------------------------------------------------------- run directories


def test_bad_run_directories(capsys, tmp_path, preset, finished, half):
    afile = tmp_path / "afile"
    afile.write_text("x")
    garbled = tmp_path / "garbled"
    shutil.copytree(half, garbled)
    (garbled / "config.toml").write_text("[fed\n")
    p = preset
    cases = [
        (["run", p, "--out", afile], f"--out {afile} is a file, not a folder"),
        (["run", p, "--out", afile / "run"], f"{afile} is a file, not a folder"),
        (["run", p, "--out", ""], "--out: empty path"),
        (["run", p, "--out", finished], "already holds a run; choose another --out"),
        (["run", p, "--out", half], f"holds an unfinished run; continue it with --resume {half}"),
        (["run", "--resume", finished], "the run has finished"),
        (["run", "--resume", tmp_path / "nowhere"], "no config.toml (not a run directory)"),
        (["run", "--resume", afile], "is a file, not a folder"),
        (["run", "--resume", ""], "--resume: empty path"),
        (["run", "--resume", half, "--out", tmp_path / "x"], "--resume RUN_DIR reads"),
        (["run", "--resume", garbled], "config.toml is not valid TOML"),
    ]
    before = (finished / "metrics.jsonl").read_bytes()
    for argv, fragment in cases:
        assert_one_line(*cli(capsys, *argv, "--no-progress"), fragment)
    assert (finished / "metrics.jsonl").read_bytes() == before
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- checkpoints


def _gs(m: dict) -> dict:  # the global state in the checkpoint's JSON tree
    return m["server"]["global_state"]


def _t0(m: dict) -> str:  # the safetensors name of its first tensor
    return next(iter(_gs(m).values()))["__tensor__"]


def _adam(m: dict) -> str:  # ... and of client 0's first Adam exp_avg
    return m["clients"]["0"]["opt_state"]["state"]["__items__"][0][1]["exp_avg"]["__tensor__"]


def _put(m: dict, t: dict, name: str, fn) -> None:
    t[name] = fn(t[name])


NAN = float("nan")
# id -> (edit(meta, tensors), fragment); None: the metadata is not JSON; "cut": truncated file
CHECKPOINT_CASES = {
    "nan tensor": (lambda m, t: _put(m, t, _t0(m), lambda x: x * NAN), "holds NaN or Inf"),
    "inf in adam": (lambda m, t: _put(m, t, _adam(m), lambda x: x / 0), "clients.0.opt_state"),
    "shape": (lambda m, t: _put(m, t, _t0(m), lambda x: x[:1]), "float32, expected ("),
    "dtype": (lambda m, t: _put(m, t, _t0(m), lambda x: x.half()), "float16, expected"),
    "missing tensor": (lambda m, t: _gs(m).popitem(), "server.global_state: missing '"),
    "extra tensor": (lambda m, t: _gs(m).update(b={"__tensor__": _t0(m)}), "unexpected 'b'"),
    "no config": (lambda m, t: m.pop("config"), "the checkpoint has no config"),
    "other config": (lambda m, t: m["config"]["train"].update(lr=0.5), "another config"),
    "version": (lambda m, t: m.update(version=1), "checkpoint version 1 is not 2"),
    "round past the end": (lambda m, t: m.update(round=99), "round 99 is not in [0, 2]"),
    "round not a number": (lambda m, t: m.update(round="1"), "round '1' is not in [0, 2]"),
    "history": (lambda m, t: m.update(history="x"), "history is not a list of rounds"),
    "client missing": (lambda m, t: m["clients"].pop("0"), "clients: missing '0'"),
    "ledger": (lambda m, t: m.update(ledger=[[1, 2]]), "byte ledger is malformed"),
    "server not a table": (lambda m, t: m.update(server=7), "server: expected a table"),
    "rng": (lambda m, t: m["rng"].update(torch=[1]), "RNG states are malformed"),
    "metadata not JSON": (None, "is unreadable: JSONDecodeError"),
    "truncated": ("cut", "is unreadable: SafetensorError"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_damaged_checkpoints_are_refused_before_use(capsys, tmp_path, half, case):
    edit, fragment = CHECKPOINT_CASES[case]
    run = tmp_path / "run"
    shutil.copytree(half, run)
    file = run / checkpoint.FILE
    if edit == "cut":
        file.write_bytes(file.read_bytes()[:1000])
    else:
        with safe_open(str(file), framework="pt") as f:
            meta = json.loads(f.metadata()["fedtune_checkpoint"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        if edit is not None:
            edit(meta, tensors)
        text = json.dumps(meta) if edit else "{oops"
        save_file(tensors, file, metadata={"fedtune_checkpoint": text})
    damaged, metrics = file.read_bytes(), (run / "metrics.jsonl").read_bytes()
    assert_one_line(*cli(capsys, "run", "--resume", run, "--no-progress"), fragment)
    assert not (run / "summary.json").exists()  # nothing of it was used or overwritten
    assert file.read_bytes() == damaged and (run / "metrics.jsonl").read_bytes() == metrics


# ----------------------------------------------------------------------------- using a run


def _copy(finished: Path, to: Path) -> Path:
    shutil.copytree(finished, to)
    return to


def _weights(fn):
    def edit(run: Path) -> None:
        path = run / "adapter" / "adapter_model.safetensors"
        w = load_file(path)
        fn(w, next(k for k in w if "lora_A" in k))
        save_file(w, path)

    return edit


def _labels(value):
    def edit(run: Path) -> None:
        path = run / "adapter" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "id2label": value}))

    return edit


ADAPTER = "adapter/adapter_model.safetensors"
USE_CASES = {
    "adapter garbage": (lambda r: (r / ADAPTER).write_bytes(b"junk"), "cannot read"),
    "adapter nan": (_weights(lambda w, k: w[k].fill_(NAN)), "holds NaN or Inf"),
    "adapter shape": (_weights(lambda w, k: w.update({k: w[k][:1]})), "does not fit 'tiny-gpt2'"),
    "adapter lacks a tensor": (_weights(lambda w, k: w.pop(k)), "does not hold the 9 trained"),
    "id2label a list": (_labels(["a", "b"]), "holds no label names"),
    "id2label one class": (_labels({"0": "a"}), "id2label must name 2 or more classes"),
    "id2label wrong count": (_labels({"0": "a", "1": "b", "2": "c"}), "size mismatch"),
    "config garbage": (lambda r: (r / "config.toml").write_text("[model\n"), "not valid TOML"),
    "no adapter": (lambda r: shutil.rmtree(r / "adapter"), "has no trained adapter"),
}


@pytest.mark.parametrize("case", list(USE_CASES))
def test_predict_on_damaged_runs(capsys, tmp_path, finished, case):
    edit, fragment = USE_CASES[case]
    run = _copy(finished, tmp_path / "run")
    edit(run)
    assert_one_line(*cli(capsys, "predict", run, "some text"), fragment)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["predict", "RUN", "hi", "--device", "gpu"], "--device: expected 'auto', 'cpu'"),
        (["predict", "NOWHERE", "hi"], "is not a run directory (no config.toml)"),
        (["generate", "RUN", "hi"], "use predict, not generate"),
        (["generate", "RUN", "hi", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
        (["generate", "RUN", "hi", "--max-new-tokens", "x"], "expected an integer, got 'x'"),
        (["run", "PRESET", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "the following arguments are required: command"),
    ],
)
def test_bad_command_line_values(capsys, tmp_path, finished, preset, argv, fragment):
    subst = {"RUN": finished, "NOWHERE": tmp_path / "nowhere", "PRESET": preset}
    assert_one_line(*cli(capsys, *[subst.get(a, a) for a in argv]), fragment)


# ----------------------------------------------------------------------------- compare, plot


def test_bad_compare_and_plot_inputs(capsys, tmp_path, preset, finished):
    afile = tmp_path / "afile"
    afile.write_text("x")
    broken = {}
    for name, (file, text) in {
        "summary": ("summary.json", "{trunc"),
        "summary keys": ("summary.json", "{}"),
        "metrics": ("metrics.jsonl", '{"round": 1}\n'),
        "config": ("config.toml", "[x\n"),
    }.items():
        broken[name] = _copy(finished, tmp_path / name)
        (broken[name] / file).write_text(text)
    out = tmp_path / "cmp"
    fw = ["--frameworks", "fedllm"]
    cases = [
        (["compare", preset, "--out", out, "--seeds", "", *fw], "--seeds: no seed given"),
        (["compare", preset, "--out", out, "--seeds", "0,0", *fw], "--seeds: 0 is given twice"),
        (["compare", preset, "--out", out, "--seeds", "-1", *fw], "seeds must be >= 0"),
        (["compare", preset, "--out", out, "--frameworks", ""], "no framework given"),
        (["compare", preset, "--out", out, "--frameworks", "fedllm,fedllm"], "given twice"),
        (["compare", preset, "--out", out, "--frameworks", "nope"], "'nope' is not one of"),
        (["compare", preset, "--out", afile, *fw], "--out"),
        (["plot", broken["summary"]], "summary.json is not valid JSON"),
        (["plot", broken["summary keys"]], "summary.json is not a run summary"),
        (["plot", broken["metrics"]], "metrics.jsonl:1: not a round record"),
        (["plot", broken["config"]], "config.toml is not valid TOML"),
        (["plot", finished, "--out", afile], "--out"),
        (["plot", tmp_path / "nothing"], "no finished run"),
    ]
    for argv, fragment in cases:
        assert_one_line(*cli(capsys, *argv), fragment)
    assert not out.exists()


# ----------------------------------------------------------------------------- flower arguments


@pytest.fixture
def nothing_starts(monkeypatch):
    """Argument checks only: anything that would start a process fails the test instead."""
    from fedtune.flower import deploy, local

    def started(*a, **k):
        raise AssertionError("a Flower process would have started")

    monkeypatch.setattr(local, "LocalFederation", started)
    monkeypatch.setattr(deploy, "run_supernode", started)
    monkeypatch.setattr(subprocess, "run", started)
    monkeypatch.setattr("os.execve", started)


# P: the tiny preset, O: a new run directory, F: a finished run, N: a path that does not exist
FLOWER_CASES = [
    (["local", "P", "--out", "O", "--insecure", "--nodes", "2"], "--nodes 2: must equal"),
    (["local", "P", "--out", "O", "--tls", "--insecure"], "--insecure contradicts --tls"),
    (["local", "P", "--out", "O", "--insecure", "--data-dirs", "a,b"], "2 folders for 3 nodes"),
    (["local", "P", "--out", "O", "--insecure", "--timeout", "0"], "--timeout: must be > 0"),
    (["local", "P", "--out", "F", "--insecure"], "already holds a run"),
    (["local", "P", "fed.rounds=0", "--out", "O", "--insecure"], "fed.rounds: must be >= 1"),
    (["run", "P", "--out", "O", "--superlink", "host", "--insecure"], "expected host:port"),
    (["run", "P", "--out", "F", "--superlink", "h:1", "--insecure"], "already holds a run"),
    (["run", "--out", "O", "--superlink", "h:1", "--insecure", "--resume"], "cannot resume"),
    (["run", "P", "--out", "O", "--superlink", "h:1", "--root-certificates", "N"], "no file"),
    (["run", "P", "--out", "O", "--superlink", "h:1", "--split-certfile", "N"], "go together"),
    (["supernode", "--superlink", "h:1", "--partition-id", "-1", "--insecure"], "--partition-id"),
    (["supernode", "--superlink", "h:99999", "--partition-id", "0", "--insecure"], "port in"),
    (["supernode", "--superlink", "h:1", "--partition-id", "0", "--data-dir", "N"], "no folder"),
    (
        [
            "supernode",
            "--superlink",
            "h:1",
            "--partition-id",
            "0",
            "--insecure",
            "--poll-seconds",
            "0",
        ],
        "[0.05, 60]",
    ),
    (["superlink", "--port", "0", "--insecure"], "--port: expected a port in [1, 65535]"),
    (["superlink", "--certs", "N", "--insecure"], "--insecure contradicts --certs"),
    (["certs", "N", "--host", ""], "--host: expected a host name or IP address, got ''"),
]


@pytest.mark.parametrize(("argv", "fragment"), FLOWER_CASES, ids=lambda x: " ".join(x)[:50])
def test_bad_flower_arguments(capsys, tmp_path, preset, finished, nothing_starts, argv, fragment):
    subst = {"P": preset, "O": tmp_path / "run", "F": finished, "N": tmp_path / "nope"}
    assert_one_line(*cli(capsys, "flower", *[subst.get(a, a) for a in argv]), fragment)
    assert not (tmp_path / "run").exists()
