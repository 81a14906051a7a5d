"""Long-lived outgoing gRPC streams to other peers, one per (address, kind), reopened on failure."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Literal

import grpc

from mesh.auth import MeshKey, make_channel
from protos import together_pb2 as pb
from protos import together_pb2_grpc as pbg

log = logging.getLogger(__name__)
Kind = Literal["Forward", "Deliver"]  # Forward carries Frames to the next stage, Deliver Results to an origin


class Peers:
    """Channels and stubs by address, plus the Forward/Deliver streams over them."""

    def __init__(self, mesh_key: MeshKey, node_id: str) -> None:
        self.mesh_key, self.node_id = mesh_key, node_id
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._streams: dict[tuple[str, Kind], Stream] = {}
        self.on_broken: Callable[[str], None] | None = None  # a stream to this address died (not closed by us)

    def stub(self, address: str) -> pbg.TogetherStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = make_channel(address, self.mesh_key, self.node_id)
        return pbg.TogetherStub(ch)

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
        for ch in self._channels.values():
            await ch.close(grace=None)
        self._channels.clear()


class Stream:
    """A client stream (Forward or Deliver) that multiplexes every sequence over one HTTP/2 stream."""

    def __init__(self, peers: Peers, address: str, kind: Kind) -> None:
        self.peers, self.address, self.kind = peers, address, kind
        self._call: grpc.aio.StreamStreamCall[pb.Frame | pb.Result, pb.Ack] | None = None
        self._lock = asyncio.Lock()

    async def send(self, msg: pb.Frame | pb.Result) -> None:
        async with self._lock:  # grpc.aio allows one write in flight per call
            for attempt in (0, 1):
                if self._call is None or self._call.done():
                    self._call = getattr(self.peers.stub(self.address), self.kind)(wait_for_ready=False)
                    self._call.add_done_callback(self._ended)
                try:
                    await self._call.write(msg)
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
