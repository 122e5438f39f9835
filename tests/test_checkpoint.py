"""Checkpoints and --resume: an interrupted run, resumed, ends exactly like an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_cfg
from fedtune import config
from fedtune.errors import ConfigError
from fedtune.runtime import checkpoint, simulate

# What must match between a resumed and an uninterrupted run (seconds and memory may differ).
SAME = (
    "round",
    "clients",
    "accuracy",
    "macro_f1",
    "test_loss",
    "train_loss",
    "dropped",
    "rejected",
    "bytes_up_per_client",
    "bytes_down_per_client",
    "bytes_by_kind",
    "client_flops",
    "server_flops",
    "client_accuracy",
    "server_distill_loss",
)
SUMMARY = (
    "rounds",
    "final_accuracy",
    "best_accuracy",
    "final_macro_f1",
    "total_bytes",
    "bytes_up_per_client_per_round",
    "bytes_down_per_client_per_round",
    "client_flops_per_round",
    "server_flops_per_round",
)


def assert_same_run(a, b) -> None:
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [{k: r.get(k) for k in SAME} for r in ma] == [{k: r.get(k) for k in SAME} for r in mb]
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    assert {k: sa[k] for k in SUMMARY} == {k: sb[k] for k in SUMMARY}
    ta, tb = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_tree_codec_roundtrips_optimizer_states():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.Adam([p], lr=1e-3)
    p.grad = torch.ones_like(p)
    opt.step()
    tree = {
        "opt": opt.state_dict(),
        "slots": {"shared": 1, 0: (2, 3)},
        "none": None,
        "arr": np.arange(4),
        "hist": {1: np.array([3, 0, 1])},
        "x": [1.5, "s", True],
    }
    tensors: dict = {}
    back = checkpoint.decode_tree(
        json.loads(json.dumps(checkpoint.encode_tree(tree, tensors))), tensors
    )
    assert back["slots"] == {"shared": 1, 0: (2, 3)} and back["none"] is None
    assert back["x"] == [1.5, "s", True] and np.array_equal(back["hist"][1], [3, 0, 1])
    assert back["opt"]["param_groups"] == opt.state_dict()["param_groups"]
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(back["opt"]["state"][0][k], v)
    opt2 = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3, 2))], lr=1e-3)
    opt2.load_state_dict(back["opt"])  # loadable as is


class Stop(Exception):
    pass


def stop_after(rnd: int):
    def log(line: str) -> None:  # called after round `rnd`'s checkpoint is written
        if line.startswith(f"round {rnd}/"):
            raise Stop

    return log


def resumed_equals_straight(cfg, tmp_path, after: int = 2):
    """Run ``cfg`` straight, and again interrupted after round ``after`` then resumed: the two
    runs must be identical. Returns the straight run's directory."""
    a, b = tmp_path / "straight", tmp_path / "resumed"
    simulate(cfg, a, log=None)
    with pytest.raises(Stop):
        simulate(cfg, b, log=stop_after(after))
    assert checkpoint.load(b)["round"] == after
    simulate(cfg, b, log=None, resume=True)
    assert_same_run(a, b)
    return a


@pytest.mark.parametrize("framework", ["fedllm", "kd", "split"])
def test_resume_in_process_matches_an_uninterrupted_run(synth_dir, tmp_path, framework):
    """4 rounds straight vs 2 rounds, interrupted, resumed for 2 more: identical metrics,
    bytes and adapter. 30% dropout, so partial replies and the ledger are exercised too."""
    cfg = tiny_cfg(
        synth_dir,
        fed={"rounds": 4, "framework": framework, "dropout": 0.3},
        kd={"public_samples": 40, "align": "reweight"},
    )
    a, b = tmp_path / "straight", tmp_path / "resumed"
    simulate(cfg, a, log=None)
    with pytest.raises(Stop):
        simulate(cfg, b, log=stop_after(2))
    assert not (b / "summary.json").exists()
    assert checkpoint.load(b)["round"] == 2
    # an extra metrics line past the checkpoint (killed between the two writes) is dropped
    with (b / "metrics.jsonl").open("a") as f:
        f.write('{"round": 3, "partial": true}\n')
    logs: list[str] = []
    simulate(cfg, b, log=logs.append, resume=True)
    assert logs[0].startswith(f"resuming {b} after round 2 of 4")
    assert_same_run(a, b)


def test_resume_errors(synth_dir, tmp_path):
    cfg = tiny_cfg(synth_dir, fed={"rounds": 1})
    with pytest.raises(ConfigError, match="no config.toml"):
        simulate(cfg, tmp_path / "nothing", log=None, resume=True)
    simulate(cfg, tmp_path / "done", log=None)
    with pytest.raises(ConfigError, match="the run has finished"):
        simulate(cfg, tmp_path / "done", log=None, resume=True)
    with pytest.raises(Stop):
        simulate(config.with_overrides(cfg, fed={"rounds": 3}), tmp_path / "x", log=stop_after(1))
    with pytest.raises(ConfigError, match="unfinished run; continue it with --resume"):
        simulate(cfg, tmp_path / "x", log=None)
    with pytest.raises(ConfigError, match="another config"):  # config.toml says 3 rounds
        simulate(cfg, tmp_path / "x", log=None, resume=True)
    (tmp_path / "x" / checkpoint.FILE).write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="unreadable"):
        simulate(
            config.with_overrides(cfg, fed={"rounds": 3}), tmp_path / "x", log=None, resume=True
        )


def fedtune_cli(*args, **kw):
    cmd = [sys.executable, "-m", "fedtune.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw
    )


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_run(synth_dir, tmp_path):
    """A real `fedtune run` process is killed with SIGKILL once metrics.jsonl has 2 lines
    (anywhere in round 3, possibly while writing the checkpoint), then resumed with --resume."""
    preset = tmp_path / "tiny.toml"
    preset.write_text(config.to_toml(tiny_cfg(synth_dir, fed={"rounds": 5, "dropout": 0.2})))
    a, b = tmp_path / "straight", tmp_path / "killed"
    straight = fedtune_cli("run", str(preset), "--out", str(a), "--no-progress")
    killed = fedtune_cli("run", str(preset), "--out", str(b), "--no-progress")
    deadline = time.time() + 300
    while time.time() < deadline and killed.poll() is None:
        m = b / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert killed.poll() is None, killed.communicate()
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (b / "summary.json").exists()  # an interrupted run never looks complete
    assert straight.wait(timeout=300) == 0, straight.communicate()
    resumed = fedtune_cli("run", "--resume", str(b), "--no-progress")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming" in out + err
    assert_same_run(a, b)


def test_finished_markers_are_durable_before_visible(tmp_path, monkeypatch):
    """summary.json (and every atomic write) is fsynced before the rename and the folder
    after it: a crash cannot leave a visible, half-written "finished" marker."""
    import os

    from fedtune.runtime.rundir import atomic_write

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    atomic_write(tmp_path / "summary.json", "{}\n")
    assert (tmp_path / "summary.json").read_text() == "{}\n"
    assert len(synced) == 2  # the file, then its folder
    assert not list(tmp_path.glob(".*.tmp"))
