"""Multi-process meshes on 127.0.0.1: real `together join` processes, real mDNS, real gRPC,
driven through the official openai client."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import grpc
import pytest

from tests.mesh.cluster import Cluster, stream_frames

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name two primary colors."]
KEY = "correct horse battery staple"
LAST_CPU = max(os.sched_getaffinity(0))  # peer b's --cpus


def reference(embedded, tokenizer, question: str, max_tokens: int, backend: str = "torch") -> str:
    """The single-process greedy answer (float32)."""
    from backends.pipeline import Pipeline, SliceSpec
    from backends.sampling import SamplingParams

    pipe = Pipeline.load(embedded, [SliceSpec(backend, 0, 30)], dtype="float32")
    prompt = tokenizer.apply_chat([{"role": "user", "content": question}])
    return "".join(d.text for d in pipe.generate(prompt, SamplingParams(max_tokens=max_tokens), tokenizer))


def client(peer):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{peer.api_port}/v1", api_key="unused", max_retries=0,
                  timeout=120)


@pytest.fixture(scope="module")
def ring(embedded_path):
    """Three torch peers found over mDNS, with uneven --max-memory so each takes a different share,
    all holding the mesh key; plus a peer of another mesh on the same host."""
    c = Cluster(str(embedded_path), mesh_key=KEY)
    try:
        api = c.add("a", "--backend", "torch", "--dtype", "float32", "--max-memory", "290MB", api=True)
        c.add("b", "--backend", "torch", "--dtype", "float32", "--max-memory", "330MB", cpus=str(LAST_CPU))
        c.add("c", "--backend", "torch", "--dtype", "float32", "--max-memory", "520MB")
        c.add("other", "--backend", "torch", "--dtype", "float32", "--max-memory", "2GB",
              mesh=c.mesh + "-other", api=True)
        c.wait_ready(api, stages=3)
        yield c
    finally:
        c.stop()


def test_three_peers_split_by_memory_and_answer_like_one_process(ring, embedded, tokenizer):
    api = ring.peers["a"]
    st = ring.status(api)
    stages = sorted(st.plan.stages, key=lambda s: s.start)
    assert [s.start for s in stages][0] == 0 and stages[-1].end == 30
    assert all(x.end == y.start for x, y in zip(stages, stages[1:]))
    peers = {p.node_id: p for p in st.plan.peers}
    names = {peers[s.node_id].name for s in stages}
    assert names == {"a", "b", "c"}
    sizes = {peers[s.node_id].name: s.end - s.start for s in stages}
    assert len(set(sizes.values())) > 1, sizes  # memory decides: uneven ranges
    for s in stages:  # never more than fits
        p = peers[s.node_id]
        assert (s.end - s.start) * p.layer_bytes <= p.free_memory, (p.name, s)
    # each peer's speed, measured on its backend as it joined, travels in its PeerInfo to Status and the table
    for p in peers.values():
        assert p.layer_ms > 0 and p.head_ms > 0 and (p.dtype, p.weight_format) == ("float32", "float32"), p
    from apps.join import render_plan

    assert len(re.findall(r"torch\s+float32\s+float32\s+\d+\.\d\d\s+\[", render_plan(st.plan))) == 3
    assert re.search(r"torch float32 float32, \d+\.\d\d ms per layer \(measured in", api.log()), api.log()[-2000:]
    # b runs with --cpus: its compute thread (which measured and loads and runs its layers) is pinned, its
    # other threads (event loop, gRPC) are not
    b = ring.peers["b"]
    assert "ms per layer (measured in" in b.log() and f"compute on CPU {LAST_CPU}" in b.log(), b.log()[-2000:]
    allowed = [(t / "status").read_text().split("Cpus_allowed_list:")[1].split()[0]
               for t in Path(f"/proc/{b.proc.pid}/task").iterdir()]
    assert str(LAST_CPU) in allowed and len(set(allowed)) == 2, allowed

    oa = client(api)
    for q in QUESTIONS:
        want = reference(embedded, tokenizer, q, 40)
        r = oa.chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=40,
                                       messages=[{"role": "user", "content": q}])
        assert r.choices[0].message.content == want
        chunks = oa.chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=40,
                                            stream=True, messages=[{"role": "user", "content": q}])
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want


def test_other_mesh_is_invisible(ring):
    st = ring.status(ring.peers["a"])
    assert "other" not in {p.name for p in st.plan.peers}
    other = ring.status(ring.peers["other"])
    assert {p.name for p in other.plan.peers} == {"other"}
    assert [(s.start, s.end) for s in other.plan.stages] == [(0, 30)]


def test_peer_joining_a_complete_ring_stands_by(ring):
    late = ring.add("late", "--backend", "torch", "--dtype", "float32")
    deadline = time.time() + 60
    while time.time() < deadline:
        st = ring.status(ring.peers["a"])
        mine = [p for p in st.plan.peers if p.name == "late"]
        if mine:
            break
        time.sleep(0.5)
    assert mine and not any(s.node_id == mine[0].node_id for s in st.plan.stages)
    deadline = time.time() + 30
    while "standing by" not in late.log() and time.time() < deadline:
        time.sleep(0.5)
    assert "standing by" in late.log()


def test_wrong_or_missing_key_cannot_join(ring):
    bad = ring.add("intruder", "--backend", "torch", "--peer", ring.peers["a"].address, key="wrong")
    nokey = ring.add("nokey", "--backend", "torch", "--peer", ring.peers["a"].address, key=None)
    for p in (bad, nokey):
        assert p.proc.wait(60) != 0
        assert "mesh key" in p.log()
    names = {p.name for p in ring.status(ring.peers["a"]).plan.peers}
    assert not names & {"intruder", "nokey"}


class _Status:
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def _forward(address: str, key: str | None, frames) -> _Status | None:
    """Frames on one Forward stream; None if it ended OK, else its status."""
    from mesh.auth import make_channel

    async def go():
        ch = make_channel(address, key, "fuzzer")
        try:
            return await stream_frames(ch, frames)
        finally:
            await ch.close()

    code, details = asyncio.run(go())
    return None if code == grpc.StatusCode.OK else _Status(code, details)


def test_frames_without_the_key_or_corrupt_are_refused_and_the_peer_keeps_serving(ring):
    from protos import together_pb2 as pb

    st = ring.status(ring.peers["a"])
    peers = {p.node_id: p for p in st.plan.peers}
    middle = sorted(st.plan.stages, key=lambda s: s.start)[1]
    addr = peers[middle.node_id].address
    ok_seq = pb.SeqEntry(seq_id="x", offset=0, length=2, start=True)
    good_shape = [2, 576]
    err = _forward(addr, "wrong", [pb.Frame(epoch=st.plan.epoch, seqs=[ok_seq], dtype="float32",
                                            shape=good_shape, data=b"\0" * 2 * 576 * 4)])
    if err is not None and err.code() == grpc.StatusCode.INTERNAL:
        err = _forward(addr, "wrong", [])  # our write raced the server's abort: ask again, sending nothing
    # with a mesh key the ring is TLS on the key's certificates: a wrong key fails the handshake
    assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE and "andshake failed" in err.details()
    cases = [
        (pb.Frame(epoch=st.plan.epoch, seqs=[ok_seq], dtype="float32", shape=good_shape, data=b"\0" * 10),
         grpc.StatusCode.INVALID_ARGUMENT, "payload is 10 bytes"),
        (pb.Frame(epoch=st.plan.epoch, seqs=[ok_seq], dtype="int3", shape=good_shape, data=b""),
         grpc.StatusCode.INVALID_ARGUMENT, "unknown dtype"),
        (pb.Frame(epoch=st.plan.epoch + 7, seqs=[ok_seq], dtype="float32", shape=good_shape,
                  data=b"\0" * 2 * 576 * 4), grpc.StatusCode.FAILED_PRECONDITION, "stale plan epoch"),
        (pb.Frame(epoch=st.plan.epoch, seqs=[pb.SeqEntry(seq_id="ghost", offset=5, length=2)],
                  dtype="float32", shape=good_shape, data=b"\0" * 2 * 576 * 4),
         grpc.StatusCode.FAILED_PRECONDITION, "unknown sequence"),  # its API peer may replay it
        (pb.Frame(epoch=st.plan.epoch, seqs=[ok_seq], dtype="float32", shape=[2, 575],
                  data=b"\0" * 2 * 575 * 4), grpc.StatusCode.INVALID_ARGUMENT, "expected hidden states"),
    ]
    for frame, code, msg in cases:
        err = _forward(addr, KEY, [frame])
        assert err is not None and err.code() == code and msg in err.details(), (msg, err)
    r = client(ring.peers["a"]).chat.completions.create(
        model="smollm2-135m", temperature=0, max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    assert r.choices[0].message.content


def test_finished_and_abandoned_sequences_free_caches_on_every_peer(ring):
    api = ring.peers["a"]
    stage_peers = [ring.peers[n] for n in ("a", "b", "c")]
    oa = client(api)
    stream = oa.chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=200, stream=True,
                                        messages=[{"role": "user", "content": "Tell me a long story."}])
    it = iter(stream)
    for _ in range(5):
        next(it)
    held = [ring.status(p).sequences for p in stage_peers]
    assert held == [1, 1, 1]
    stream.close()  # the client goes away mid-answer
    deadline = time.time() + 3
    while time.time() < deadline and any(ring.status(p).sequences for p in stage_peers):
        time.sleep(0.1)
    assert [ring.status(p).sequences for p in stage_peers] == [0, 0, 0]
    assert [ring.status(p).cache_bytes for p in stage_peers] == [0, 0, 0]
    oa.chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=8,
                               messages=[{"role": "user", "content": "Hi"}])
    time.sleep(0.5)
    assert [ring.status(p).sequences for p in stage_peers] == [0, 0, 0]


def test_mixed_ring_with_manual_peers_and_pinned_layers(embedded_path, embedded, tokenizer):
    c = Cluster(str(embedded_path))
    try:
        first = c.add("m", "--backend", "mlx", "--dtype", "float32", "--no-mdns", "--layers", "0-11",
                      api=True)
        c.add("t", "--backend", "torch", "--dtype", "float32", "--no-mdns", "--layers", "11-30",
              "--peer", first.address)
        body = c.wait_ready(first, stages=2)
        assert [(s["backend"], s["start"], s["end"]) for s in body["ring"]] == [
            ("mlx", 0, 11), ("torch", 11, 30)]
        clash = c.add("clash", "--backend", "torch", "--no-mdns", "--layers", "5-15", "--peer", first.address)
        assert clash.proc.wait(60) != 0 and "overlap" in clash.log()
        want = reference(embedded, tokenizer, QUESTIONS[0], 32)
        r = client(first).chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=32,
                                                  messages=[{"role": "user", "content": QUESTIONS[0]}])
        assert r.choices[0].message.content == want
    finally:
        c.stop()


def test_a_peer_that_cannot_hold_one_layer_gets_none_and_says_why(embedded_path):
    c = Cluster(str(embedded_path))
    try:
        p = c.add("tiny", "--backend", "torch", "--dtype", "float32", "--max-memory", "120MB", "--no-mdns")
        deadline = time.time() + 60
        while "not enough memory for one layer" not in p.log() and time.time() < deadline:
            time.sleep(0.5)
        assert "not enough memory for one layer" in p.log()
    finally:
        c.stop()
