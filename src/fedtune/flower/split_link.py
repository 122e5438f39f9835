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
import time
from collections.abc import Iterator

import grpc
import torch

from ..compute import ComputeMeter, paused
from ..errors import MessageError
from ..messages import SERVER, Message, Wire, check_routing, client_name
from . import rpc


def receive_counted(wire: Wire, data: bytes, expect: tuple[str, str, int] | None = None) -> Message:
    """Decode bytes that arrived from the other side and count them in ``wire``'s ledger
    (``Wire.send`` counts what this side sends; this counts what it receives). ``expect``:
    the ``(sender, receiver, round)`` it must carry, checked before it is counted."""
    msg = wire.receive(data)
    if expect is not None:
        check_routing(msg, *expect)
    wire.ledger.record(msg, len(data))
    return msg


class SplitService:
    """Answers a :class:`~fedtune.frameworks.Serving` server's ``serve`` requests over
    :mod:`fedtune.flower.rpc` streams; ``threads``: torch threads per serving thread (0 = all
    cores).

    No client can hold the others up: the client whose turn it is must open its stream within
    ``turn_timeout`` seconds and send each request within ``stall_timeout`` seconds of the
    last answer, or it is skipped (its stream cut) and the next one goes; a token opens one
    stream; every stream ends with its round. A refusal is sent to the client as a short code
    only; its reason stays here (``refused``) and becomes the client's lost reason."""

    def __init__(
        self,
        server,
        wire: Wire,
        *,
        threads: int = 0,
        turn_timeout: float = 60.0,
        stall_timeout: float = 120.0,
    ):
        self.server, self.wire, self.threads = server, wire, threads
        self.turn_timeout, self.stall_timeout = turn_timeout, stall_timeout
        self.address = ""  # host:port the clients dial, set once the server listens
        self.tokens: dict[str, str] = {}  # token -> client name, one secret per client and round
        self.order: list[str] = []
        self.done: set[str] = set()
        self.active: dict[str, grpc.ServicerContext] = {}  # streams being served
        self.streams: dict[str, grpc.ServicerContext] = {}  # every stream admitted this round
        self.refused: dict[str, str] = {}  # client name -> why, this round
        self.seen = time.monotonic()  # the last progress of the client whose turn it is
        self.computing = False  # the server is computing a request of that client
        self.open_round = False  # requests are served (and refusals undone) only while True
        self.round = 0
        self.closed = False
        self.meter: ComputeMeter | None = None
        self.cond = threading.Condition()
        self.lock = threading.Lock()  # Server.serve uses the one shared model
        self.watchdog = threading.Thread(target=self._watch, daemon=True, name="split-watchdog")

    def begin_round(self, rnd: int, clients: list[int], meter: ComputeMeter) -> dict[int, str]:
        """Open round ``rnd`` for ``clients`` (served in this order); returns their tokens."""
        with self.cond:
            self.round, self.meter, self.done, self.refused = rnd, meter, set(), {}
            self.open_round = True
            self.order = [client_name(c) for c in clients]
            tokens = {c: secrets.token_urlsafe(24) for c in clients}
            self.tokens = {t: client_name(c) for c, t in tokens.items()}
            self.seen = time.monotonic()
            self._cut_all()
            self.cond.notify_all()
            return tokens

    def _cut_all(self) -> None:
        """Cancel every stream of the round (holding ``cond``); none may outlive it."""
        for context in self.streams.values():
            context.cancel()
        self.streams, self.active = {}, {}

    def end_round(self) -> None:
        """The round's exchange is over: cut the streams still open and refuse new ones, so
        that nothing trains the server half while it is aggregated and evaluated."""
        with self.lock, self.cond:  # the lock: a request being served finishes first
            self.tokens, self.order, self.open_round = {}, [], False
            self._cut_all()  # a handler past its checks finds itself cut at the next one
            self.cond.notify_all()

    def _head(self) -> str | None:
        return next((c for c in self.order if c not in self.done), None)

    def _watch(self) -> None:
        """Skip the client whose turn it is when it does not open its stream in time, or
        stalls in it."""
        with self.cond:
            while not self.closed:
                self.cond.wait(0.2)
                head, now = self._head(), time.monotonic()
                if head is None:
                    continue
                streaming = head in self.active
                if streaming and self.computing:
                    continue
                limit = self.stall_timeout if streaming else self.turn_timeout
                if now - self.seen > limit and head not in self.refused:
                    what = "stalled on" if streaming else "did not open"
                    self.refused[head] = f"{what} its split stream for {limit:g} s"
                    if streaming:  # its handler undoes its batches, then lets the next go
                        self.active[head].cancel()
                    else:
                        self.done.add(head)
                        self.seen = now
                        self.cond.notify_all()

    def _wait_turn(self, me: str, context) -> None:
        with self.cond:  # one stream per token and round: a second one is refused at once
            if me not in self.order or me in self.done or me in self.streams:
                raise MessageError(f"{me} is not expected on the split link in round {self.round}")
            self.streams[me] = context
            ahead = self.order[: self.order.index(me)]
            self.cond.wait_for(
                lambda: (
                    self.closed
                    or self.streams.get(me) is not context
                    or self.done.issuperset(ahead)
                )
            )
            if self.closed or self.streams.get(me) is not context or me in self.done:
                raise MessageError(f"the split round {self.round} ended before {me}'s turn")
            self.active[me] = context
            self.seen = time.monotonic()

    def _progress(self, me: str, context, computing: bool = False) -> None:
        """``me`` made progress; while the server computes its request it cannot stall."""
        with self.cond:
            if self.active.get(me) is not context:  # cut by the watchdog or the round's end
                raise MessageError(f"{me}'s split stream was cut")
            self.seen, self.computing = time.monotonic(), computing

    def close(self) -> None:
        """Release every stream still waiting for its turn (the run is ending)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def _finish(self, me: str, context) -> None:
        with self.cond:  # only the stream being served moves the line on
            if self.active.get(me) is context:
                del self.active[me]
                self.done.add(me)
                self.seen, self.computing = time.monotonic(), False
            self.cond.notify_all()

    def handle(self, requests: Iterator[bytes], context, me: str) -> Iterator[bytes]:
        torch.set_num_threads(self.threads or os.cpu_count() or 1)  # per OS thread (OpenMP)
        try:  # a second stream with the same token, or one out of its round, changes nothing
            self._wait_turn(me, context)
        except MessageError:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "not expected")
        why, completed = "", False
        try:
            for data in requests:
                self._progress(me, context)
                msg = receive_counted(self.wire, data, (me, SERVER, self.round))
                with self.lock:
                    self._progress(me, context, computing=True)  # not cut while it waited
                    try:
                        with self.meter.measure():
                            reply = self.server.serve(msg)
                    finally:
                        with self.cond:
                            self.computing = False
                yield self.wire.send(reply)
            completed = True
        except MessageError as e:
            why = str(e)[:200]
        except grpc.RpcError:
            why = "its split stream was cut or closed"  # stall, end of round, client gone
        finally:
            if not completed:  # undo what its accepted requests did, before the next client
                why = why or "its split stream ended abnormally"
                with self.lock:
                    if self.open_round:  # after the round's end the server owns its state
                        self.server.refuse(me, why)
                        with self.cond:
                            self.refused.setdefault(me, why)
            self._finish(me, context)
        if not completed and why and not why.startswith("its split stream"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused")  # the reason stays here


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
    turn_timeout=60.0,
    stall_timeout=120.0,
):
    """Start the split server's stream endpoint; returns ``(service, grpc_server, port)``."""
    service = SplitService(
        server, wire, threads=threads, turn_timeout=turn_timeout, stall_timeout=stall_timeout
    )
    service.watchdog.start()
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
