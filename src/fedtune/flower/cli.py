"""``fedtune flower ...``: deploy on Flower (imports flwr only when a command runs)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .. import config
from ..errors import ConfigError, FedtuneError


def _need_flwr() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ConfigError("Flower is not installed: pip install 'fedtune[flower]'") from None


def _app(args) -> int:
    from . import deploy

    print(deploy.write_app(args.dir) / "pyproject.toml")
    return 0


def _certs(args) -> int:
    for host in args.host:  # the first is the certificate's common name: 1 to 64 characters
        if not 1 <= len(host) <= 64 or any(c.isspace() for c in host):
            raise ConfigError(f"--host: expected a host name or IP address, got {host!r}")
    from . import deploy

    for name, path in deploy.make_certs(args.dir, args.host).items():
        print(f"{name}: {path}")
    return 0


def _node_key(args) -> int:
    from . import deploy

    priv, pub = deploy.make_node_key(args.path)
    print(f"private: {priv}\npublic:  {pub}  (flwr supernode register {pub} CONNECTION)")
    return 0


def _need_tls(args, have_tls: bool, how: str) -> None:
    """Secure by default: plaintext only when the user typed ``--insecure``."""
    if not have_tls and not args.insecure:
        raise ConfigError(f"no TLS: give {how}, or --insecure (plaintext, a closed test network)")


def _exclusive(args, tls: bool, flag: str) -> None:
    """``--insecure`` with a TLS option is a contradiction, not a choice to guess."""
    if tls and args.insecure:
        raise ConfigError(f"--insecure contradicts {flag}: give one of them")


def _address(text: str, flag: str, port_zero: bool = False) -> None:
    """``host:port`` with a port in [1, 65535] (``port_zero``: 0, any free port, too)."""
    host, _, port = text.rpartition(":")
    low = 0 if port_zero else 1
    if not host or not port.isdigit() or not low <= int(port) <= 65535:
        raise ConfigError(f"{flag}: expected host:port with a port in [{low}, 65535], got {text!r}")


def _port(port: int, flag: str) -> None:
    if not 1 <= port <= 65535:
        raise ConfigError(f"{flag}: expected a port in [1, 65535], got {port}")


def _files(**paths: str | None) -> None:
    """Each given ``--flag FILE`` names an existing file (keyword: the flag, ``_`` for ``-``)."""
    for flag, path in paths.items():
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"--{flag.replace('_', '-')}: no file {path}")


def _home(args, role: str) -> str:
    """FLWR_HOME: ``--home``, else the environment's, else ``./flwr-home/ROLE``."""
    return args.home or os.environ.get("FLWR_HOME") or f"flwr-home/{role}"


def _superlink(args) -> int:
    _exclusive(args, bool(args.certs), "--certs")
    _port(args.port, "--port")
    for name in ("ca.pem", "server.pem", "server.key") if args.certs else ():
        if not (Path(args.certs) / name).is_file():
            raise ConfigError(f"--certs {args.certs}: no {name} (`fedtune flower certs DIR`)")
    _need_tls(args, bool(args.certs), "--certs DIR (from `fedtune flower certs`)")
    _need_flwr()
    from . import deploy

    tls = None
    if args.certs:
        d = Path(args.certs)
        tls = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}
    cmd = deploy.superlink_cmd(args.host, args.port, tls=tls, auth=args.auth)
    os.execve(
        cmd[0], cmd, deploy.flower_env(_home(args, "superlink"))
    )  # replaces this process: one PID


def _supernode(args) -> int:
    _exclusive(args, bool(args.root_certificates), "--root-certificates")
    _address(args.superlink, "--superlink")
    _port(args.port, "--port")
    if args.partition_id < 0:
        raise ConfigError(f"--partition-id: must be >= 0, got {args.partition_id}")
    if args.max_retries is not None and args.max_retries < 0:
        raise ConfigError(f"--max-retries: must be >= 0, got {args.max_retries}")
    if not 0.05 <= args.poll_seconds <= 60:
        raise ConfigError(f"--poll-seconds: must be in [0.05, 60], got {args.poll_seconds}")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise ConfigError(f"--data-dir: no folder {args.data_dir}")
    _files(
        root_certificates=args.root_certificates,
        split_root_certificates=args.split_root_certificates,
        auth_supernode_private_key=args.auth_supernode_private_key,
    )
    _need_tls(args, bool(args.root_certificates), "--root-certificates CA.pem")
    _need_flwr()
    from . import deploy

    os.environ.update(deploy.flower_env(_home(args, "supernode")))
    return deploy.run_supernode(args)


def _run(args) -> int:
    from ..runtime.rundir import RunDir, check_writable

    split_tls = bool(args.split_certfile and args.split_keyfile)
    if bool(args.split_certfile) != bool(args.split_keyfile):
        raise ConfigError("--split-certfile and --split-keyfile go together: give both")
    _exclusive(args, bool(args.root_certificates) or split_tls, "--root-certificates/--split-*")
    _address(args.superlink, "--superlink")
    _address(args.split_bind, "--split-bind", port_zero=True)
    if not args.split_host:
        raise ConfigError("--split-host: empty (the host clients dial for the split stream)")
    _files(
        root_certificates=args.root_certificates,
        split_certfile=args.split_certfile,
        split_keyfile=args.split_keyfile,
    )
    _need_tls(args, bool(args.root_certificates), "--root-certificates CA.pem")
    _need_tls(args, split_tls, "--split-certfile and --split-keyfile (the split stream)")
    check_writable(args.out, "--out")
    out = Path(args.out).resolve()
    if args.resume:  # the run directory's own config, like `fedtune run --resume`
        if args.config or args.overrides:
            raise ConfigError("--resume reads OUT/config.toml: give no preset or overrides")
        RunDir.check_resumable(out)
        args.config = str(out / "config.toml")
    cfg = config.load(args.config, args.overrides)
    if not args.resume:  # refused here, before OUT/flower is written, not by the ServerApp
        RunDir.check(out)
    _need_flwr()
    from . import deploy

    home = out / "flower"  # FLWR_HOME, the app folder and the run config, inside the run dir
    app = deploy.write_app(home / "app")
    deploy.write_connection(home, "fedtune", args.superlink, args.root_certificates)
    settings = {
        "split-host": args.split_host,
        "split-bind": args.split_bind,
        "split-certfile": args.split_certfile or "",
        "split-keyfile": args.split_keyfile or "",
        "resume": "true" if args.resume else "false",
    }
    rc = deploy.run_config_file(home / "run-config.toml", cfg, args.remote_out or out, **settings)
    cmd = deploy.flwr_cmd("run", str(app), "fedtune", "--run-config", str(rc), "--stream")
    return subprocess.run(cmd, env=deploy.flower_env(home)).returncode


def _local(args) -> int:
    from ..runtime.rundir import RunDir, check_writable

    _exclusive(args, args.tls, "--tls")
    _need_tls(args, args.tls, "--tls (self-signed certificates for every link)")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout: must be > 0 seconds, got {args.timeout:g}")
    cfg = config.load(args.config, args.overrides)
    if args.nodes != cfg.data.num_clients:  # node i is client i: others would wait or fail
        raise ConfigError(
            f"--nodes {args.nodes}: must equal data.num_clients={cfg.data.num_clients}"
        )
    data_dirs = args.data_dirs.split(",") if args.data_dirs else None
    if data_dirs is not None:
        if len(data_dirs) != args.nodes:
            raise ConfigError(f"--data-dirs: {len(data_dirs)} folders for {args.nodes} nodes")
        missing = [d for d in data_dirs if not Path(d).is_dir()]
        if missing:
            raise ConfigError(f"--data-dirs: no folder {missing[0]}")
    check_writable(args.out, "--out")
    out = Path(args.out).resolve()
    RunDir.check(out)
    _need_flwr()
    from .local import LocalFederation

    with LocalFederation(
        out.parent / f"{out.name}.flower",
        args.nodes,
        tls=args.tls,
        auth=args.auth,
        data_dirs=data_dirs,
    ) as fed:
        summary = fed.run(cfg, out, timeout=args.timeout)
    keys = (
        "framework",
        "final_accuracy",
        "bytes_up_per_client_per_round",
        "bytes_down_per_client_per_round",
        "wall_seconds",
    )
    print(json.dumps({k: summary.get(k) for k in keys}))
    return 0


def add_parser(sub) -> None:
    """Register ``fedtune flower`` and its subcommands on the main CLI's subparsers."""
    f = sub.add_parser(
        "flower",
        help="run on a real Flower federation (SuperLink + SuperNodes)",
        description="Deploy fedtune on Flower; see README 'Real deployment'.",
    )
    fs = f.add_subparsers(dest="flower_command", required=True)

    a = fs.add_parser("app", help="write the Flower app folder (pyproject.toml)")
    a.add_argument("dir")
    a.set_defaults(func=_app)

    c = fs.add_parser("certs", help="self-signed CA + server certificate for the SuperLink")
    c.add_argument("dir")
    c.add_argument(
        "--host",
        action="append",
        required=True,
        help="SuperLink host name or IP (repeat for several)",
    )
    c.set_defaults(func=_certs)

    k = fs.add_parser("node-key", help="a SuperNode authentication key pair (EC P-384)")
    k.add_argument("path", help="private key path; the public key is PATH.pub")
    k.set_defaults(func=_node_key)

    sl = fs.add_parser("superlink", help="start a SuperLink (closed-network settings)")
    sl.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: this host only; Flower 1.42 serves the Fleet, "
        "Control and Runtime APIs on it: give the federation's interface, e.g. 0.0.0.0)",
    )
    sl.add_argument("--port", type=int, default=9093)
    sl.add_argument("--certs", help="folder from `fedtune flower certs` (TLS)")
    sl.add_argument("--insecure", action="store_true", help="no TLS (a closed test network)")
    sl.add_argument("--auth", action="store_true", help="accept registered SuperNodes only")
    sl.add_argument("--home", help="FLWR_HOME (default: $FLWR_HOME or ./flwr-home/superlink)")
    sl.set_defaults(func=_superlink)

    sn = fs.add_parser("supernode", help="start a SuperNode with its fedtune worker")
    sn.add_argument("--superlink", required=True, help="SuperLink host:port")
    sn.add_argument("--partition-id", type=int, required=True, help="this node's client id")
    sn.add_argument("--data-dir", help="own folder with train.csv (+ public.csv for KD)")
    sn.add_argument("--root-certificates", help="CA of the SuperLink (TLS)")
    sn.add_argument("--insecure", action="store_true", help="no TLS (loopback / testing)")
    sn.add_argument("--auth-supernode-private-key", help="this node's private key (auth)")
    sn.add_argument("--split-root-certificates", help="CA of the split server's certificate")
    sn.add_argument("--port", type=int, default=9094, help="local Runtime API port")
    sn.add_argument("--max-retries", type=int, help="reconnect attempts before giving up")
    sn.add_argument(
        "--poll-seconds",
        type=float,
        default=3.0,
        help="seconds between pulls while no message waits (Flower's: 3)",
    )
    sn.add_argument(
        "--plugin",
        action="append",
        metavar="MODULE",
        help="import MODULE first (it registers frameworks or aggregators; repeatable)",
    )
    sn.add_argument("--home", help="FLWR_HOME (default: $FLWR_HOME or ./flwr-home/supernode)")
    sn.set_defaults(func=_supernode)

    r = fs.add_parser("run", help="run a fedtune config on a running federation")
    r.add_argument("config", nargs="?", help="TOML preset")
    r.add_argument("overrides", nargs="*", help="key=value overrides")
    r.add_argument("--out", required=True, help="run directory (FLWR_HOME etc. in OUT/flower)")
    r.add_argument("--remote-out", help="run directory on the SuperLink host (default: --out)")
    r.add_argument("--superlink", required=True, help="SuperLink host:port")
    r.add_argument("--root-certificates", help="CA of the SuperLink (TLS)")
    r.add_argument(
        "--insecure", action="store_true", help="no TLS to the SuperLink and on the split stream"
    )
    r.add_argument("--split-host", default="127.0.0.1", help="host clients dial (split)")
    r.add_argument("--split-bind", default="0.0.0.0:0", help="split server bind address")
    r.add_argument("--split-certfile", help="split server TLS certificate (on the SuperLink)")
    r.add_argument("--split-keyfile", help="split server TLS key (on the SuperLink)")
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished run in --out from its last checkpoint",
    )
    r.set_defaults(func=_run)

    lo = fs.add_parser("local", help="start SuperLink + N SuperNodes here, run, stop them")
    lo.add_argument("config", nargs="?", help="TOML preset")
    lo.add_argument("overrides", nargs="*", help="key=value overrides")
    lo.add_argument("--out", required=True, help="run directory (federation in OUT.flower)")
    lo.add_argument("--nodes", type=int, default=3, help="SuperNodes (= data.num_clients)")
    lo.add_argument("--tls", action="store_true", help="self-signed TLS on every link")
    lo.add_argument("--insecure", action="store_true", help="no TLS (loopback only)")
    lo.add_argument("--auth", action="store_true", help="SuperNode authentication")
    lo.add_argument("--data-dirs", help="comma-separated own data folder per node")
    lo.add_argument("--timeout", type=float, default=3600, help="seconds for the run")
    lo.set_defaults(func=_local)


__all__ = ["add_parser", "FedtuneError"]
