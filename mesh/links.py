"""Long-lived outgoing gRPC streams to other peers, one per (address, kind), reopened on failure; and
the test-only link delay (`--link-delay-ms`): every message this peer sends arrives that much later."""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any, Callable, Literal, cast

import grpc
from google.protobuf.message import Message

from mesh.auth import (CHANNEL_OPTIONS, TLS_OPTIONS, MeshKey, _key_bytes, auth_metadata, channel_credentials,
                       make_channel)
from mesh.seal import sealed_bytes
from protos import together_pb2 as pb
from protos import together_pb2_grpc as pbg

log = logging.getLogger(__name__)
Payload = bytes | memoryview  # a Frame's hidden states, sent after its other fields
Kind = Literal["Forward", "Deliver"]  # Forward carries Frames to the next stage, Deliver Results to an origin
Item = Message | tuple[Message, Payload] | bytes  # bytes: already sealed and serialized (a delayed message)


class Peers:
    """Channels and stubs by address, plus the Forward/Deliver streams over them."""

    def __init__(self, mesh_key: MeshKey, node_id: str, delay_s: float = 0.0) -> None:
        # delay_s: the test-only link delay; every message to another peer leaves this much later
        self.mesh_key, self.node_id, self.delay_s = mesh_key, node_id, delay_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stream_channels: dict[str, grpc.aio.Channel] = {}
        self._streams: dict[tuple[str, Kind], Stream] = {}
        self.on_broken: Callable[[str], None] | None = None  # a stream to this address died (not closed by us)

    def stub(self, address: str) -> pbg.TogetherStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = make_channel(address, self.mesh_key, self.node_id,
                                                        interceptors=delay_interceptors(self.delay_s))
        return pbg.TogetherStub(ch)

    def busy(self, address: str, within_s: float) -> bool:
        """A stream to `address` carried a message in the last `within_s` seconds."""
        since = time.monotonic() - within_s
        return any(s.last_write > since for (a, _), s in self._streams.items() if a == address)

    def open_stream(self, address: str, kind: Kind) -> grpc.aio.StreamStreamCall[Any, pb.Ack]:
        """A new Forward/Deliver call on a channel without interceptors: this side signs the call
        and seals each message as it serializes it, so a write goes straight to the call (an
        intercepted stream passes every message through a queue and a task)."""
        ch = self._stream_channels.get(address)
        if ch is None:
            ch = self._stream_channels[address] = stream_channel(address, self.mesh_key)
        method = f"/together.Together/{kind}"
        key = _key_bytes(self.mesh_key)
        call = ch.stream_stream(method, request_serializer=partial(_serialize, key, method, self.node_id),
                                response_deserializer=pb.Ack.FromString)
        return call(None, metadata=auth_metadata(key, method, self.node_id), wait_for_ready=False)

    def stream(self, address: str, kind: Kind) -> Stream:
        key = (address, kind)
        s = self._streams.get(key)
        if s is None:
            s = self._streams[key] = Stream(self, address, kind)
        return s

    async def close(self) -> None:
        for s in self._streams.values():
            s.shutdown()
        self._streams.clear()
        for ch in [*self._channels.values(), *self._stream_channels.values()]:
            await ch.close(grace=None)
        self._channels.clear()
        self._stream_channels.clear()


def _serialize(key: bytes | None, method: str, node: str, m: Item) -> bytes:
    if isinstance(m, bytes):
        return m
    return sealed_bytes(key, method, node, *m) if isinstance(m, tuple) else sealed_bytes(key, method, node, m)


def stream_channel(address: str, mesh_key: MeshKey) -> grpc.aio.Channel:
    """make_channel's transport (TLS on the key's certificates, or plaintext) without its interceptors."""
    key = _key_bytes(mesh_key)
    none = grpc.Compression.NoCompression  # hidden states don't compress; gzip only adds latency
    if key is None:
        return grpc.aio.insecure_channel(address, options=list(CHANNEL_OPTIONS), compression=none)
    return grpc.aio.secure_channel(address, channel_credentials(key), options=list(CHANNEL_OPTIONS) + list(TLS_OPTIONS),
                                   compression=none)


class Stream:
    """A client stream (Forward or Deliver) that multiplexes every sequence over one HTTP/2 stream."""

    def __init__(self, peers: Peers, address: str, kind: Kind) -> None:
        self.peers, self.address, self.kind = peers, address, kind
        self._call: grpc.aio.StreamStreamCall[Any, pb.Ack] | None = None
        self._lock = asyncio.Lock()
        self.last_write = 0.0  # monotonic time of the last message sent (a busy link is not probed)
        self._delayed: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    async def send(self, msg: pb.Frame | pb.Result, payload: Payload = b"") -> None:
        """Write `msg`, `payload` as its `data` (a Frame's hidden states, not copied into the message)."""
        item: Item = (msg, payload) if len(payload) else msg
        self.last_write = time.monotonic()
        if self.peers.delay_s:
            return self._send_later(item)
        async with self._lock:  # grpc.aio allows one write in flight per call; writes go in order
            await self._write(item)

    async def _write(self, item: Item) -> None:
        for attempt in (0, 1):
            if self._call is None or self._call.done():
                self._call = self.peers.open_stream(self.address, self.kind)
                self._call.add_done_callback(self._ended)
            try:
                await self._call.write(item)
                return
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as e:
                log.debug("%s stream to %s broke (%s); reopening", self.kind, self.address, e)
                self.close()
                if attempt:
                    raise ConnectionError(f"cannot reach {self.address}: {e}") from None

    def _send_later(self, item: Item) -> None:
        """The test-only delay: the message is sealed now (the caller may reuse its objects) and written
        delay_s later by one writer task, in order; the sender does not wait, so messages sent 1 ms
        apart still arrive 1 ms apart."""
        method = f"/together.Together/{self.kind}"
        data = _serialize(_key_bytes(self.peers.mesh_key), method, self.peers.node_id, item)
        self._delayed.put_nowait((time.monotonic() + self.peers.delay_s, data))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_delayed())

    async def _write_delayed(self) -> None:
        while True:
            due, data = await self._delayed.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            try:
                async with self._lock:
                    await self._write(data)
            except ConnectionError as e:  # no sender waits to hear it: the frame's deadline replays it
                log.warning("a delayed %s message to %s was lost: %s", self.kind, self.address, e)

    def _ended(self, call: grpc.aio.Call) -> None:
        # the peer's process died or its link broke: say so at once rather than wait for heartbeats
        if call.cancelled() or self.peers.on_broken is None:
            return
        self.peers.on_broken(self.address)

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def shutdown(self) -> None:
        """Close for good: also drop the messages still held back by the test-only delay."""
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        self.close()


class _Delay:
    """Holds each call this peer makes back by the test-only link delay before it leaves."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    async def delayed(self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails,
                      request: Any) -> Any:
        await asyncio.sleep(self.delay_s)
        return await continuation(details, request)


class _DelayUnary(_Delay, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Callable[..., Any], client_call_details:
                                    grpc.aio.ClientCallDetails, request: Message) -> Any:
        return await self.delayed(continuation, client_call_details, request)


class _DelayUnaryStream(_Delay, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Callable[..., Any], client_call_details:
                                     grpc.aio.ClientCallDetails, request: Message) -> Any:
        return await self.delayed(continuation, client_call_details, request)


def delay_interceptors(delay_s: float) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that delay every unary call (and a server stream's request) by delay_s; [] for 0."""
    if delay_s <= 0:
        return []
    return cast(list[grpc.aio.ClientInterceptor], [_DelayUnary(delay_s), _DelayUnaryStream(delay_s)])
