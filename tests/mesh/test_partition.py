"""A partition that heals: the coordinator's link is cut, the other side elects an heir and carries on,
the link comes back, and within seconds there is one ring again, with one coordinator, at a plan epoch
above both sides', answering as before. Peers in network namespaces (see netns.py)."""

from __future__ import annotations

import re
import time

import pytest

from tests.mesh.cluster import wait_log
from tests.mesh.netns import NetnsMesh, NetnsUnavailable
from tests.mesh.test_netns import QUESTION, client, coordinator_of, torch_peer

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
BOSS = 0  # namespace of the coordinator (the oldest peer), the one cut off


def last_epoch(peer) -> int:
    """The last plan epoch `peer` printed (its log: "mesh plan epoch N, ...")."""
    return int(re.findall(r"mesh plan epoch (\d+)", peer.log())[-1])


def answer(peer) -> str:
    r = client(peer).chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24,
                                             extra_body={"ignore_eos": True})
    return r.choices[0].message.content


def test_a_healed_partition_merges_into_one_ring_above_both_epochs(embedded_path):
    try:
        m = NetnsMesh(4, str(embedded_path)).__enter__()
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces unavailable: {e}")
    try:
        boss = torch_peer(m, BOSS, "boss", "--layers", "20-30")
        wait_log(boss, "mesh plan epoch")
        b = torch_peer(m, 1, "b", "--layers", "10-20")
        wait_log(b, "mesh plan epoch")
        a = torch_peer(m, 2, "a", "--layers", "0-10", api=True)
        m.wait_ready(a, stages=3)
        spare = torch_peer(m, 3, "spare")
        wait_log(spare, "standing by")
        want = answer(a)

        m.cut(BOSS)
        # the other side: b (the oldest left) takes over, the spare covers the boss's layers
        wait_log(b, "takes over as coordinator", timeout=60)
        body = m.wait_ready(a, timeout=60, want=lambda h: "boss" not in [s["name"] for s in h["ring"]])
        assert answer(a) == want
        # the cut-off side: the boss drops the others and holds every layer itself
        wait_log(boss, "reassigned layers: boss\\[0,30\\)", timeout=60)
        epochs = {"boss": last_epoch(boss), "b": coordinator_epoch(m, a)}

        m.restore(BOSS)
        t0 = time.monotonic()
        deadline = t0 + 30
        while True:
            code, body = m.health(a)
            coords = {coordinator_of(p) for p in m.peers.values()}
            if code == 200 and len(coords) == 1 and body["ring"]:
                break
            assert time.monotonic() < deadline, f"no merge: coordinators {coords}, {body}\n{m.logs()}"
            time.sleep(0.3)
        merged = time.monotonic() - t0
        print(f"one ring {merged:.1f} s after the link came back; epochs before: {epochs}, after: {body['epoch']}")
        assert coords == {boss_id(m)}  # the older coordinator wins
        assert body["epoch"] > max(epochs.values())
        assert "steps down" in b.log()
        assert answer(a) == want
    finally:
        m.close()


def coordinator_epoch(m: NetnsMesh, api_peer) -> int:
    code, body = m.health(api_peer)
    assert code == 200, body
    return int(body["epoch"])


def boss_id(m: NetnsMesh) -> str:
    """The boss's own node id (its Status, from the root namespace)."""
    import asyncio

    from mesh.auth import make_channel
    from protos import together_pb2 as pb
    from protos import together_pb2_grpc as pbg

    async def go():
        ch = make_channel(m.peers["boss"].address, None, "test")
        try:
            return (await pbg.TogetherStub(ch).Status(pb.StatusRequest(), timeout=5)).peer.node_id
        finally:
            await ch.close()

    return asyncio.run(go())
