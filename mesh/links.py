"""Long-lived outgoing gRPC streams to other peers, one per (address, kind), reopened on failure."""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any, Callable, Literal

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


class Peers:
    """Channels and stubs by address, plus the Forward/Deliver streams over them."""

    def __init__(self, mesh_key: MeshKey, node_id: str) -> None:
        self.mesh_key, self.node_id = mesh_key, node_id
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stream_channels: dict[str, grpc.aio.Channel] = {}
        self._streams: dict[tuple[str, Kind], Stream] = {}
        self.on_broken: Callable[[str], None] | None = None  # a stream to this address died (not closed by us)

    def stub(self, address: str) -> pbg.TogetherStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = make_channel(address, self.mesh_key, self.node_id)
        return pbg.TogetherStub(ch)

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
            s.close()
        self._streams.clear()
        for ch in [*self._channels.values(), *self._stream_channels.values()]:
            await ch.close(grace=None)
        self._channels.clear()
        self._stream_channels.clear()


def _serialize(key: bytes | None, method: str, node: str, m: Message | tuple[Message, Payload]) -> bytes:
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

    async def send(self, msg: pb.Frame | pb.Result, payload: Payload = b"") -> None:
        """Write `msg`, `payload` as its `data` (a Frame's hidden states, not copied into the message)."""
        item = (msg, payload) if len(payload) else msg
        async with self._lock:  # grpc.aio allows one write in flight per call; writes go in order
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

    def _ended(self, call: grpc.aio.Call) -> None:
        # the peer's process died or its link broke: say so at once rather than wait for heartbeats
        if call.cancelled() or self.peers.on_broken is None:
            return
        self.peers.on_broken(self.address)

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
