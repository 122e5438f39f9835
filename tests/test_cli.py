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
