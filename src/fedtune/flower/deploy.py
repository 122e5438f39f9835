"""Deployment helpers: the Flower app folder, TLS certificates, SuperNode keys, the commands
that start a SuperLink and SuperNodes, and ``flwr run`` of a fedtune config.

Closed-network defaults, set on every process started here (:func:`flower_env`):
``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1``, ``FLWR_HOME`` inside the run's
folder, and no runtime dependency installation (``--disable-runtime-dependency-installation``
on the SuperLink; the SuperNode installs nothing unless asked): fedtune and flwr must already be
installed in the environment of every host.
"""

from __future__ import annotations

import datetime
import importlib
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from .. import config
from ..errors import ConfigError

APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedtune-flower"
version = "0.1.0"
description = "fedtune's FedLLM, KD-FedLLM and Split-FedLLM on Flower"
license = "Apache-2.0"
dependencies = []  # fedtune[flower] is installed on every host; nothing is installed at runtime

[tool.flwr.app]
publisher = "fedtune"

[tool.flwr.app.components]
serverapp = "fedtune.flower.server_app:app"
clientapp = "fedtune.flower.client_app:app"

[tool.flwr.app.config]
fedtune-config = ""       # the resolved fedtune config as TOML text (fedtune flower run)
out = ""                  # run directory on the SuperLink host
split-bind = "0.0.0.0:0"  # where the split server listens (port 0: any free port)
split-host = "127.0.0.1"  # the host name clients dial for the split server
split-certfile = ""       # TLS certificate and key of the split server ("" = plain gRPC)
split-keyfile = ""
split-turn-timeout = 60.0 # seconds a split client has to open its stream when its turn comes
split-stall-timeout = 120.0 # seconds a split client may leave its stream idle
node-timeout = 120.0      # seconds to wait for all SuperNodes
round-timeout = 3600.0    # seconds to wait for the replies of one exchange
resume = "false"          # "true": continue the unfinished run in out from its checkpoint
"""


def write_app(folder: str | Path) -> Path:
    """Write the Flower app folder (just its ``pyproject.toml``: the components live in the
    installed fedtune package) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    return folder


def flower_env(flwr_home: str | Path, base: dict | None = None) -> dict[str, str]:
    """Environment for Flower processes on a closed network (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)  # flower-superexec / flwr-clientapp live here
    env.update(
        FLWR_HOME=str(Path(flwr_home).resolve()),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=bindir + os.pathsep + env.get("PATH", ""),
    )
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")  # start app processes sooner
    Path(flwr_home).mkdir(parents=True, exist_ok=True)
    return env


def write_connection(flwr_home: str | Path, name: str, address: str, root_cert: str | None) -> None:
    """The ``flwr`` CLI's connection ``name`` to the SuperLink at ``address`` (FLWR_HOME)."""
    lines = [
        "[superlink]",
        f'default = "{name}"',
        "",
        f"[superlink.{name}]",
        f'address = "{address}"',
    ]
    lines.append(
        f'root-certificates = "{Path(root_cert).resolve()}"' if root_cert else "insecure = true"
    )
    Path(flwr_home).mkdir(parents=True, exist_ok=True)
    (Path(flwr_home) / "config.toml").write_text("\n".join(lines) + "\n")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


# ----------------------------------------------------------------------------- certificates


def make_certs(folder: str | Path, hosts: list[str]) -> dict[str, Path]:
    """A self-signed CA and a server certificate for ``hosts`` (names or IPs), as PEM files
    ``ca.pem``, ``server.pem``, ``server.key`` in ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(
        paths["key"],
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return paths


def write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only from the first byte on (created 0600;
    an existing file is replaced, not reused with its old mode)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_node_key(path: str | Path) -> tuple[Path, Path]:
    """A SuperNode authentication key pair (EC P-384, OpenSSH format): ``path`` (private,
    for ``--auth-supernode-private-key``) and ``path.pub`` (for ``flwr supernode register``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return path, pub


# ----------------------------------------------------------------------------- commands


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        raise ConfigError(f"{name} not found: pip install 'fedtune[flower]'")
    return found


def superlink_cmd(
    host: str, port: int, *, tls: dict | None = None, auth: bool = False
) -> list[str]:
    """``flower-superlink`` on ``host:port`` (Fleet, Control and Runtime APIs share it)."""
    cmd = [
        _bin("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if tls:
        cmd += [
            "--ssl-certfile",
            str(tls["cert"]),
            "--ssl-keyfile",
            str(tls["key"]),
            "--ssl-ca-certfile",
            str(tls["ca"]),
        ]
    else:
        cmd.append("--insecure")
    if auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def supernode_cmd(
    superlink: str,
    partition_id: int,
    runtime_port: int,
    *,
    root_cert: str | None = None,
    auth_key: str | None = None,
    data_dir: str | None = None,
    split_root_cert: str | None = None,
    poll_seconds: float | None = None,
) -> list[str]:
    """``fedtune flower supernode`` (the fedtune worker + ``flower-supernode`` in one process)."""
    cmd = [
        _bin("fedtune"),
        "flower",
        "supernode",
        "--superlink",
        superlink,
        "--partition-id",
        str(partition_id),
        "--port",
        str(runtime_port),
    ]
    cmd += ["--root-certificates", str(root_cert)] if root_cert else ["--insecure"]
    if auth_key:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    if data_dir:
        cmd += ["--data-dir", str(data_dir)]
    if split_root_cert:
        cmd += ["--split-root-certificates", str(split_root_cert)]
    if poll_seconds is not None:
        cmd += ["--poll-seconds", str(poll_seconds)]
    return cmd


def run_supernode(args) -> int:
    """Start the fedtune worker on loopback, then Flower's SuperNode in this same process."""
    import secrets

    from flwr.supernode.cli import flower_supernode

    from .node import start_worker

    for module in args.plugin or []:  # the node operator's own frameworks or aggregators
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"--plugin {module}: {e}") from None
    token = secrets.token_urlsafe(24)
    _, _, port = start_worker(
        args.partition_id,
        token,
        data_dir=args.data_dir,
        split_root_cert=args.split_root_certificates,
    )
    print(f"fedtune worker listening on port {port} (client {args.partition_id})", flush=True)
    node_config = f"partition-id={args.partition_id} fedtune-worker='127.0.0.1:{port}' fedtune-token='{token}'"
    argv = [
        "flower-supernode",
        "--superlink",
        args.superlink,
        "--node-config",
        node_config,
        "--port",
        str(args.port),
        "--isolation",
        "subprocess",
    ]
    argv += (
        ["--root-certificates", args.root_certificates]
        if args.root_certificates
        else ["--insecure"]
    )
    if args.auth_supernode_private_key:
        argv += ["--auth-supernode-private-key", args.auth_supernode_private_key]
    if args.max_retries is not None:
        argv += ["--max-retries", str(args.max_retries)]
    sys.argv = argv
    set_poll_interval(args.poll_seconds)
    flower_supernode()  # runs until the SuperNode is stopped (SIGTERM / SIGINT)
    return 0


FLOWER_POLL_SECONDS = 3  # what Flower 1.42's SuperNode sleeps after a pull that brought nothing


def set_poll_interval(seconds: float) -> None:
    """Make this process's SuperNode sleep ``seconds`` instead of Flower's hard-coded 3 s after
    a pull that brought no message. Each message waits up to that long before the node sees it,
    and the reply as long again before it is pushed: on a loopback federation that latency, not
    training, is most of a round. A shorter poll costs one more pull request per interval."""
    if seconds == FLOWER_POLL_SECONDS:
        return
    from flwr.supernode import start_client_internal as node

    real = node.time

    class _Time:
        """``time`` for Flower's SuperNode loop, with its idle sleep shortened."""

        def __getattr__(self, name: str):
            return getattr(real, name)

        @staticmethod
        def sleep(s: float) -> None:
            real.sleep(seconds if s == FLOWER_POLL_SECONDS else s)

    node.time = _Time()


def run_config_file(path: str | Path, cfg: config.RunConfig, out: str | Path, **settings) -> Path:
    """The ``flwr run --run-config`` file for ``cfg``: its resolved TOML and the settings."""
    vals = {"fedtune-config": config.to_toml(cfg), "out": str(Path(out).resolve()), **settings}
    lines = []
    for k, v in vals.items():
        if isinstance(v, str):
            lines.append(f"{k} = {_toml_str(v)}")
        else:
            lines.append(f"{k} = {v!r}")
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def flwr_cmd(*args: str) -> list[str]:
    return [_bin("flwr"), *args]


def stop(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM each process by its PID, then SIGKILL what is left after ``timeout``."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
