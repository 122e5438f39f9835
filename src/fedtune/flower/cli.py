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


def _home(args, role: str) -> str:
    """FLWR_HOME: ``--home``, else the environment's, else ``./flwr-home/ROLE``."""
    return args.home or os.environ.get("FLWR_HOME") or f"flwr-home/{role}"


def _superlink(args) -> int:
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
    _need_tls(args, bool(args.root_certificates), "--root-certificates CA.pem")
    _need_flwr()
    from . import deploy

    os.environ.update(deploy.flower_env(_home(args, "supernode")))
    return deploy.run_supernode(args)


def _run(args) -> int:
    _need_tls(args, bool(args.root_certificates), "--root-certificates CA.pem")
    split_tls = bool(args.split_certfile and args.split_keyfile)
    _need_tls(args, split_tls, "--split-certfile and --split-keyfile (the split stream)")
    _need_flwr()
    from . import deploy

    out = Path(args.out).resolve()
    if args.resume:  # the run directory's own config, like `fedtune run --resume`
        if args.config or args.overrides:
            raise ConfigError("--resume reads OUT/config.toml: give no preset or overrides")
        if not (out / "config.toml").is_file():
            raise ConfigError(f"cannot resume {out}: no config.toml (not a run directory)")
        args.config = str(out / "config.toml")
    cfg = config.load(args.config, args.overrides)
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
    _need_tls(args, args.tls, "--tls (self-signed certificates for every link)")
    _need_flwr()
    from .local import LocalFederation

    cfg = config.load(args.config, args.overrides)
    out = Path(args.out).resolve()
    data_dirs = args.data_dirs.split(",") if args.data_dirs else None
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
        help="address to listen on (default: this host only; Flower 1.41 serves the Fleet, "
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
