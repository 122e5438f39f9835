"""The fedtune ClientApp: forwards each Flower message to this SuperNode's fedtune worker.

The Flower message carries one ``ConfigRecord`` ``"fedtune"`` with ``header`` (JSON: the run's
config TOML and label names; ``query`` for the greeting before round 1; ``run_key``,
``resumed_after`` and ``keep_after`` for the client state a node keeps across a resumed
ServerApp; ``drop`` for simulated dropout; the split link's address and this client's token)
and ``blob`` (the encoded fedtune :class:`~fedtune.messages.Message`, the bytes that are
counted). The worker
address and its token come from the node config that ``fedtune flower supernode`` sets. This
module imports no torch: Flower starts a fresh process for every message.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..errors import ConfigError, FedtuneError
from . import rpc

RECORD = "fedtune"
app = ClientApp()


def _node_value(context: Context, key: str) -> str:
    value = context.node_config.get(key)
    if value is None:
        raise ConfigError(
            f"node config has no {key!r}: start the SuperNode with `fedtune flower supernode`"
        )
    return str(value)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which fedtune client this node is and how many samples it holds (the worker loads the
    run's model and this client's data to answer)."""
    return forward(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One fedtune message to this node's client, and its reply."""
    return forward(msg, context)


def forward(msg: Message, context: Context) -> Message:
    """Hand the message's header and bytes to this node's worker; return its answer."""
    rec = msg.content[RECORD]
    header = json.loads(str(rec["header"]))
    header["run"] = context.run_id
    address = _node_value(context, "fedtune-worker")
    token = _node_value(context, "fedtune-token")
    timeout = float(header.get("timeout", 3600))
    with rpc.Stream(address, token, timeout=timeout, what="fedtune worker") as stream:
        out, blob = rpc.unpack(stream.call(rpc.pack(header, bytes(rec["blob"]))))
    if "error" in out:
        raise FedtuneError(out["error"])
    reply = ConfigRecord({"header": json.dumps(out), "blob": blob})
    return Message(RecordDict({RECORD: reply}), reply_to=msg)
