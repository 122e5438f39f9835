"""A whole Flower federation on this machine: one SuperLink and N SuperNodes as subprocesses,
optionally with TLS and SuperNode authentication, then ``flwr run`` of fedtune configs.

Used by ``fedtune flower local`` and by the integration test. Every process started here is
tracked by PID and stopped by :meth:`LocalFederation.stop`, with the processes they spawned.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from .. import config
from ..errors import FedtuneError
from . import deploy


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children(pid: int) -> dict[int, str]:
    """All descendants of ``pid`` (from ``/proc``) with their start times (PIDs get reused)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(int(stat.parent.name))
        if fields:
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = {}, [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            fields = _stat(c)
            if fields:
                out[c] = fields[19]
                todo.append(c)
    return out


def alive(pid: int, start: str | None = None) -> bool:
    """``pid`` runs (not a zombie) and, given ``start``, is the process that started then."""
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z" and (start is None or fields[19] == start)


class LocalFederation:
    """``with LocalFederation(folder, 3) as fed: fed.run(cfg, out)``."""

    def __init__(
        self,
        folder: str | Path,
        num_nodes: int,
        *,
        tls: bool = False,
        auth: bool = False,
        data_dirs: list[str] | None = None,
        host: str = "127.0.0.1",
        node_args: dict[int, dict] | None = None,
        poll_seconds: float = 0.5,
    ) -> None:
        self.folder = Path(folder).resolve()
        self.n, self.tls, self.auth, self.host = num_nodes, tls, auth, host
        self.data_dirs = data_dirs
        self.node_args = node_args or {}  # partition id -> extra `supernode` options
        self.poll_seconds = poll_seconds  # SuperNodes' idle poll (Flower's 3 s is all latency)
        self.procs: list[subprocess.Popen] = []
        self.spawned: dict[int, str] = {}  # descendants seen while running -> start time
        self.ports: set[int] = set()
        self.certs: dict | None = None
        self.cli_home = self.folder / "flwr" / "cli"
        self.conn = "fedtune-local"

    # ------------------------------------------------------------------ processes
    def _popen(self, cmd: list[str], name: str, home: str) -> subprocess.Popen:
        log = (self.folder / "logs" / f"{name}.log").open("w")
        p = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=deploy.flower_env(self.folder / "flwr" / home),
        )
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        path = self.folder / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> LocalFederation:
        (self.folder / "logs").mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.certs = deploy.make_certs(self.folder / "certs", [self.host, "localhost"])
        self.port = deploy.free_port(self.host)
        self.address = f"{self.host}:{self.port}"
        self.ports.add(self.port)
        cmd = deploy.superlink_cmd(self.host, self.port, tls=self.certs, auth=self.auth)
        self.superlink = self._popen(cmd, "superlink", "superlink")
        self._wait(lambda: deploy.port_open(self.port, self.host), 60, "SuperLink")
        deploy.write_connection(
            self.cli_home, self.conn, self.address, str(self.certs["ca"]) if self.certs else None
        )
        for i in range(self.n):
            self.add_node(i, **self.node_args.get(i, {}))
        return self

    def add_node(self, partition_id: int, *, register: bool = True, **kw) -> subprocess.Popen:
        """Start SuperNode ``partition_id`` (with its own key when auth is on; ``register``
        adds that key to the SuperLink first)."""
        key = None
        if self.auth:
            key, pub = deploy.make_node_key(self.folder / "keys" / f"node-{partition_id}")
            if register:
                self.flwr("supernode", "register", str(pub), self.conn)
        runtime = deploy.free_port()
        self.ports.add(runtime)
        data_dir = self.data_dirs[partition_id] if self.data_dirs else None
        ca = str(self.certs["ca"]) if self.certs else None
        cmd = deploy.supernode_cmd(
            self.address,
            partition_id,
            runtime,
            root_cert=ca,
            auth_key=str(key) if key else None,
            data_dir=data_dir,
            split_root_cert=ca,
            poll_seconds=self.poll_seconds,
        )
        for k, v in kw.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        p = self._popen(cmd, f"node-{partition_id}-{len(self.procs)}", f"node-{partition_id}")
        return p

    def flwr(self, *args: str, timeout: float = 120) -> str:
        r = subprocess.run(
            deploy.flwr_cmd(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=deploy.flower_env(self.cli_home),
        )
        if r.returncode != 0:
            raise FedtuneError(
                f"flwr {' '.join(args[:2])} failed: {(r.stdout + r.stderr).strip()[-400:]}"
            )
        return r.stdout

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.superlink.poll() is not None:
                raise FedtuneError(f"SuperLink exited: {self.log('superlink')[-400:]}")
            if time.monotonic() > deadline:
                raise FedtuneError(f"{what} not ready after {timeout:g} s")
            time.sleep(0.2)

    def track(self) -> None:
        """Remember the processes the SuperLink and SuperNodes spawned (to stop them too)."""
        for p in self.procs:
            self.spawned.update(children(p.pid))

    # ------------------------------------------------------------------ runs
    def launch(
        self, cfg: config.RunConfig, out: str | Path, *, resume: bool = False, **settings
    ) -> subprocess.Popen:
        """Start ``flwr run`` of ``cfg`` (``resume``: continue the unfinished run in ``out``);
        returns the ``flwr run`` process."""
        app = deploy.write_app(self.folder / "app")
        out = Path(out).resolve()
        settings = {"split-host": self.host, "split-bind": f"{self.host}:0", **settings}
        if resume:
            settings["resume"] = "true"
        if self.certs and "split-certfile" not in settings:
            settings["split-certfile"] = str(self.certs["cert"])
            settings["split-keyfile"] = str(self.certs["key"])
        name = f"run-{out.name}" + ("-resumed" if resume else "")
        rc = deploy.run_config_file(self.folder / f"{name}.toml", cfg, out, **settings)
        log = (self.folder / "logs" / f"{name}.log").open("w")
        cmd = deploy.flwr_cmd("run", str(app), self.conn, "--run-config", str(rc), "--stream")
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=deploy.flower_env(self.cli_home)
        )
        self.procs.append(proc)
        return proc

    def run(
        self,
        cfg: config.RunConfig,
        out: str | Path,
        *,
        timeout: float = 600,
        resume: bool = False,
        **settings,
    ) -> dict:
        """``flwr run`` ``cfg`` on this federation; returns the run's ``summary.json``."""
        out = Path(out).resolve()
        proc = self.launch(cfg, out, resume=resume, **settings)
        name = f"run-{out.name}" + ("-resumed" if resume else "")
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not (out / "summary.json").exists():
            self.track()
            if time.monotonic() > deadline:
                raise FedtuneError(f"run {out.name} did not finish in {timeout:g} s")
            time.sleep(0.5)
        if not (out / "summary.json").exists():
            text = self.log(name)
            errors = [ln for ln in text.splitlines() if "Error" in ln or "error" in ln]
            raise FedtuneError(f"run {out.name} failed: {(errors or [text[-300:]])[-1].strip()}")
        self.track()
        proc.wait(60)
        return json.loads((out / "summary.json").read_text())

    def serverapps(self) -> list[int]:
        """PIDs of the running ServerApp processes (``flwr-serverapp``, spawned by the
        SuperLink)."""
        self.track()
        pids = []
        for pid, start in self.spawned.items():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"flwr-serverapp" in cmd and alive(pid, start):
                pids.append(pid)
        return pids

    def listening_ports(self) -> set[int]:
        """The ports this federation's processes said they listen on (from their logs)."""
        ports = set(self.ports)
        for path in (self.folder / "logs").glob("*.log"):
            text = path.read_text(errors="replace")
            ports |= {
                int(p) for p in re.findall(r"(?:worker|split server) listening on port (\d+)", text)
            }
        return ports

    def stop(self) -> None:
        self.track()
        deploy.stop(list(reversed(self.procs)))
        deadline = time.monotonic() + 10  # spawned processes exit when their parent is gone
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.1)

    def leftovers(self) -> list[int]:
        """Spawned processes still running."""
        return [pid for pid, start in self.spawned.items() if alive(pid, start)]

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
