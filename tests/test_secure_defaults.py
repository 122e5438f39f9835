"""Deployment is secure by default: every command that opens or dials a network endpoint
refuses to run without TLS unless ``--insecure`` is given, with a one-line error; private keys
are never readable by others, not even for a moment."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

pytest.importorskip("flwr")

COMMANDS = [
    ["flower", "superlink", "--port", "1"],
    ["flower", "supernode", "--superlink", "127.0.0.1:1", "--partition-id", "0"],
    ["flower", "run", "--out", "RUN", "--superlink", "127.0.0.1:1"],
    ["flower", "local", "--out", "RUN"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: a[1])
def test_deployment_without_tls_or_insecure_is_a_one_line_error(tmp_path, argv):
    argv = [str(tmp_path / "run") if a == "RUN" else a for a in argv]
    r = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedtune: error:") and "--insecure" in lines[0]
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


def test_keys_are_private_from_the_start(tmp_path, monkeypatch):
    from fedtune.flower import deploy

    seen = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *a, **k):  # every file the key writers create
        seen.append((str(path), mode))
        return real_open(path, flags, mode, *a, **k)

    monkeypatch.setattr(os, "open", spy)
    paths = deploy.make_certs(tmp_path / "certs", ["localhost"])
    priv, _ = deploy.make_node_key(tmp_path / "node" / "key")
    for key in (paths["key"], priv):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert (str(key), 0o600) in seen  # created 0600, not chmod-ed after being written
