"""Peers on real interfaces: one network namespace each, joined by a Linux bridge (see netns.py).
mDNS must cross the bridge, and a cut link (no RST, no FIN: packets just vanish) must be handled
like a killed peer: the standby takes over and the greedy text is unchanged."""

from __future__ import annotations

import time

import pytest

from mesh.local import http_json
from tests.mesh.cluster import wait_log
from tests.mesh.netns import NetnsMesh, NetnsUnavailable

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "Tell me a long story about a dragon who learns to bake bread."}]
MIDDLE = 1  # namespace index of the peer holding layers [10, 20)


def client(peer):
    from openai import OpenAI

    return OpenAI(base_url=f"{peer.api}/v1", api_key="x", max_retries=0, timeout=120)


def stream_text(peer, n: int, on_piece=None) -> tuple[str, str | None]:
    s = client(peer).chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=n,
                                             stream=True, extra_body={"ignore_eos": True})
    parts, finish = [], None
    for ch in s:
        if not ch.choices:
            continue
        if ch.choices[0].delta.content:
            parts.append(ch.choices[0].delta.content)
            if on_piece:
                on_piece(len(parts))
        finish = ch.choices[0].finish_reason or finish
    return "".join(parts), finish




def torch_peer(m: NetnsMesh, i: int, name: str, *args: str, api: bool = False):
    return m.add(i, name, "--backend", "torch", "--dtype", "float32", *args, api=api)


@pytest.fixture(scope="module")
def ring(embedded_path):
    """Three peers in three namespaces that find each other over mDNS only, plus a standby."""
    try:
        m = NetnsMesh(4, str(embedded_path)).__enter__()
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces unavailable: {e}")
    try:
        # Started oldest first: c coordinates, and b is its heir among a, b and the spare, so the
        # cut peer is the one that would take over when it loses sight of the coordinator.
        c = torch_peer(m, 2, "c", "--layers", "20-30")
        wait_log(c, "mesh plan epoch")
        b = torch_peer(m, 1, "b", "--layers", "10-20")
        wait_log(b, "mesh plan epoch")
        a = torch_peer(m, 0, "a", "--layers", "0-10", api=True)
        m.wait_ready(a, stages=3)
        torch_peer(m, 3, "spare")
        wait_log(m.peers["spare"], "standing by")
        yield m
    finally:
        m.close()


def test_peers_in_separate_namespaces_find_each_other_over_mdns(ring):
    a = ring.peers["a"]
    code, body = ring.health(a)
    assert code == 200, body
    stages = [(s["name"], s["start"], s["end"], s["address"]) for s in body["ring"]]
    assert stages == [("a", 0, 10, ring.peers["a"].address), ("b", 10, 20, ring.peers["b"].address),
                      ("c", 20, 30, ring.peers["c"].address)]
    assert all(p.address.startswith(f"10.231.{ring.subnet}.") for p in ring.peers.values())
    r = client(a).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                          temperature=0, max_tokens=8)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")


def test_a_cut_link_is_handled_like_a_kill(ring):
    a, b = ring.peers["a"], ring.peers["b"]
    want, _ = stream_text(a, 120)
    state: dict[str, float] = {}

    def cut_at_40(i: int) -> None:
        if i == 40 and "t" not in state:
            state["t"] = time.monotonic()
            ring.cut(MIDDLE)

    try:
        got, finish = stream_text(a, 120, cut_at_40)
        assert "t" in state and finish == "length"
        assert got == want
        m = wait_log(a, r"resumed after ([0-9.]+) s")
        assert float(m.group(1)) < 20
        body = ring.wait_ready(a, stages=3, timeout=30)
        names = [s["name"] for s in body["ring"]]
        assert "spare" in names and "b" not in names, body
        assert b.proc.poll() is None  # partitioned, not dead
    finally:
        ring.restore(MIDDLE)
    # b comes back to find itself dropped: it must not take the ring with it. Once b is a standby of
    # the one mesh (it has come back and been handled; what the next test checks), the ring is unchanged
    wait_standby(ring, b, timeout=30)
    code, body = ring.health(a)
    assert code == 200, f"{body}\n{ring.logs()}"
    assert [s["name"] for s in body["ring"]] == ["a", "spare", "c"], body
    r = client(a).chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=120,
                                          extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == want


def coordinator_of(peer) -> str:
    """The coordinator in `peer`'s own plan (asked over gRPC, from the root namespace)."""
    import asyncio

    from mesh.auth import make_channel
    from protos import together_pb2 as pb
    from protos import together_pb2_grpc as pbg

    async def go():
        ch = make_channel(peer.address, None, "test")
        try:
            return (await pbg.TogetherStub(ch).Status(pb.StatusRequest(), timeout=5)).plan.coordinator
        finally:
            await ch.close()

    return asyncio.run(go())


def wait_standby(ring, b, timeout: float = 15) -> None:
    """Until the API peer lists `b` as a standby and `b` follows the API peer's coordinator."""
    a = ring.peers["a"]
    deadline = time.time() + timeout
    while True:
        code, mesh = http_json(f"{a.api}/v1/mesh")
        peers = mesh.get("peers", [])
        standby = [p["name"] for p in peers if p["standby"]]
        boss = next((p["node_id"] for p in peers if p["coordinator"]), None)
        if code == 200 and b.name in standby and coordinator_of(b) == boss:
            return
        assert time.time() < deadline, f"{b.name}: {b.log()[-2500:]}\nmesh at a: {mesh}"
        time.sleep(0.5)


def test_after_the_partition_heals_the_cut_peer_is_a_standby_of_the_one_mesh(ring):
    wait_standby(ring, ring.peers["b"])


def test_two_namespaces_with_the_readmes_flags_only_form_one_ring_that_chats_like_one_process(embedded_path):
    """Two machines of one LAN, each running the README's command (no --host, no --peer, no --layers):
    they listen on and advertise their LAN address, meet over mDNS and answer like one process."""
    from tests.helpers import together

    prompt = "Name three colours of the rainbow."
    try:
        m = NetnsMesh(2, str(embedded_path)).__enter__()
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces unavailable: {e}")
    try:
        first = m.add(0, "first", api=True)  # `together join --api-port 8000` (--api-host: reached from here)
        m.add(1, "second")                    # `together join`
        m.wait_ready(first)
        # one mesh of both (a split, or one stage and a standby: whoever claims first may take all)
        deadline = time.time() + 30
        while sorted(p["address"] for p in http_json(f"{first.api}/v1/mesh")[1].get("peers", [])) \
                != sorted(p.address for p in m.peers.values()):
            assert time.time() < deadline, m.logs()
            time.sleep(0.3)
        r = client(first).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                  temperature=0, max_tokens=24)
        # each peer's table shows the address the other reaches it at, never 0.0.0.0 or loopback
        st = together("status", "--peer", m.peers["second"].address, timeout=60)
        assert st.returncode == 0, st.stderr
        for p in m.peers.values():
            assert p.address in st.stdout, st.stdout
        assert "0.0.0.0" not in st.stdout and "127.0.0.1" not in st.stdout, st.stdout
    finally:
        m.close()
    # one process with the same defaults as the peers (torch, --dtype auto: its packed kernel on this CPU)
    alone = together("generate", "--model", str(embedded_path), "--backend", "torch",
                     "--prompt", prompt, "--max-tokens", "24")
    assert alone.returncode == 0, alone.stderr
    assert r.choices[0].message.content.strip() == alone.stdout.strip()
