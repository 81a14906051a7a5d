"""Measured links (mesh/linkprobe.py) between real gRPC servers, and the test-only link delay
(mesh/links.py): every message a delayed peer sends arrives later, in order, without serialising."""

import asyncio
import json
import math
import re
import time
import urllib.request

import grpc
import numpy as np
import pytest

from mesh.auth import add_port, make_server
from mesh.linkprobe import CHUNK_TOKENS, MAX_REPLY_BYTES, LinkProber
from mesh.links import Peers
from mesh.protocol import check_peer_info
from mesh.servicer import Servicer
from mesh.view import PlanView
from protos import together_pb2 as pb
from protos import together_pb2_grpc as pbg

KEY = b"links test key"
HIDDEN = 576  # the embedded model's


class Far(pbg.TogetherServicer):
    """The far end of a link: records when each frame arrives."""

    def __init__(self) -> None:
        self.got: list[tuple[float, pb.Frame]] = []

    async def Forward(self, request_iterator, context):
        async for f in request_iterator:
            self.got.append((time.monotonic(), f))


async def serve(servicer, key):
    server = make_server(key)
    pbg.add_TogetherServicer_to_server(servicer, server)
    port = add_port(server, "127.0.0.1:0", key)
    await server.start()
    return server, f"127.0.0.1:{port}"


def prober_peer(name: str, key, delay_s: float = 0.0) -> tuple[PlanView, Peers, LinkProber]:
    view = PlanView(name, name, "127.0.0.1", 30)
    links = Peers(key, name, delay_s=delay_s)
    return view, links, LinkProber(view, links, HIDDEN, delay_s)


async def probe_server(name: str, key, delay_s: float = 0.0):
    """A real Servicer whose only role is answering probes (the others are not called)."""
    view, links, prober = prober_peer(name, key, delay_s)
    servicer = Servicer(key, 30, 0.0, view, None, None, None, None, status=pb.StatusReply, prober=prober)
    server, address = await serve(servicer, key)
    view.port = int(address.rsplit(":", 1)[1])
    return server, address, links


@pytest.mark.parametrize("key", [None, KEY])
def test_delayed_frames_arrive_late_in_order_and_are_not_serialised(key):
    delay, n = 0.3, 20

    async def go():
        far = Far()
        server, address = await serve(far, key)
        peers = Peers(key, "near", delay_s=delay)
        try:
            sent_at = []
            for i in range(n):
                f = pb.Frame(frame_id=i, epoch=1, origin="o", dtype="float32", shape=[1, 8])
                payload = np.full(8, i, np.float32)
                sent_at.append(time.monotonic())
                await peers.stream(address, "Forward").send(f, memoryview(payload).cast("B"))
                payload[:] = -1  # the caller may reuse its buffers: what was sent is what it held then
            assert far.got == [], "the sender waited for a delayed frame"
            assert peers.busy(address, 5.0) and not peers.busy("127.0.0.1:1", 5.0)  # not probed meanwhile
            for _ in range(200):
                if len(far.got) == n:
                    break
                await asyncio.sleep(0.02)
            assert [f.frame_id for _, f in far.got] == list(range(n))
            assert [np.frombuffer(f.data, np.float32)[0] for _, f in far.got] == list(range(n))
            assert all(t >= s + delay for (t, _), s in zip(far.got, sent_at))
            # serialised, the last would arrive n x delay (6 s) after the first was sent
            assert far.got[-1][0] - sent_at[0] < delay + 2.0
        finally:
            await peers.close()
            await server.stop(None)

    asyncio.run(go())


@pytest.mark.parametrize("key", [None, KEY])
def test_a_probe_measures_the_round_trip_and_throughput_of_a_real_link(key):
    async def go():
        server, address, _ = await probe_server("far", key)
        view, links, prober = prober_peer("near", key)
        view.known["far"] = pb.PeerInfo(node_id="far", address=address)
        view.known["near"] = pb.PeerInfo(node_id="near", address="127.0.0.1:1")
        try:
            await prober.measure_all(timeout=10)
            (stat,) = prober.link_stats()
            assert stat.node_id == "far" and stat.rtt_ms > 0 and stat.measured_at > 0
            assert math.isfinite(stat.mbps) and stat.mbps > 0
            assert prober.probe_bytes == HIDDEN * 4 * CHUNK_TOKENS  # a hidden-state-sized message
            info = pb.PeerInfo(node_id="near", address="127.0.0.1:5", start=-1, end=-1, links=prober.link_stats())
            assert check_peer_info(info, 30) is None
        finally:
            await links.close()
            await server.stop(None)

    asyncio.run(go())


def test_the_background_loop_measures_a_peer_as_soon_as_it_is_known():
    async def go():
        server, address, _ = await probe_server("far", None)
        view, links, prober = prober_peer("near", None)
        loop = asyncio.ensure_future(prober.run())
        try:
            await asyncio.sleep(0.2)
            view.known["far"] = pb.PeerInfo(node_id="far", address=address)  # heard of it now
            for _ in range(100):
                if prober.link_stats():
                    break
                await asyncio.sleep(0.05)
            assert [s.node_id for s in prober.link_stats()] == ["far"]
        finally:
            loop.cancel()
            prober.close()
            await links.close()
            await server.stop(None)

    asyncio.run(go())


def test_the_delay_of_both_ends_shows_in_the_measured_rtt():
    """The caller's delay holds its calls back, the callee's its replies: a round trip pays both."""
    async def go():
        server, address, far_links = await probe_server("far", KEY, delay_s=0.03)
        view, links, prober = prober_peer("near", KEY, delay_s=0.05)
        view.known["far"] = pb.PeerInfo(node_id="far", address=address)
        try:
            stat = await prober.measure("far", address)
            assert stat is not None and stat.rtt_ms >= 80 and math.isfinite(stat.mbps) and stat.mbps > 0
        finally:
            await links.close()
            await far_links.close()
            await server.stop(None)

    asyncio.run(go())


def test_a_peer_with_another_key_measures_nothing_and_a_huge_reply_is_refused():
    async def go():
        server, address, _ = await probe_server("far", KEY)
        view, links, prober = prober_peer("near", b"another key")
        view.known["far"] = pb.PeerInfo(node_id="far", address=address)
        good = Peers(KEY, "good")
        try:
            assert await prober.measure("far", address) is None and prober.link_stats() == []
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await good.stub(address).Probe(pb.ProbeRequest(reply_bytes=MAX_REPLY_BYTES + 1), timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most" in e.value.details()
            reply = await good.stub(address).Probe(pb.ProbeRequest(reply_bytes=1000), timeout=5)
            assert len(reply.payload) == 1000
        finally:
            await links.close()
            await good.close()
            await server.stop(None)

    asyncio.run(go())


def test_a_peer_info_with_bad_links_is_refused():
    base = dict(node_id="a", address="127.0.0.1:5", start=-1, end=-1)
    assert check_peer_info(pb.PeerInfo(**base, links=[pb.LinkStat(node_id="b", rtt_ms=float("nan"))]), 30)
    assert check_peer_info(pb.PeerInfo(**base, links=[pb.LinkStat(node_id="b", mbps=-1)]), 30)
    assert check_peer_info(pb.PeerInfo(**base, links=[pb.LinkStat(node_id="b")] * 300), 30)
    # what the planner and the tables read besides the links
    assert check_peer_info(pb.PeerInfo(**base, prefill_ms=float("inf")), 30) == "non-finite numbers"
    assert check_peer_info(pb.PeerInfo(**base, weights="x" * 1000), 30)
    assert check_peer_info(pb.PeerInfo(**base, training="x" * 1000), 30)  # a LoRA training job's progress
    assert check_peer_info(pb.PeerInfo(**base, prefill_ms=0.2, weights="fetching 41% of 27.5 MB from a"), 30) is None


def test_render_links_lists_each_peers_links_by_name():
    from mesh.linkprobe import render_links

    plan = pb.Plan(peers=[pb.PeerInfo(node_id="a", name="alpha", links=[
        pb.LinkStat(node_id="b", rtt_ms=40.5, mbps=2500, measured_at=90)]), pb.PeerInfo(node_id="b", name="beta")])
    assert render_links(plan, now=100) == ("links (measured round trip, throughput, age):\n"
                                           "  alpha -> beta  40.50 ms  2.5 Gbit/s  10 s ago")
    assert render_links(pb.Plan()) == "links: not measured yet"


def test_the_mesh_view_names_each_links_peer_and_shows_speeds_only_once_known():
    from types import SimpleNamespace

    from apps.api import links_view, speed_view

    now = time.time()
    alpha = pb.PeerInfo(node_id="a", name="alpha", links=[
        pb.LinkStat(node_id="b", rtt_ms=40.123, mbps=123.42, measured_at=now - 5),
        pb.LinkStat(node_id="gone-peer-id", rtt_ms=1, mbps=2, measured_at=now)])
    node = SimpleNamespace(plan=pb.Plan(peers=[alpha, pb.PeerInfo(node_id="b", name="beta")]))
    got = links_view(node, alpha)
    assert [(ln["to"], ln["to_name"], ln["rtt_ms"], ln["mbps"]) for ln in got] == [
        ("b", "beta", 40.123, 123.4), ("gone-peer-id", "gone-pee", 1, 2)]
    assert 4 <= got[0]["age_s"] <= 60
    sched = SimpleNamespace(decode_ms=[])
    speed = speed_view(node, sched)
    assert speed["predicted_tokens_per_s"] is None and speed["measured_tokens_per_s"] is None
    node.plan.predicted_tokens_per_s, node.plan.limit = 12.5, "compute"
    sched.decode_ms = [100.0, 50.0, 200.0]  # one-token frames alone in the ring: median 100 ms
    speed = speed_view(node, sched)
    assert (speed["predicted_tokens_per_s"], speed["measured_tokens_per_s"], speed["limit"]) == (12.5, 10.0, "compute")


DELAY_MS = 40


@pytest.mark.slow
def test_a_delayed_peers_links_reach_the_coordinator_the_api_and_status_and_its_ring_answers_alike(
        embedded_path, embedded, tokenizer):
    """Two `together join` processes, beta with --link-delay-ms: both ends measure a round trip of at
    least the delay, the coordinator's plan carries the links, /v1/mesh and `together status` show
    them, and the delayed ring's greedy answer equals one process."""
    from backends.pipeline import Pipeline, SliceSpec
    from backends.sampling import SamplingParams
    from mesh.local import LocalMesh, http_json
    from tests.helpers import together

    m = LocalMesh(str(embedded_path), mesh_key="links-key")
    try:
        a = m.add("alpha", "--backend", "torch", "--dtype", "float32", "--no-mdns", "--layers", "0-15", api=True)
        m.add("beta", "--backend", "torch", "--dtype", "float32", "--no-mdns", "--layers", "15-30",
              "--peer", a.address, "--link-delay-ms", str(DELAY_MS))
        m.wait_ready(a, timeout=120, stages=2)

        def links() -> dict[tuple[str, str], dict]:
            mesh = http_json(f"{a.api}/v1/mesh")[1]
            return {(p["name"], ln["to_name"]): ln for p in mesh["peers"] for ln in p["links"]}

        deadline = time.time() + 20
        while time.time() < deadline and len(links()) < 2:
            time.sleep(0.3)
        got = links()
        assert set(got) == {("alpha", "beta"), ("beta", "alpha")}, got
        for ln in got.values():  # beta's calls leave late one way, its replies the other
            assert ln["rtt_ms"] >= DELAY_MS and ln["mbps"] > 0 and ln["age_s"] >= 0

        st = together("status", "--peer", a.address, "--mesh-key", "links-key", "--json", timeout=60)
        assert st.returncode == 0, st.stderr
        peers = {p["name"]: p for p in json.loads(st.stdout)["plan"]["peers"]}
        assert [ln["rttMs"] >= DELAY_MS for ln in peers["beta"]["links"]] == [True]
        text = together("status", "--peer", a.address, "--mesh-key", "links-key", timeout=60).stdout
        assert re.search(r"beta\s+->\s+alpha\s+\d+\.\d\d ms", text), text

        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        body = {"model": "smollm2-135m", "messages": msgs, "temperature": 0, "max_tokens": 12}
        req = urllib.request.Request(f"{a.api}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            r = json.loads(resp.read())
        pipe = Pipeline.load(embedded, [SliceSpec("torch", 0, 30)], dtype="float32", threads=1)
        want = "".join(d.text for d in pipe.generate(tokenizer.apply_chat(msgs), SamplingParams(max_tokens=12),
                                                     tokenizer))
        assert r["choices"][0]["message"]["content"] == want
        speed = http_json(f"{a.api}/v1/mesh")[1]["speed"]
        # one stream's decode step crosses beta's delayed Deliver at least once
        assert speed["measured_steps"] > 0 and 0 < speed["measured_tokens_per_s"] < 1000 / DELAY_MS
    finally:
        m.stop()
