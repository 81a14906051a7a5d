import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from mesh.auth import (
    AUTH_KEY,
    SEAL_LEN,
    MeshKeyVerifier,
    REFUSAL,
    TLS_OPTIONS,
    add_port,
    channel_credentials,
    auth_metadata,
    make_channel,
    make_server,
    sealed_request,
)
from protos import together_pb2 as pb
from protos import together_pb2_grpc as pb_grpc

KEY = "correct horse battery staple"
STATUS = "/together.Together/Status"
FORWARD = "/together.Together/Forward"


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
    port = add_port(server, "127.0.0.1:0", mesh_key)
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
        return err.value


def _tls_channel(address: str) -> grpc.aio.Channel:
    """TLS with the mesh key's certificates but no signing: to send hand-made metadata and bytes."""
    return grpc.aio.secure_channel(address, channel_credentials(KEY), options=list(TLS_OPTIONS))


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
def test_wrong_or_missing_key_refused(client_key: str | None) -> None:
    """A peer without the key cannot finish the TLS handshake; a unary call says why (the key), as
    the server's own refusal would; a stream fails too, and the server keeps serving."""
    async def main() -> None:
        async with _served(KEY) as address:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _status(address, client_key)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert (err.value.details() or "").startswith(REFUSAL)
            refused = await _refused_forward(address, client_key)
            assert refused.code() == grpc.StatusCode.UNAVAILABLE  # no TLS session: nothing reached the servicer
            # the server is still up and serves the right key
            assert (await _status(address, KEY)).sequences == 3

    run(main())


def test_inside_tls_the_mac_still_decides(caplog: pytest.LogCaptureFixture) -> None:
    """Defence in depth: a client that completes TLS but signs with a wrong key, or not at all, is
    refused by the HMAC check, unary and stream alike."""
    async def main() -> None:
        async with _served(KEY) as address:
            async with _tls_channel(address) as ch:
                stub = pb_grpc.TogetherStub(ch)
                for md in ((), auth_metadata("wrong key", STATUS, "client-node")):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.Status(pb.StatusRequest(), metadata=md, timeout=5)
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and err.value.details() == REFUSAL
                call = stub.Forward(metadata=auth_metadata("wrong key", FORWARD, "client-node"), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "--mesh-key" in (err.value.details() or "")
            assert (await _status(address, KEY)).sequences == 3

    with caplog.at_level(logging.WARNING, logger="mesh.auth"):
        run(main())
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 3 and "127.0.0.1" in refusals[0].getMessage()


def test_keyless_server_accepts_anyone_without_a_key() -> None:
    """A keyless peer serves plaintext to anyone; a keyed peer will not talk to it in the clear and
    says why (the key), rather than "unavailable"."""
    async def main() -> None:
        async with _served(None) as address:
            assert (await _status(address, None)).sequences == 3
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _status(address, KEY)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert (err.value.details() or "").startswith(REFUSAL) and "TLS" in (err.value.details() or "")

    run(main())


def test_replayed_metadata_refused() -> None:
    async def main() -> None:
        async with _served(KEY) as address:
            metadata = auth_metadata(KEY, STATUS, "client-node")
            async with _tls_channel(address) as channel:
                stub = pb_grpc.TogetherStub(channel)
                req = sealed_request(KEY, STATUS, "client-node", pb.StatusRequest())
                assert (await stub.Status(req, metadata=metadata, timeout=5)).sequences == 3
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Status(sealed_request(KEY, STATUS, "client-node", pb.StatusRequest()),
                                      metadata=metadata, timeout=5)
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



class CountingServicer(TinyServicer):
    def __init__(self) -> None:
        self.frames: list[int] = []
        self.statuses = 0

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusReply:
        self.statuses += 1
        return await super().Status(request, context)

    async def Forward(self, request_iterator, context):  # type: ignore[no-untyped-def]
        async for frame in request_iterator:
            self.frames.append(frame.frame_id)
            yield pb.Ack()


async def _capture(method: str, send) -> list[bytes]:  # type: ignore[no-untyped-def]
    """What a keyed client really puts on the wire for `method`: a keyless recorder keeps the raw bytes."""
    got: list[bytes] = []

    async def record_stream(requests, context):  # type: ignore[no-untyped-def]
        async for raw in requests:
            got.append(raw)
            yield b""

    async def record_unary(raw, context):  # type: ignore[no-untyped-def]
        got.append(raw)
        return pb.StatusReply().SerializeToString()

    handler = (grpc.stream_stream_rpc_method_handler(record_stream) if method == FORWARD
               else grpc.unary_unary_rpc_method_handler(record_unary))
    server = make_server(None)  # no checks, but the mesh's TLS: a keyed client talks to nothing else
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "together.Together", {method.rsplit("/", 1)[1]: handler}),))
    port = add_port(server, "127.0.0.1:0", KEY)
    await server.start()
    try:
        async with make_channel(f"127.0.0.1:{port}", KEY, "client-node") as ch:
            await send(pb_grpc.TogetherStub(ch))
    finally:
        await server.stop(None)
    return got


async def _raw_forward(address: str, raws: list[bytes], node: str = "client-node") -> grpc.StatusCode:
    """Raw bytes as Frames on one Forward stream, with fresh, valid call metadata for `node`."""
    async with _tls_channel(address) as ch:
        call = ch.stream_stream(FORWARD, request_serializer=None, response_deserializer=None)(
            metadata=auth_metadata(KEY, FORWARD, node), timeout=5)
        try:
            for raw in raws:
                await call.write(raw)
            await call.done_writing()
            async for _ in call:
                pass
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        return await call.code()


def test_a_captured_frame_replayed_or_altered_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """Test 7: the seal covers each message's bytes, time, nonce, method and sender. A Frame
    captured off the wire is accepted once; replayed (on a new, validly signed stream), with one
    byte changed, under another sender or another method, it is refused; the server keeps serving."""
    async def main() -> None:
        async def send_frames(stub: pb_grpc.TogetherStub) -> None:
            call = stub.Forward(timeout=5)
            for i in (1, 2):
                await call.write(pb.Frame(frame_id=i, data=b"hidden states" * 10))
            await call.done_writing()
            [_ async for _ in call]

        async def send_status(stub: pb_grpc.TogetherStub) -> None:
            await stub.Status(pb.StatusRequest(), timeout=5)

        frames = await _capture(FORWARD, send_frames)
        assert len(frames) == 2 and pb.Frame.FromString(frames[0]).frame_id == 1
        [status] = await _capture(STATUS, send_status)
        servicer = CountingServicer()
        server = make_server(KEY)
        pb_grpc.add_TogetherServicer_to_server(servicer, server)
        port = add_port(server, "127.0.0.1:0", KEY)
        await server.start()
        address = f"127.0.0.1:{port}"
        try:
            assert await _raw_forward(address, [frames[0]]) == grpc.StatusCode.OK
            assert servicer.frames == [1]
            flipped = bytearray(frames[1])
            flipped[20] ^= 1  # inside the frame's data, before the seal
            for bad in ([frames[0]], [bytes(flipped)], [frames[1][:-1] + bytes([frames[1][-1] ^ 1])],
                        [pb.Frame(frame_id=9).SerializeToString()], [frames[1][:-SEAL_LEN]]):
                assert await _raw_forward(address, bad) == grpc.StatusCode.UNAUTHENTICATED
            assert await _raw_forward(address, [frames[1]], node="someone-else") == grpc.StatusCode.UNAUTHENTICATED
            # a sealed Status request is not a Frame
            assert await _raw_forward(address, [status]) == grpc.StatusCode.UNAUTHENTICATED
            # a replay mid-stream ends that stream, after the good frames before it were served
            assert await _raw_forward(address, [frames[1], frames[1]]) == grpc.StatusCode.UNAUTHENTICATED
            assert servicer.frames == [1, 2]
            # unary: the captured request once, then never again
            async with _tls_channel(address) as ch:
                status_call = ch.unary_unary(STATUS, request_serializer=None, response_deserializer=None)
                await status_call(status, metadata=auth_metadata(KEY, STATUS, "client-node"), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await status_call(status, metadata=auth_metadata(KEY, STATUS, "client-node"), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "--mesh-key" in (err.value.details() or "")
            assert servicer.statuses == 1
            assert (await _status(address, KEY)).sequences == 3  # and it still serves
        finally:
            await server.stop(None)

    with caplog.at_level(logging.WARNING, logger="mesh.auth"):
        run(main())
    reasons = " ".join(r.getMessage() for r in caplog.records)
    assert "replayed" in reasons and "bad MAC" in reasons and "unsealed" in reasons


def test_seal_window_and_bounded_replay_cache() -> None:
    from mesh.auth import seal

    v = MeshKeyVerifier(KEY, window_s=60, max_nonces=4)
    now = 1_000_000.0
    body = pb.Frame(frame_id=1).SerializeToString()
    k = KEY.encode()
    assert v.verify_seal(FORWARD, "n", body + seal(k, FORWARD, "n", body, now=now), now=now) is None
    assert "off" in (v.verify_seal(FORWARD, "n", body + seal(k, FORWARD, "n", body, now=now - 61), now=now) or "")
    assert "bad MAC" in (v.verify_seal(STATUS, "n", body + seal(k, FORWARD, "n", body, now=now), now=now) or "")
    # a nonce forgotten for room (still inside the window) cannot come back
    old = body + seal(k, FORWARD, "n", body, now=now + 1)
    assert v.verify_seal(FORWARD, "n", old, now=now + 1) is None
    for i in range(8):
        assert v.verify_seal(FORWARD, "n", body + seal(k, FORWARD, "n", body, now=now + 2), now=now + 2) is None
    assert len(v._seen) <= 4
    assert "replayed" in (v.verify_seal(FORWARD, "n", old, now=now + 3) or "")


def test_keys_come_from_a_flag_a_file_or_the_environment(tmp_path, monkeypatch) -> None:
    """So they need not show in `ps`: TOGETHER_MESH_KEY / TOGETHER_API_KEY, or --mesh-key-file /
    --api-key-file (first line); the flag wins over the environment; both a flag and its file is an error."""
    from apps.cli import _resolve_keys, build_parser
    from backends.errors import TogetherError
    from mesh.auth import read_key

    f = tmp_path / "key"
    f.write_text("from a file\nignored\n")
    monkeypatch.setenv("TOGETHER_MESH_KEY", "from the env")
    assert read_key(None, None, "TOGETHER_MESH_KEY", "--mesh-key") == "from the env"
    assert read_key("flag", None, "TOGETHER_MESH_KEY", "--mesh-key") == "flag"
    assert read_key(None, str(f), "TOGETHER_MESH_KEY", "--mesh-key") == "from a file"
    for value, path, msg in (("flag", str(f), "not both"), (None, str(tmp_path / "none"), "No such file"),
                             (None, str(tmp_path), "--mesh-key-file")):
        with pytest.raises(TogetherError, match=msg):
            read_key(value, path, "TOGETHER_MESH_KEY", "--mesh-key")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(TogetherError, match="is empty"):
        read_key(None, str(tmp_path / "empty"), "TOGETHER_MESH_KEY", "--mesh-key")
    monkeypatch.setenv("TOGETHER_API_KEY", "api from env")
    a = build_parser().parse_args(["join", "--mesh-key-file", str(f)])
    _resolve_keys(a)
    assert (a.mesh_key, a.api_key) == ("from a file", "api from env")
    a = build_parser().parse_args(["status", "--peer", "h:1"])
    _resolve_keys(a)
    assert a.mesh_key == "from the env"
