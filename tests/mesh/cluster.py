"""Test clusters: real `together join` processes on 127.0.0.1 (see mesh/local.py)."""

from __future__ import annotations

import asyncio

from mesh.local import LocalMesh, PeerProc, free_port  # noqa: F401  (re-exported for tests)


class Cluster(LocalMesh):
    """A LocalMesh with a random mesh name, so tests never see each other, plus a Status probe."""

    def __init__(self, model: str, mesh_key: str | None = None):
        super().__init__(model, mesh=None, mesh_key=mesh_key)

    def status(self, peer: PeerProc):
        from mesh.auth import make_channel
        from protos import together_pb2 as pb
        from protos import together_pb2_grpc as pbg

        async def go():
            ch = make_channel(peer.address, self.mesh_key, "test")
            try:
                return await pbg.TogetherStub(ch).Status(pb.StatusRequest(), timeout=5)
            finally:
                await ch.close()

        return asyncio.run(go())
