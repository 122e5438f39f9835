import json
import subprocess
import sys

from conftest import tiny_cfg
from fedtune import config
from fedtune.cli import main


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True
    )


def test_help_lists_every_key():
    r = run_cli("run", "--help")
    assert r.returncode == 0
    assert (
        "train.lr" in r.stdout and "data.dirichlet_alpha" in r.stdout and "fed.rounds" in r.stdout
    )


def test_bad_inputs_give_one_line_errors_and_no_run_dir(tmp_path, synth_dir):
    cases = [
        (["configs/demo-fedllm.toml", "train.lrr=1"], "unknown config key 'train.lrr'"),
        (["configs/nope.toml"], "config file not found"),
        (["configs/demo-fedllm.toml", f"data.path={tmp_path / 'none'}"], "data folder not found"),
        (["configs/demo-fedllm.toml", "fed.rounds=0"], "fed.rounds: must be >= 1"),
    ]
    for args, fragment in cases:
        out = tmp_path / "run"
        r = run_cli("run", *args, "--out", str(out), "--no-progress")
        assert r.returncode == 2, r.stderr
        assert fragment in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert not out.exists()  # nothing is written before the inputs are known to be valid


def test_run_writes_the_run_directory(tmp_path, synth_dir, capsys):
    cfg = tiny_cfg(synth_dir, fed={"rounds": 1})
    preset = tmp_path / "tiny.toml"
    preset.write_text(config.to_toml(cfg))
    out = tmp_path / "run"
    assert main(["run", str(preset), "fed.rounds=2", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["framework"] == "fedllm"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert "rounds = 2" in (out / "config.toml").read_text()
    # refusing to overwrite a finished run
    assert main(["run", str(preset), "--out", str(out), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_more_bad_inputs_through_the_cli(tmp_path, synth_dir):
    """Config types and ranges, data problems and --resume misuse: exit 2, one line on stderr,
    no traceback, and no run directory (or at least no summary.json) left behind."""
    import shutil

    from conftest import tiny_cfg

    preset = tmp_path / "tiny.toml"
    preset.write_text(config.to_toml(tiny_cfg(synth_dir, fed={"rounds": 1})))
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    shutil.copy(synth_dir / "train.csv", only_train / "train.csv")
    odd_labels = tmp_path / "odd_labels"
    odd_labels.mkdir()
    shutil.copy(synth_dir / "train.csv", odd_labels / "train.csv")
    (odd_labels / "test.csv").write_text("text,category\nhello,mortgage\n")
    finished = tmp_path / "finished"
    assert main(["run", str(preset), "--out", str(finished), "--no-progress"]) == 0
    p = str(preset)
    cases = [
        ([p, "fed.dropout=abc"], "fed.dropout: expected a number"),
        ([p, "fed.dropout=1.5"], "fed.dropout: must be in [0, 1)"),
        ([p, "fed.aggregator=krum"], "fed.aggregator: 'krum' is not one of fedavg, median"),
        ([p, "fed.trim_ratio=0.5"], "fed.trim_ratio: must be in [0, 0.5)"),
        ([p, "fed.client_slowdown=1,2"], "fed.client_slowdown: needs 3 factors"),
        ([p, "fed.poison_clients=7"], "fed.poison_clients: client ids must be in [0, 2]"),
        ([p, "fed.max_message_bytes=10"], "fed.max_message_bytes: must be >= 1024"),
        ([p, "fed.drop=0.1"], "unknown config key 'fed.drop'; valid keys here: fed.framework"),
        ([p, f"data.path={only_train}"], "data file not found"),
        ([p, f"data.path={odd_labels}"], "test labels unseen in training: mortgage"),
        ([p, "data.label_column=intent"], "no column 'intent'"),
        (["--resume", str(tmp_path / "nowhere")], "no config.toml"),
        (["--resume", str(finished)], "the run has finished"),
        ([p, "--resume", str(finished)], "--resume RUN_DIR reads RUN_DIR/config.toml"),
    ]
    before = (finished / "metrics.jsonl").read_bytes()
    procs = []
    for i, (args, _) in enumerate(cases):
        out = tmp_path / f"run{i}"
        extra = [] if "--resume" in args else ["--out", str(out)]
        cmd = [sys.executable, "-m", "fedtune.cli", "run", *args, *extra, "--no-progress"]
        procs.append(
            (out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        )
    for (args, fragment), (out, proc) in zip(cases, procs, strict=True):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (args, err)
        assert fragment in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, (args, err)
        if "--resume" not in args:  # the --resume cases name no --out of their own
            assert not out.exists(), args
    assert not (tmp_path / "nowhere").exists()
    assert (finished / "summary.json").exists()  # the finished run was left alone
    assert (finished / "metrics.jsonl").read_bytes() == before
