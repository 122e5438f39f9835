"""Split-FedLLM's per-batch exchange over a direct gRPC stream, outside Flower's round messages.

The ServerApp runs :class:`SplitService` next to the framework's ``Server``; each client's
``link.call(msg)`` is :class:`RemoteLink`, one bidirectional stream per client and round. Every
frame is an encoded :class:`~fedtune.messages.Message`, counted on both ends like the
simulation's ``Link`` counts it.

Clients are served one whole stream at a time, in the round's sampling order: the server-side
model (and, by default, its one shared server half) is updated by every batch, so the order of
updates is part of the result. This order is the simulation's, which makes a Flower run
reproduce the simulation's numbers, and lets all clients be sent their round message at once.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterator

import grpc
import torch

from ..compute import ComputeMeter, paused
from ..errors import MessageError
from ..messages import Message, Wire, client_name
from . import rpc


def receive_counted(wire: Wire, data: bytes) -> Message:
    """Decode bytes that arrived from the other side and count them in ``wire``'s ledger
    (``Wire.send`` counts what this side sends; this counts what it receives)."""
    msg = wire.receive(data)
    wire.ledger.record(msg, len(data))
    return msg


class SplitService:
    """Answers a :class:`~fedtune.frameworks.Serving` server's ``serve`` requests over
    :mod:`fedtune.flower.rpc` streams; ``threads``: torch threads per serving thread (0 = all
    cores)."""

    def __init__(self, server, wire: Wire, *, threads: int = 0, turn_timeout: float = 600.0):
        self.server, self.wire, self.turn_timeout = server, wire, turn_timeout
        self.threads = threads
        self.address = ""  # host:port the clients dial, set once the server listens
        self.tokens: dict[str, str] = {}  # token -> client name, one secret per client and round
        self.order: list[str] = []
        self.done: set[str] = set()
        self.round = 0
        self.closed = False
        self.meter: ComputeMeter | None = None
        self.cond = threading.Condition()
        self.lock = threading.Lock()  # Server.serve uses the one shared model

    def begin_round(self, rnd: int, clients: list[int], meter: ComputeMeter) -> dict[int, str]:
        """Open round ``rnd`` for ``clients`` (served in this order); returns their tokens."""
        with self.cond:
            self.round, self.meter, self.done = rnd, meter, set()
            self.order = [client_name(c) for c in clients]
            tokens = {c: secrets.token_urlsafe(24) for c in clients}
            self.tokens = {t: client_name(c) for c, t in tokens.items()}
            return tokens

    def _wait_turn(self, me: str) -> None:
        with self.cond:
            if me not in self.order or me in self.done:
                raise MessageError(f"{me} is not expected on the split link in round {self.round}")
            ahead = self.order[: self.order.index(me)]
            ready = lambda: self.closed or self.done.issuperset(ahead)  # noqa: E731
            if not self.cond.wait_for(ready, self.turn_timeout):
                raise MessageError(f"{me} waited {self.turn_timeout:g} s for its turn")
            if self.closed:
                raise MessageError("the split server is shutting down")

    def close(self) -> None:
        """Release every stream still waiting for its turn (the run is ending)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def _finish(self, me: str) -> None:
        with self.cond:
            self.done.add(me)
            self.cond.notify_all()

    def handle(self, requests: Iterator[bytes], context, me: str) -> Iterator[bytes]:
        torch.set_num_threads(self.threads or os.cpu_count() or 1)  # per OS thread (OpenMP)
        try:
            self._wait_turn(me)
            for data in requests:
                msg = receive_counted(self.wire, data)
                if msg.sender != me or msg.round != self.round:
                    raise MessageError(
                        f"split link of {me} got a message from {msg.sender} "
                        f"for round {msg.round} in round {self.round}"
                    )
                with self.lock, self.meter.measure():
                    reply = self.server.serve(msg)
                yield self.wire.send(reply)
        except MessageError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            self._finish(me)


def start_split_service(
    server,
    wire: Wire,
    bind: str,
    *,
    certfile=None,
    keyfile=None,
    max_bytes=rpc.DEFAULT_MAX_BYTES,
    workers=8,
    threads=0,
):
    """Start the split server's stream endpoint; returns ``(service, grpc_server, port)``."""
    service = SplitService(server, wire, threads=threads)
    grpc_server, port = rpc.serve(
        service.handle,
        bind,
        lambda: service.tokens,
        certfile=certfile,
        keyfile=keyfile,
        max_bytes=max_bytes,
        workers=workers,
    )
    return service, grpc_server, port


class RemoteLink:
    """The client's ``link`` in Flower: ``call`` goes to the split server over the stream,
    counted in the client's ``wire``; the client's compute meter is paused while it waits."""

    def __init__(self, stream: rpc.Stream, wire: Wire, meter: ComputeMeter | None) -> None:
        self.stream, self.wire, self.meter = stream, wire, meter

    def call(self, msg: Message) -> Message:
        data = self.wire.send(msg)
        with paused(self.meter):
            answer = self.stream.call(data)
        return receive_counted(self.wire, answer)
