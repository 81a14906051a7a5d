import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from mesh.auth import (
    AUTH_KEY,
    MeshKeyVerifier,
    REFUSAL,
    auth_metadata,
    make_channel,
    make_server,
)
from protos import together_pb2 as pb
from protos import together_pb2_grpc as pb_grpc

KEY = "correct horse battery staple"
STATUS = "/together.Together/Status"


class TinyServicer(pb_grpc.TogetherServicer):
    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusReply:
        return pb.StatusReply(peer=pb.PeerInfo(node_id="server"), sequences=3)

    async def Forward(
        self, request_iterator: AsyncIterator[pb.Frame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Ack]:
        async for _ in request_iterator:
            yield pb.Ack()


@contextlib.asynccontextmanager
async def _served(mesh_key: str | None) -> AsyncIterator[str]:
    """A TinyServicer behind make_server(mesh_key), for the duration of the block: its address."""
    server = make_server(mesh_key)
    pb_grpc.add_TogetherServicer_to_server(TinyServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def _status(address: str, mesh_key: str | None) -> pb.StatusReply:
    async with make_channel(address, mesh_key, "client-node") as channel:
        return await pb_grpc.TogetherStub(channel).Status(pb.StatusRequest(), timeout=5)


async def _forward(address: str, mesh_key: str | None, frames: int = 3) -> int:
    async with make_channel(address, mesh_key, "client-node") as channel:
        call = pb_grpc.TogetherStub(channel).Forward(timeout=5)
        for i in range(frames):
            await call.write(pb.Frame(frame_id=i))
        await call.done_writing()
        return len([ack async for ack in call])


async def _refused_forward(address: str, mesh_key: str | None) -> grpc.aio.AioRpcError:
    # Read before writing: a write racing the server's abort can fail locally with INTERNAL
    # ("Internal error from Core") before the real status arrives (a grpc.aio quirk).
    async with make_channel(address, mesh_key, "client-node") as channel:
        call = pb_grpc.TogetherStub(channel).Forward(timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
        return err.value


def run(coro):  # tests stay sync: no pytest-asyncio in this project
    return asyncio.run(coro)


def test_right_key_unary_and_stream() -> None:
    async def main() -> None:
        async with _served(KEY) as address:
            reply = await _status(address, KEY)
            assert reply.sequences == 3 and reply.peer.node_id == "server"
            assert await _forward(address, KEY) == 3

    run(main())


@pytest.mark.parametrize("client_key", ["wrong key", None])
def test_wrong_or_missing_key_refused(client_key: str | None, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with _served(KEY) as address:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _status(address, client_key)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert err.value.details() == REFUSAL
            refused = await _refused_forward(address, client_key)
            assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "--mesh-key" in refused.details()
            # the server is still up and serves the right key
            assert (await _status(address, KEY)).sequences == 3

    with caplog.at_level(logging.WARNING, logger="mesh.auth"):
        run(main())
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 2
    assert "127.0.0.1" in refusals[0].getMessage()


def test_keyless_server_accepts_anyone() -> None:
    async def main() -> None:
        async with _served(None) as address:
            assert (await _status(address, None)).sequences == 3
            assert (await _status(address, KEY)).sequences == 3

    run(main())


def test_replayed_metadata_refused() -> None:
    async def main() -> None:
        async with _served(KEY) as address:
            metadata = auth_metadata(KEY, STATUS, "client-node")
            async with make_channel(address, None, "client-node") as channel:
                stub = pb_grpc.TogetherStub(channel)
                assert (await stub.Status(pb.StatusRequest(), metadata=metadata, timeout=5)).sequences == 3
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Status(pb.StatusRequest(), metadata=metadata, timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                # metadata signed for one method does not open another
                other = auth_metadata(KEY, "/together.Together/GetPlan", "client-node")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Status(pb.StatusRequest(), metadata=other, timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert (await _status(address, KEY)).sequences == 3

    run(main())


def test_verifier_window_replay_and_tamper() -> None:
    v = MeshKeyVerifier(KEY, window_s=60, max_nonces=4)
    now = 1_000_000.0
    md = auth_metadata(KEY, STATUS, "n1", now=now)
    assert v.verify(STATUS, md, now=now + 1) is None
    assert "replayed" in (v.verify(STATUS, md, now=now + 2) or "")
    assert "off" in (v.verify(STATUS, auth_metadata(KEY, STATUS, "n1", now=now - 61), now=now) or "")
    assert "off" in (v.verify(STATUS, auth_metadata(KEY, STATUS, "n1", now=now + 61), now=now) or "")
    assert v.verify(STATUS, (), now=now) == "no auth metadata"
    tampered = tuple((k, "0" * 64 if k == AUTH_KEY else val) for k, val in auth_metadata(KEY, STATUS, "n1", now=now))
    assert "bad MAC" in (v.verify(STATUS, tampered, now=now) or "")
    renamed = tuple((k, "n2" if k == "x-together-node" else val) for k, val in auth_metadata(KEY, STATUS, "n1", now=now))
    assert "bad MAC" in (v.verify(STATUS, renamed, now=now) or "")
    # the replay cache stays bounded
    for _ in range(20):
        assert v.verify(STATUS, auth_metadata(KEY, STATUS, "n1", now=now), now=now) is None
    assert len(v._seen) <= 4
    # old nonces are forgotten once they can no longer pass the clock check
    v.verify(STATUS, auth_metadata(KEY, STATUS, "n1", now=now + 500), now=now + 500)
    assert len(v._seen) == 1


def test_no_key_means_no_metadata() -> None:
    assert auth_metadata(None, STATUS, "n") == ()
    assert auth_metadata("", STATUS, "n") == ()
    with pytest.raises(ValueError):
        MeshKeyVerifier("")
