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


def relay(target_port: int, seen: bytearray):
    """A TCP relay on loopback that keeps a copy of every byte in both directions (what an
    eavesdropper on the network sees); returns its port."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def pipe(src, dst):
        try:
            while data := src.recv(65536):
                seen.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()

    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", target_port))
            threading.Thread(target=pipe, args=(conn, up), daemon=True).start()
            threading.Thread(target=pipe, args=(up, conn), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener


@pytest.mark.parametrize("tls", [True, False])
def test_with_tls_the_split_streams_bytes_are_not_readable(tmp_path, tls):
    """The split stream through an eavesdropping relay: with TLS the frames' content (and the
    token) never appear on the wire; without it (--insecure) both do, so the check can fail."""
    from fedtune.flower import deploy, rpc

    secret = b"ACTIVATIONS-OF-A-PRIVATE-SENTENCE" * 4
    certs = deploy.make_certs(tmp_path / "certs", ["localhost"]) if tls else {}

    def echo(requests, context, peer):
        yield from requests

    server, port = rpc.serve(
        echo,
        "127.0.0.1:0",
        lambda: {"the-token-0123456789": "client-0"},
        certfile=str(certs["cert"]) if tls else None,
        keyfile=str(certs["key"]) if tls else None,
    )
    seen = bytearray()
    listener = relay(port, seen)
    try:
        address = f"localhost:{listener.getsockname()[1]}"
        root = str(certs["ca"]) if tls else None
        with rpc.Stream(address, "the-token-0123456789", root_cert=root, timeout=20) as s:
            assert s.call(secret) == secret
    finally:
        listener.close()
        server.stop(grace=None).wait()
    assert len(seen) > len(secret)  # the frames went through the relay
    leaked = secret[:32] in seen or b"the-token-0123456789" in seen
    assert leaked is not tls
