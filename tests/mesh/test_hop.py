"""A hop of the ring, made cheaper: frames sealed as they are serialized (hidden states appended,
not copied into the message), streams written without an interceptor's queue, and a stage that
takes the next frame off its stream while the one before it is still on its way out."""

import asyncio

import grpc
import numpy as np
import pytest

from mesh.auth import SEAL_LEN, MeshKeyVerifier, add_port, make_server
from mesh.links import Peers
from mesh.seal import sealed_bytes
from protos import together_pb2 as pb
from protos import together_pb2_grpc as pbg
from tests.mesh.test_roles import (ME, FakeLinks, FakeStream, make_stage, make_view, peer,  # noqa: F401
                                   tiny_ck, torch_shard)

KEY = b"hop test key"
FORWARD = "/together.Together/Forward"


def header(n: int = 2) -> pb.Frame:
    return pb.Frame(frame_id=9, epoch=4, origin=ME, dtype="float32", shape=[n, 300], hop_ms=[1.0],
                    seqs=[pb.SeqEntry(seq_id=f"s{i}", offset=5, length=1) for i in range(n)])


@pytest.mark.parametrize("size", [0, 100, 2400, 300_000])
def test_sealed_bytes_append_the_payload_as_the_frames_data_and_seal_all_of_it(size):
    payload = memoryview(np.arange(size, dtype=np.uint8) * 7).cast("B")
    raw = sealed_bytes(KEY, FORWARD, "n1", header(), payload)
    assert MeshKeyVerifier(KEY).verify_seal(FORWARD, "n1", raw) is None
    got = pb.Frame.FromString(raw[:-SEAL_LEN])
    want = header()
    want.data = bytes(payload)
    assert got == want
    # no key: the same message, unsealed
    assert pb.Frame.FromString(sealed_bytes(None, FORWARD, "n1", header(), payload)) == want


def test_a_changed_byte_of_the_payload_breaks_the_seal():
    raw = bytearray(sealed_bytes(KEY, FORWARD, "n1", header(), bytes(2400)))
    raw[100] ^= 1
    assert "bad MAC" in MeshKeyVerifier(KEY).verify_seal(FORWARD, "n1", bytes(raw))
    assert "bad MAC" in MeshKeyVerifier(KEY).verify_seal(FORWARD, "n2", sealed_bytes(KEY, FORWARD, "n1", header()))


@pytest.mark.parametrize("key", [None, KEY])
def test_a_stream_delivers_frames_with_their_payload_in_order_to_a_real_server(key):
    """links' streams sign and seal themselves (no interceptors): a keyed server takes them."""
    async def go():
        got: list[pb.Frame] = []

        class Far(pbg.TogetherServicer):
            async def Forward(self, request_iterator, context):
                async for f in request_iterator:
                    got.append(f)

        server = make_server(key)
        pbg.add_TogetherServicer_to_server(Far(), server)
        port = add_port(server, "127.0.0.1:0", key)
        await server.start()
        peers = Peers(key, "near")
        try:
            sent = []
            for i in range(20):
                f, payload = header(), np.full((2, 300), i, np.float32)
                f.frame_id = i
                await peers.stream(f"127.0.0.1:{port}", "Forward").send(f, memoryview(payload).cast("B"))
                f.data = payload.tobytes()
                sent.append(f)
            for _ in range(100):
                if len(got) == len(sent):
                    break
                await asyncio.sleep(0.05)
            assert got == sent
        finally:
            await peers.close()
            await server.stop(None)

    asyncio.run(go())


class HeldLinks(FakeLinks):
    """The next stage's stream is slow: the first frame's write waits until `gate` opens."""

    def __init__(self):
        super().__init__()
        self.gate = asyncio.Event()

    def stream(self, address, kind):
        links = self

        class Held(FakeStream):
            async def send(self, msg, payload=b""):
                if kind == "Forward" and not links.sent and not links.gate.is_set():
                    await links.gate.wait()
                await super().send(msg, payload)
        return Held(self, address, kind)


def chunk(frame_id, tokens, offset, start=False, seq="a"):
    return pb.Frame(frame_id=frame_id, epoch=7, origin=ME, tokens=list(tokens),
                    seqs=[pb.SeqEntry(seq_id=seq, offset=offset, length=len(tokens), start=start,
                                      history=list(tokens) if start else [])])


def two_stage_view():
    return make_view(stages=(("me", 0, 2), ("nx", 2, 3)), peers=[peer("nx", "127.0.0.1:6000", start=2, end=3)])


def test_a_stage_computes_the_next_frame_while_the_one_before_is_still_going_out(tiny_ck):
    """Back-to-back chunks of one sequence: taken off the stream at once, computed in order while
    the first one's write is held, sent on in order, and equal to one frame of them all."""
    async def go():
        links = HeldLinks()
        st, delivered, _ = make_stage(two_stage_view(), links, torch_shard(tiny_ck, 0, 2))
        toks = [5, 9, 2, 7, 7, 1, 3]
        frames = [chunk(1, toks[:3], 0, start=True), chunk(2, toks[3:5], 3), chunk(3, toks[5:], 5)]
        for f in frames:
            await asyncio.wait_for(st.receive(f), 1)  # none waits for the one before it
        for _ in range(200):  # every chunk computed while the first is still held at the door
            if st.shard.position("a") == len(toks):
                break
            await asyncio.sleep(0.01)
        assert st.shard.position("a") == len(toks) and not links.sent
        links.gate.set()
        for _ in range(200):
            if len(links.sent) == 3:
                break
            await asyncio.sleep(0.01)
        assert [m.frame_id for _, _, m in links.sent] == [1, 2, 3] and not delivered
        piecewise = np.concatenate([np.frombuffer(m.data, np.float32).reshape(tuple(m.shape))
                                    for _, _, m in links.sent])

        whole = make_stage(two_stage_view(), FakeLinks(), torch_shard(tiny_ck, 0, 2))
        await whole[0].receive(chunk(4, toks, 0, start=True))
        await asyncio.gather(*whole[0]._received)
        (_, _, m), = whole[0].links.sent
        np.testing.assert_allclose(piecewise, np.frombuffer(m.data, np.float32).reshape(tuple(m.shape)),
                                   rtol=1e-4, atol=1e-4)
        st.close()

    asyncio.run(go())


def test_a_frame_that_breaks_on_its_way_fails_alone_and_the_next_one_runs(tiny_ck):
    """An unexpected error in one frame's handling is that frame's failure, not the stream's."""
    class BrokenOnce(FakeLinks):
        def stream(self, address, kind):
            links = self

            class S(FakeStream):
                async def send(self, msg, payload=b""):
                    if kind == "Forward" and not getattr(links, "broke", False):
                        links.broke = True
                        raise RuntimeError("a bug on the way out")
                    await super().send(msg, payload)
            return S(self, address, kind)

    async def go():
        links = BrokenOnce()
        st, delivered, _ = make_stage(two_stage_view(), links, torch_shard(tiny_ck, 0, 2))
        await st.receive(chunk(1, [1, 2], 0, start=True, seq="x"))
        await st.receive(chunk(2, [3, 4], 0, start=True, seq="y"))
        await asyncio.gather(*st._received)
        assert [(r.frame_id, r.error_code, list(r.failed_seqs)) for r in delivered] == [
            (1, grpc.StatusCode.INTERNAL.value[0], ["x"])]
        assert "a bug on the way out" in delivered[0].error
        assert [m.frame_id for _, _, m in links.sent] == [2]
        st.close()

    asyncio.run(go())


def test_a_frame_run_in_place_that_breaks_fails_alone_at_once(tiny_ck):
    """The API peer's own stage 0 runs its frames in place (send_frame to itself, in a spawned task):
    an unexpected error there reaches the origin as this frame's INTERNAL failure at once, instead
    of escaping the task and leaving the origin to wait for its deadline."""
    class Broken(FakeLinks):
        def stream(self, address, kind):
            class S(FakeStream):
                async def send(self, msg, payload=b""):
                    raise RuntimeError("a bug on the way out")
            return S(self, address, kind)

    async def go():
        st, delivered, _ = make_stage(two_stage_view(), Broken(), torch_shard(tiny_ck, 0, 2))
        await st.send_frame(st.view.address, chunk(1, [1, 2], 0, start=True, seq="x"))
        assert [(r.frame_id, r.error_code, list(r.failed_seqs)) for r in delivered] == [
            (1, grpc.StatusCode.INTERNAL.value[0], ["x"])]
        st.close()

    asyncio.run(go())
