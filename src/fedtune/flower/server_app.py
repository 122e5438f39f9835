"""The fedtune ServerApp: the round loop (:mod:`fedtune.runtime.loop`) over the Flower transport.

Run config (``[tool.flwr.app.config]``, written by ``fedtune flower run``): ``fedtune-config``
(the resolved config as TOML text), ``out`` (run directory on the SuperLink host), ``resume``
(continue the unfinished run in ``out`` from its checkpoint), ``split-bind`` / ``split-host``
(where the split server listens / how clients reach it), ``split-certfile`` / ``split-keyfile``
(TLS for that stream), ``node-timeout``, ``round-timeout``.
"""

from __future__ import annotations

import tomllib

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .. import config
from ..errors import ConfigError
from ..runtime import run
from .transport import FlowerTransport

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = dict(context.run_config)
    text = str(rc.get("fedtune-config", ""))
    if not text or not rc.get("out"):
        raise ConfigError("run config needs fedtune-config and out (use `fedtune flower run`)")
    cfg = config.from_dict(tomllib.loads(text))
    run_federation(grid, cfg, str(rc["out"]), rc)


def run_federation(grid: Grid, cfg: config.RunConfig, out: str, rc: dict, log=print) -> dict:
    """Run ``cfg`` on the SuperNodes of ``grid``; writes ``out`` like the simulation."""
    resume = str(rc.get("resume", "false")).lower() == "true"
    transport = FlowerTransport(grid, rc, log)
    summary = run(cfg, transport, out, log=log, resume=resume).summary
    log(f"fedtune: run written to {out}")
    return summary
