"""Mesh-key authentication for grpc.aio, plus the server and channel factories that use it.

Every RPC carries four metadata entries proving the caller holds the mesh key without
sending it:

    x-together-ts     caller's wall clock, seconds (decimal string)
    x-together-nonce  128 random bits, hex
    x-together-node   caller's node id
    x-together-auth   hex HMAC-SHA256(key, "method|ts|nonce|node")

The server checks the MAC in constant time, the timestamp within a window, and refuses a
nonce it has already seen inside that window. Every request message, unary or streamed (each Frame
on Forward, each Result on Deliver), also carries its own seal (mesh/seal.py: time, nonce and a MAC
of its bytes, method and sender), checked on the raw bytes before parsing, so an altered byte, a
message moved to another method or sender, or a replayed one is refused. And a keyed mesh speaks
mutual TLS on certificates derived from the key (mesh/tls.py): without it there is no connection.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, NoReturn, cast

import grpc
import grpc.aio
from google.protobuf.message import Message

from backends.errors import TogetherError
from mesh.seal import BAD_MESSAGE, REFUSAL, SEAL_LEN, SEAL_PREFIX, TAG_LEN, _seal_mac, seal, sealed, sealed_handler
from mesh.tls import TLS_NAME, TLS_OPTIONS, ExplainRefusal, add_port, channel_credentials, tls_material

__all__ = ["BAD_MESSAGE", "REFUSAL", "SEAL_LEN", "SEAL_PREFIX", "TLS_NAME", "TLS_OPTIONS", "add_port",
           "channel_credentials", "seal", "tls_material"]

log = logging.getLogger(__name__)

TS_KEY = "x-together-ts"
NONCE_KEY = "x-together-nonce"
NODE_KEY = "x-together-node"
AUTH_KEY = "x-together-auth"

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
MIN_PING_INTERVAL_MS = 5_000

# Hidden states can be large and the links are long-lived: raise the 4 MiB default, and ping
# idle links so a dead peer is noticed in seconds rather than at the next TCP timeout.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle link, unlimited
)
# The server must tolerate the clients' 10 s pings; its default (5 min) would answer them
# with GOAWAY "too_many_pings".
SERVER_OPTIONS: tuple[tuple[str, int], ...] = CHANNEL_OPTIONS + (
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
    # gRPC sets SO_REUSEPORT by default: a second peer given a port another one listens on would share
    # it (the kernel splitting connections between them) instead of being told the port is taken
    ("grpc.so_reuseport", 0),
)

MeshKey = str | bytes | None
Metadata = tuple[tuple[str, str], ...]
Options = Sequence[tuple[str, int | str]]  # gRPC channel arguments
Context = grpc.aio.ServicerContext[Message, Message]


def _key_bytes(mesh_key: MeshKey) -> bytes | None:
    if mesh_key is None:
        return None
    key = mesh_key.encode() if isinstance(mesh_key, str) else bytes(mesh_key)
    return key or None  # an empty --mesh-key means "no key", not "the empty key"


def _method_str(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


def read_key(value: str | None, path: str | None, env: str, flag: str) -> str | None:
    """A key from its flag, else its file (first line), else the environment variable `env`."""
    if value and path:
        raise TogetherError(f"give {flag} or {flag}-file, not both")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                value = f.readline().strip()
        except OSError as e:
            raise TogetherError(f"{flag}-file {path}: {e.strerror}") from None
        if not value:
            raise TogetherError(f"{flag}-file {path} is empty: write the key on its first line")
    return value or os.environ.get(env) or None


def _mac(key: bytes, method: str, ts: str, nonce: str, node: str) -> str:
    msg = "|".join((method, ts, nonce, node)).encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def auth_metadata(
    mesh_key: MeshKey,
    method: str | bytes,
    node_id: str,
    *,
    now: float | None = None,
    nonce: str | None = None,
) -> Metadata:
    """Call metadata proving this caller holds mesh_key for one call of `method`.

    `method` is the full gRPC path, e.g. "/together.Together/Status". Without a key the
    result is empty.
    """
    key = _key_bytes(mesh_key)
    if key is None:
        return ()
    ts = f"{time.time() if now is None else now:.3f}"
    nonce = nonce or secrets.token_hex(16)
    method = _method_str(method)
    return (
        (TS_KEY, ts),
        (NONCE_KEY, nonce),
        (NODE_KEY, node_id),
        (AUTH_KEY, _mac(key, method, ts, nonce, node_id)),
    )


class MeshKeyVerifier:
    """Checks auth metadata: MAC, clock window and nonce replay (bounded in size and time)."""

    def __init__(self, mesh_key: str | bytes, *, window_s: float = 60.0, max_nonces: int = 100_000) -> None:
        key = _key_bytes(mesh_key)
        if key is None:
            raise ValueError("MeshKeyVerifier needs a non-empty mesh key")
        self._key = key
        self._window_s = window_s
        self._max_nonces = max_nonces
        self._seen: OrderedDict[str, tuple[float, float]] = OrderedDict()  # nonce -> (accepted at, its ts)
        self._floor = 0.0  # newest ts forgotten for room: anything older could be a replay

    def verify(self, method: str | bytes, metadata: Iterable[tuple[str, str | bytes]] | None, *,
               now: float | None = None) -> str | None:
        """None when the metadata authenticates this call, else the reason it does not."""
        now = time.time() if now is None else now
        fields: dict[str, str] = {}
        for key, value in metadata or ():
            if key in (TS_KEY, NONCE_KEY, NODE_KEY, AUTH_KEY) and key not in fields:
                fields[key] = value.decode() if isinstance(value, bytes) else value
        if AUTH_KEY not in fields:
            return "no auth metadata"
        ts, nonce, node = fields.get(TS_KEY, ""), fields.get(NONCE_KEY, ""), fields.get(NODE_KEY, "")
        expected = _mac(self._key, _method_str(method), ts, nonce, node)
        if not hmac.compare_digest(expected.encode(), fields[AUTH_KEY].encode()):
            return f"bad MAC from node {node!r}"
        try:
            skew = abs(now - float(ts))
        except ValueError:
            return f"bad timestamp {ts!r} from node {node!r}"
        if skew > self._window_s:
            return f"timestamp {skew:.0f} s off from node {node!r} (clocks out of sync?)"
        if not nonce:
            return f"empty nonce from node {node!r}"
        return self._fresh(nonce, float(ts), now, node)

    def verify_seal(self, method: str | bytes, node: str, raw: bytes, *, now: float | None = None) -> str | None:
        """None when `raw` ends with a valid, fresh seal of `method` from `node`, else why not."""
        now = time.time() if now is None else now
        if len(raw) < SEAL_LEN or raw[-SEAL_LEN:-SEAL_LEN + len(SEAL_PREFIX)] != SEAL_PREFIX:
            return f"an unsealed message from node {node!r}"
        head = raw[-SEAL_LEN + len(SEAL_PREFIX):-TAG_LEN]
        expected = _seal_mac(self._key, _method_str(method), node, head, memoryview(raw)[:-SEAL_LEN])
        if not hmac.compare_digest(expected, raw[-TAG_LEN:]):
            return f"a message with a bad MAC from node {node!r} (altered in transit?)"
        (ts,) = struct.unpack(">d", head[:8])
        if not abs(now - ts) <= self._window_s:
            return f"a message {abs(now - ts):.0f} s off from node {node!r} (clocks out of sync?)"
        return self._fresh("m" + head[8:].hex(), ts, now, node)

    def _fresh(self, nonce: str, ts: float, now: float, node: str) -> str | None:
        self._expire(now)
        if nonce in self._seen or ts < self._floor:
            return f"replayed nonce from node {node!r}"
        self._seen[nonce] = (now, ts)
        return None

    def _expire(self, now: float) -> None:
        # Nonces older than twice the window can't pass the clock check again, so forgetting
        # them is safe; the size cap bounds memory under a flood (oldest go first).
        horizon = now - 2 * self._window_s
        while self._seen:
            nonce, (seen_at, ts) = next(iter(self._seen.items()))
            if seen_at >= horizon and len(self._seen) < self._max_nonces:
                break
            if seen_at >= horizon:  # forgotten for room while it could still pass the clock check
                self._floor = max(self._floor, ts)
            del self._seen[nonce]


def _refusing_handler(handler: grpc.RpcMethodHandler | None, method: str, reason: str) -> grpc.RpcMethodHandler:
    async def refuse(context: Context) -> NoReturn:
        log.warning("refused %s from %s: %s", method, context.peer(), reason)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)

    async def unary(request: Message, context: Context) -> Message:
        await refuse(context)

    async def streaming(request: Message, context: Context) -> AsyncIterator[Message]:
        await refuse(context)
        yield  # pragma: no cover - makes this an async generator; abort raises first

    # Mirror the real handler's arity and (de)serializers so the call is torn down cleanly.
    req_stream = bool(handler and handler.request_streaming)
    resp_stream = bool(handler and handler.response_streaming)
    deser = handler.request_deserializer if handler else None
    ser = handler.response_serializer if handler else None
    if req_stream and resp_stream:
        return grpc.stream_stream_rpc_method_handler(streaming, deser, ser)
    if req_stream:
        return grpc.stream_unary_rpc_method_handler(unary, deser, ser)
    if resp_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, deser, ser)
    return grpc.unary_unary_rpc_method_handler(unary, deser, ser)


class MeshKeyServerInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call, unary or streaming, whose metadata does not prove the mesh key."""

    def __init__(self, mesh_key: str | bytes, *, window_s: float = 60.0, max_nonces: int = 100_000) -> None:
        self._verifier = MeshKeyVerifier(mesh_key, window_s=window_s, max_nonces=max_nonces)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = _method_str(handler_call_details.method)
        metadata = handler_call_details.invocation_metadata
        reason = self._verifier.verify(method, metadata)
        handler = await continuation(handler_call_details)
        if reason is not None:
            return _refusing_handler(handler, method, reason)
        if handler is None:
            return handler
        node = next((v.decode() if isinstance(v, bytes) else v for k, v in metadata or () if k == NODE_KEY), "")
        return sealed_handler(handler, method, lambda raw: self._open(method, node, raw, handler))

    def _open(self, method: str, node: str, raw: bytes, handler: grpc.RpcMethodHandler) -> Any:
        """The request parsed from its sealed bytes, or the reason it is refused (a str)."""
        reason = self._verifier.verify_seal(method, node, raw)
        if reason is not None:
            return reason
        body = memoryview(raw)[:-SEAL_LEN]  # no copy of the hidden states
        return handler.request_deserializer(body) if handler.request_deserializer else bytes(body)


class _Signer:
    def __init__(self, mesh_key: bytes, node_id: str) -> None:
        self._key = mesh_key
        self._node_id = node_id

    def details(self, call_details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(call_details.metadata or ()))
        for key, value in auth_metadata(self._key, call_details.method, self._node_id):
            metadata.add(key, value)
        return grpc.aio.ClientCallDetails(
            call_details.method,
            call_details.timeout,
            metadata,
            call_details.credentials,
            call_details.wait_for_ready,
        )

    async def signed(self, continuation: Callable[..., Any], call_details: grpc.aio.ClientCallDetails,
                     request: Any, streaming: bool = False) -> Any:
        # grpc.aio's continuation is a coroutine function that returns the call, which grpc.aio takes
        # back from the interceptor; grpc-stubs types it as returning the call directly.
        method = _method_str(call_details.method)
        if not streaming:
            request = sealed(self._key, method, self._node_id, request)
        elif hasattr(request, "__aiter__"):  # a stream, also one fed by call.write()
            request = self._seal_async(method, request)
        elif request is not None:
            request = (sealed(self._key, method, self._node_id, m) for m in request)
        return await continuation(self.details(call_details), request)

    async def _seal_async(self, method: str, requests: AsyncIterable[Message]) -> AsyncIterator[Message]:
        async for m in requests:
            yield sealed(self._key, method, self._node_id, m)


# grpc.aio's interceptor bases are not generic at run time: the classes below subclass them bare and
# spell the message types out on their methods, as grpc-stubs declares them.
Requests = AsyncIterable[Message] | Iterable[Message]
Responses = AsyncIterable[Message]


class _UnaryUnaryAuth(_Signer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Message], grpc.aio.UnaryUnaryCall[Message, Message]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Message,
    ) -> Message:
        return await self.signed(continuation, client_call_details, request)


class _UnaryStreamAuth(_Signer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Message], grpc.aio.UnaryStreamCall[Message, Message]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Message,
    ) -> Responses | grpc.aio.UnaryStreamCall[Message, Message]:
        return await self.signed(continuation, client_call_details, request)


class _StreamUnaryAuth(_Signer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Message], grpc.aio.StreamUnaryCall[Message, Message]],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Requests,
    ) -> Responses | grpc.aio.UnaryStreamCall[Message, Message]:
        return await self.signed(continuation, client_call_details, request_iterator, streaming=True)


class _StreamStreamAuth(_Signer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Message], grpc.aio.StreamStreamCall[Message, Message]],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Requests,
    ) -> Responses | grpc.aio.StreamStreamCall[Message, Message]:
        return await self.signed(continuation, client_call_details, request_iterator, streaming=True)


def client_interceptors(mesh_key: MeshKey, node_id: str) -> list[grpc.aio.ClientInterceptor]:
    """One signing interceptor per call arity (grpc.aio files each under exactly one kind)."""
    key = _key_bytes(mesh_key)
    if key is None:
        return []
    signers = [cls(key, node_id) for cls in (_UnaryUnaryAuth, _UnaryStreamAuth, _StreamUnaryAuth, _StreamStreamAuth)]
    # grpc-stubs declares ClientInterceptor as a placeholder that "must be cast"
    return cast(list[grpc.aio.ClientInterceptor], signers)


def sealed_request(mesh_key: MeshKey, method: str, node: str, msg: Message) -> Message:
    """A copy of `msg` sealed for one call of `method` (what the channel of make_channel sends)."""
    key = _key_bytes(mesh_key)
    return msg if key is None else sealed(key, method, node, msg)


def make_channel(
    address: str,
    mesh_key: MeshKey,
    node_id: str,
    *,
    options: Options = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to `address`: with a mesh key, mutual TLS on the key's certificates and
    every call and message signed; without one, plaintext. Close it with `await channel.close()`.
    `interceptors` run first (outermost), e.g. the test-only link delay of mesh/links.py.
    """
    key = _key_bytes(mesh_key)
    opts = list(CHANNEL_OPTIONS) + list(options)
    explain = list(interceptors) + cast(list[grpc.aio.ClientInterceptor], [ExplainRefusal(key is not None)])
    # hidden states don't compress; gzip only adds latency
    if key is None:
        return grpc.aio.insecure_channel(address, options=opts, compression=grpc.Compression.NoCompression,
                                         interceptors=explain)
    return grpc.aio.secure_channel(address, channel_credentials(key), options=opts + list(TLS_OPTIONS),
                                   compression=grpc.Compression.NoCompression,
                                   interceptors=explain + client_interceptors(key, node_id))


def make_server(
    mesh_key: MeshKey,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    options: Options = (),
    window_s: float = 60.0,
) -> grpc.aio.Server:
    """A grpc.aio server with mesh-key checking (when a key is given) and tuned transport options.

    Add servicers and ports, then `await server.start()`; pair it with `await server.stop(grace)`.
    """
    chain: list[grpc.aio.ServerInterceptor] = []
    key = _key_bytes(mesh_key)
    if key is not None:
        chain.append(MeshKeyServerInterceptor(key, window_s=window_s))
    chain.extend(interceptors)
    return grpc.aio.server(
        interceptors=chain,
        options=list(SERVER_OPTIONS) + list(options),
        compression=grpc.Compression.NoCompression,
    )
