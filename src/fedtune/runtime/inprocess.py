"""The in-process transport: the server and every client in one process, one shared model.

Every message crosses a counting :class:`~fedtune.messages.Wire` (encoded, counted, decoded),
so a client receives exactly what a network would deliver. The clients' work runs on an
executor (:mod:`fedtune.execution.executors`: sequential, or batched with ``fed.engine``);
each client's compute is metered on its own.
"""

from __future__ import annotations

from functools import partial

from ..compute import ComputeMeter, paused
from ..config import RunConfig
from ..context import Context, ServerContext, build_context
from ..errors import ConfigError, MessageError
from ..execution.executors import Executor, make_executor
from ..frameworks import Framework, Server, Serving
from ..messages import SERVER, Message, Notices, Wire, check_routing, client_name
from . import faults
from .records import RoundState


class Link:
    """A client's handle on the server for per-batch requests (split learning).

    ``call`` sends through the wire, pauses the client's meter while the server works (that
    work is metered as the server's), and returns the server's reply as received over the wire."""

    def __init__(
        self,
        wire: Wire,
        server: Serving,
        meter: ComputeMeter | None = None,
        server_meter: ComputeMeter | None = None,
        route: tuple[str, int] | None = None,
    ) -> None:
        self.wire, self.server = wire, server
        self.meter, self.server_meter = meter, server_meter
        self.route = route  # (client, round): what every request must say, as on Flower

    def call(self, msg: Message) -> Message:
        try:
            if self.route is not None:
                check_routing(msg, self.route[0], SERVER, self.route[1])
            msg = self.wire.transfer(msg)
        except MessageError as e:  # refused before the server saw it: undo its earlier batches
            self.server.refuse(self.route[0] if self.route else msg.sender, str(e)[:200])
            raise
        with paused(self.meter):
            if self.server_meter is None:
                reply = self.server.serve(msg)
            else:
                with self.server_meter.measure():
                    reply = self.server.serve(msg)
        return self.wire.transfer(reply)


def refused_is_lost(handle, msg: Message, link, rs: RoundState, cid: int):
    """A client's work whose request the server refused (a MessageError from ``serve``, e.g.
    malformed split activations): the client is lost for the round, the run goes on."""
    try:
        return handle(msg, link)
    except MessageError as e:
        rs.lost[cid] = f"refused by the server: {str(e)[:200]}"
        return None


class InProcess:
    """Clients are objects in this process; their jobs run on ``executor`` (default: the one
    ``fed.engine`` names)."""

    name = "in-process"

    def __init__(self, executor: Executor | None = None) -> None:
        self.executor = executor
        self.wire = Wire()
        self.clients: dict = {}

    def prepare(self, cfg: RunConfig, ctx: Context | None) -> ServerContext:
        self.full = ctx or build_context(cfg)  # all the data: each party gets its view
        return self.full.server()

    def start(self, ctx: ServerContext, fw: Framework, server: Server) -> None:
        self.ctx, self.server = ctx, server
        self.wire.max_bytes = ctx.cfg.fed.max_message_bytes
        self.clients = {c: fw.client(self.full.client(c)) for c in range(ctx.data.num_clients)}
        if self.executor is None:
            self.executor = make_executor(self.full)

    def begin_round(self, rs: RoundState) -> None:
        pass

    def exchange(self, rs: RoundState, outgoing: dict[int, Message]) -> dict[int, Message]:
        received = {cid: self.wire.transfer(m) for cid, m in outgoing.items()}
        for cid in sorted(received.keys() & rs.dropping_now(self.ctx.cfg.fed.dropout_exchange)):
            rs.lost[cid] = "dropout"  # it got the message and never answers
        todo = {cid: m for cid, m in received.items() if cid not in rs.lost}
        serving = isinstance(self.server, Serving)
        work = {}
        for cid, msg in todo.items():
            route = (client_name(cid), rs.rnd)
            link = (
                Link(self.wire, self.server, rs.meters[cid], rs.server_meter, route)
                if serving
                else None
            )
            work[cid] = partial(refused_is_lost, self.clients[cid].handle, msg, link, rs, cid)
        answers = self.executor.run(work, rs.meters)
        replies: dict[int, Message] = {}
        for cid, reply in answers.items():
            if reply is None:
                continue
            try:
                check_routing(reply, client_name(cid), SERVER, rs.rnd)
                received = self.wire.transfer(reply)
            except MessageError as e:
                rs.lost[cid] = f"bad reply: {e}"
                continue
            if faults.misses_deadline(rs.meters[cid].stats.seconds, cid, self.ctx.cfg.fed):
                rs.lost[cid] = "deadline"  # it was sent (and counted); the server discards it
                continue
            replies[cid] = received
        return replies

    def notify(self, rs: RoundState, notices: Notices) -> None:
        """Delivered at once: a hop costs nothing here, and the clients' models are then
        complete for ``client_eval`` at the end of the round."""
        self.exchange(rs, notices)

    def end_round(self, rs: RoundState) -> None:
        pass

    def local_clients(self) -> dict:
        return self.clients

    def state_dict(self) -> dict:
        return {str(cid): c.state_dict() for cid, c in self.clients.items()}

    def load_state_dict(self, d: dict, after_round: int) -> None:
        if "run_key" in d:
            raise ConfigError(
                "the checkpoint was written by a Flower run; resume it with "
                "`fedtune flower run --resume`"
            )
        for cid, c in self.clients.items():
            c.load_state_dict(d[str(cid)])

    def summary(self) -> dict:
        return {}

    def close(self) -> None:
        pass
