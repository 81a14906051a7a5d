"""Test clusters: real `together join` processes on 127.0.0.1 (see mesh/local.py)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterable, Iterator

import grpc

from mesh.auth import make_channel
from mesh.local import LocalMesh, PeerProc, free_port  # noqa: F401  (re-exported for tests)
from protos import together_pb2 as pb
from protos import together_pb2_grpc as pbg


class Cluster(LocalMesh):
    """A LocalMesh (under a random mesh name unless given one, so tests never see each other) plus a
    Status probe."""

    def status(self, peer: PeerProc) -> pb.StatusReply:
        async def go() -> pb.StatusReply:
            async with make_channel(peer.address, self.mesh_key, "test") as ch:
                reply: pb.StatusReply = await pbg.TogetherStub(ch).Status(pb.StatusRequest(), timeout=5)
                return reply

        return asyncio.run(go())


@contextlib.contextmanager
def two_peer_ring(model: str, backends: tuple[str, str] = ("torch", "torch"), mesh_key: str | None = None,
                  names: tuple[str, str] = ("a", "b"), api_both: bool = False, split: int = 15) -> Iterator[Cluster]:
    """The common fixture: layers 0-split (serving the API) and split-30 (also serving one with
    api_both), joined by --peer, float32."""
    c = Cluster(model, mesh_key=mesh_key)
    try:
        a = c.add(names[0], "--backend", backends[0], "--dtype", "float32", "--no-mdns", "--layers",
                  f"0-{split}", api=True)
        c.add(names[1], "--backend", backends[1], "--dtype", "float32", "--no-mdns", "--layers", f"{split}-30",
              "--peer", a.address, api=api_both)
        c.wait_ready(a, stages=2)
        yield c
    finally:
        c.stop()


def wait_log(peer: PeerProc, pattern: str, timeout: float = 60) -> re.Match[str]:
    """Wait until a peer's log matches `pattern`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = re.search(pattern, peer.log())
        if m:
            return m
        time.sleep(0.1)  # a read of a small file: the next step starts at most 0.1 s after the line
    raise AssertionError(f"{peer.name}: no {pattern!r} in log:\n{peer.log()[-3000:]}")


async def stream_frames(ch: grpc.aio.Channel, frames: Iterable[pb.Frame]) -> tuple[grpc.StatusCode, str]:
    """Write frames on one Forward stream of channel `ch`; the stream's final status. A write
    racing the server's abort can fail on our side (INTERNAL, or an ended stream): the call's own
    final status is what the server said."""
    call = pbg.TogetherStub(ch).Forward()
    try:
        for f in frames:
            await call.write(f)
        await call.done_writing()
        async for _ in call:
            pass
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass
    return await call.code(), await call.details() or ""
