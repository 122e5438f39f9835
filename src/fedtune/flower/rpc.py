"""A bytes-in, bytes-out gRPC bidirectional stream (no protoc): the split-server link and the
SuperNode's fedtune worker both use it.

One service ``/fedtune.Bytes/Stream``; each request and response is one opaque bytes frame (an
encoded :class:`~fedtune.messages.Message` or a :func:`pack` frame). The server checks a shared
token sent as call metadata, enforces a size limit on every frame, and the client turns every
transport failure (server gone, deadline, refused) into a one-line :class:`MessageError`.
"""

from __future__ import annotations

import hmac
import json
import queue
import struct
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc

from ..errors import MessageError

METHOD = "/fedtune.Bytes/Stream"
TOKEN_KEY = "fedtune-token"
DEFAULT_MAX_BYTES = 512 * 1024**2  # gRPC caps a frame at 2 GiB - 1; activations stay far below


def _identity(b: bytes) -> bytes:
    return b


def pack(header: dict, blob: bytes = b"") -> bytes:
    """One frame: ``<u32 header length> <JSON header> <blob>`` (never pickle)."""
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<I", len(h)) + h + blob


def unpack(frame: bytes) -> tuple[dict, bytes]:
    """Inverse of :func:`pack`; malformed frames raise :class:`MessageError`."""
    if len(frame) < 4:
        raise MessageError(f"frame truncated: {len(frame)} bytes")
    (n,) = struct.unpack("<I", frame[:4])
    if 4 + n > len(frame):
        raise MessageError(f"frame header length {n} is invalid for {len(frame)} bytes")
    try:
        header = json.loads(frame[4 : 4 + n])
    except ValueError:
        raise MessageError("frame header is not JSON") from None
    if not isinstance(header, dict):
        raise MessageError("frame header is not an object")
    return header, frame[4 + n :]


def _options(max_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.keepalive_time_ms", 20_000),  # notice a vanished peer on an idle stream
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def find_peer(tokens: dict[str, str], given: str) -> str | None:
    """The peer ``given`` identifies, comparing it with every token in constant time (a
    dictionary lookup's timing would tell an attacker how much of a guess was right)."""
    found, given_b = None, str(given).encode()
    for token, peer in tokens.items():
        if hmac.compare_digest(token.encode(), given_b):
            found = peer
    return found


Handler = Callable[[Iterator[bytes], grpc.ServicerContext, str], Iterator[bytes]]


def serve(
    handler: Handler,
    bind: str,
    tokens: Callable[[], dict[str, str]],
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    workers: int = 8,
) -> tuple[grpc.Server, int]:
    """Start a server on ``bind`` (``host:port``, port 0 = any free one) whose stream calls
    ``handler(requests, context, peer)``; returns ``(server, port)``. TLS when a cert and key
    are given. ``tokens()`` maps each valid token to the peer it identifies (e.g. a client
    name); calls with any other token are refused before the handler runs."""

    def guarded(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        peer = find_peer(tokens(), dict(context.invocation_metadata()).get(TOKEN_KEY, ""))
        if peer is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing fedtune token")
        yield from handler(requests, context, peer)

    rpc = grpc.stream_stream_rpc_method_handler(guarded, _identity, _identity)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), options=_options(max_bytes)
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("fedtune.Bytes", {"Stream": rpc}),)
    )
    if certfile and keyfile:
        with open(certfile, "rb") as c, open(keyfile, "rb") as k:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        port = server.add_secure_port(bind, creds)
    else:
        port = server.add_insecure_port(bind)
    if port == 0:
        raise MessageError(f"cannot listen on {bind}")
    server.start()
    return server, port


class Stream:
    """Client end of one stream: ``call(frame) -> frame``, in order, one at a time.

    ``connect_timeout`` bounds the wait for the server; ``timeout`` bounds the whole stream
    (a deadline); a server that goes away mid-stream raises :class:`MessageError`."""

    def __init__(
        self,
        address: str,
        token: str,
        *,
        root_cert: str | None = None,
        timeout: float = 3600.0,
        connect_timeout: float = 30.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        what: str = "server",
    ) -> None:
        self.address, self.what = address, what
        if root_cert:
            with open(root_cert, "rb") as f:
                creds = grpc.ssl_channel_credentials(root_certificates=f.read())
            self.channel = grpc.secure_channel(address, creds, options=_options(max_bytes))
        else:
            self.channel = grpc.insecure_channel(address, options=_options(max_bytes))
        try:
            grpc.channel_ready_future(self.channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise MessageError(
                f"{what} at {address} unreachable after {connect_timeout:g} s"
            ) from None
        self._requests: queue.Queue = queue.Queue()
        stub = self.channel.stream_stream(METHOD, _identity, _identity)
        self._responses = stub(
            iter(self._requests.get, None), timeout=timeout, metadata=((TOKEN_KEY, token),)
        )

    def call(self, frame: bytes) -> bytes:
        self._requests.put(frame)
        try:
            return next(self._responses)
        except StopIteration:
            raise MessageError(f"{self.what} at {self.address} closed the stream") from None
        except grpc.RpcError as e:
            raise MessageError(
                f"{self.what} at {self.address} went away: {e.code().name}: {e.details()}"
            ) from None

    def close(self) -> None:
        self._requests.put(None)  # ends the request iterator: the server sees a clean close
        try:
            for _ in self._responses:  # drain so the server's handler finishes first
                pass
        except grpc.RpcError:
            pass
        self.channel.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
