"""Faster, surer recovery, role by role: a broken stream makes the coordinator probe the suspect at once
(and drop it only if nobody listens there), two coordinators merge at an epoch above both sides', and a
coordinator keeps looking for the peers it dropped so a healed partition becomes one ring again."""

import asyncio

import grpc
import pytest

from mesh.links import Peers
from protos import together_pb2 as pb
from protos import together_pb2_grpc as pbg
from tests.mesh.test_roles import ME, FakeLinks, make_membership, make_view, peer, rpc_error


def coordinating(*others):
    """'me' coordinates a mesh with `others` (PeerInfos); returns membership, coordinator role, links."""
    view = make_view(stages=[], peers=[])
    links = FakeLinks()
    m, coord, rejoined = make_membership(view, links)
    view.known = {"me": peer("me", ME, 2.0), **{o.node_id: o for o in others}}
    coord.become(epoch=5)
    return m, coord, links, rejoined


async def settle():
    await asyncio.sleep(0.02)


def test_a_suspect_is_dropped_only_when_it_refuses_connections():
    a, spare = peer("a", "10.0.0.2:1", 3.0, 0, 3), peer("spare", "10.0.0.3:1", 4.0)
    m, coord, links, _ = coordinating(a, spare)
    lm = coord.layer_map
    epoch = lm.epoch

    async def go(answer):
        links.answers[("10.0.0.2:1", "Status")] = answer
        await coord.suspect("a", "stream broke")
        await settle()

    asyncio.run(go(pb.StatusReply()))  # it answers: a false suspicion drops nobody
    asyncio.run(go(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED)))  # slow: left to the heartbeat verdict
    assert "a" in lm.members and ("a", 0, 3) in lm.stages and lm.epoch == epoch
    asyncio.run(go(rpc_error(grpc.StatusCode.UNAVAILABLE)))  # refused at once: gone
    assert "a" not in lm.members and all(st[0] != "a" for st in lm.stages) and not lm.missing()
    assert lm.epoch > epoch
    assert m.view.plan.epoch == lm.epoch and ("10.0.0.3:1", "PushPlan") in {(ad, k) for ad, k, _ in links.calls}


def test_a_member_reports_a_broken_link_to_the_coordinator_once():
    boss, b = peer("boss", "10.0.0.1:1", 1.0, 0, 1), peer("b", "10.0.0.2:1", 3.0, 2, 3)
    view = make_view(stages=[("boss", 0, 1), ("me", 1, 2), ("b", 2, 3)], coordinator="boss",
                     peers=[boss, peer("me", ME, 2.0, 1, 2), b])
    links = FakeLinks()
    links.answers[("10.0.0.1:1", "Suspect")] = pb.Ack()
    m, coord, _ = make_membership(view, links)

    async def go():
        m.link_broken("10.0.0.2:1")
        m.link_broken("10.0.0.2:1")  # the same break seen twice: one report
        m.link_broken("10.9.9.9:1")  # nobody we know
        await settle()

    asyncio.run(go())
    sent = [r for ad, k, r in links.calls if k == "Suspect"]
    assert len(sent) == 1 and sent[0].node_id == "b"
    m._coord_ok = 10.0**9
    m.link_broken("10.0.0.1:1")  # the coordinator itself: the next heartbeat round probes it
    assert m._coord_ok == 0.0


def test_a_broken_forward_stream_calls_back_with_the_address():
    class Sink(pbg.TogetherServicer):
        async def Forward(self, request_iterator, context):
            async for _ in request_iterator:
                pass

    async def go():
        server = grpc.aio.server()
        pbg.add_TogetherServicer_to_server(Sink(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        address = f"127.0.0.1:{port}"
        links = Peers(None, "me")
        broken = []
        links.on_broken = broken.append
        await links.stream(address, "Forward").send(pb.Frame(frame_id=1))
        await asyncio.sleep(0.1)
        assert broken == []  # a live stream is no suspect
        await server.stop(None)  # the next stage's process goes away
        for _ in range(50):
            if broken:
                break
            await asyncio.sleep(0.05)
        await links.close()
        return address, broken

    address, broken = asyncio.run(go())
    assert broken[:1] == [address]


def test_two_coordinators_merge_above_both_epochs_and_the_winner_takes_the_losers_peers():
    m, coord, links, rejoined = coordinating(peer("a", "10.0.0.2:1", 3.0, 0, 3))
    # the other side: 'y' (younger) coordinated 'z' and got far ahead in epochs
    theirs = pb.Plan(epoch=40, num_layers=3, coordinator="y",
                     peers=[peer("y", "10.0.0.5:1", 5.0, 0, 3), peer("z", "10.0.0.6:1", 6.0)])

    async def go():
        await m.on_push(theirs, started_at=2.0)
        await settle()

    asyncio.run(go())
    assert coord.active and not rejoined and m.view.plan.coordinator == "me"
    assert m.view.plan.epoch > 40 and {"y", "z"} <= set(coord.layer_map.members)
    pushed = {ad for ad, k, _ in links.calls if k == "PushPlan"}
    assert {"10.0.0.5:1", "10.0.0.6:1"} <= pushed  # both of the other side hear who coordinates now

    # the loser's side: it steps down and sends its own plan (its epoch, its peers) to the winner
    m2, coord2, links2, rejoined2 = coordinating(peer("a", "10.0.0.2:1", 3.0, 0, 3))
    older = pb.Plan(epoch=1, num_layers=3, coordinator="o", peers=[peer("o", "10.0.0.7:1", 0.5, 0, 3)])

    async def go2():
        await m2.on_push(older, started_at=2.0)
        await settle()

    asyncio.run(go2())
    assert not coord2.active and rejoined2 == [True] and m2.view.plan.coordinator == "o"
    mine = [r for ad, k, r in links2.calls if k == "PushPlan" and ad == "10.0.0.7:1"]
    assert mine and mine[0].coordinator == "me" and mine[0].epoch >= 5 and len(mine[0].peers) == 2


@pytest.mark.parametrize("older_side", [True, False], ids=["we-win", "they-win"])
def test_a_coordinator_finds_the_peers_it_dropped_and_merges_with_their_side(older_side):
    a = peer("a", "10.0.0.2:1", 3.0, 0, 3)
    m, coord, links, rejoined = coordinating(a)
    links.answers[("10.0.0.2:1", "Status")] = rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED)  # cut off
    coord.layer_map.members["a"].last_seen = 0.0

    async def go():
        await coord.expire_peers()
        await settle()

    asyncio.run(go())
    assert "a" not in coord.layer_map.members and "a" in coord._gone
    heir = peer("h", "10.0.0.9:1", 1.0 if not older_side else 9.0, 0, 3)
    other = pb.Plan(epoch=30, num_layers=3, coordinator="h", peers=[heir, a])
    links.answers[("10.0.0.2:1", "Status")] = pb.StatusReply(peer=a, plan=other)  # the link is back
    asyncio.run(go())
    assert "a" not in coord._gone
    if older_side:
        assert coord.active and m.view.plan.epoch > 30 and {"a", "h"} <= set(coord.layer_map.members)
    else:
        assert not coord.active and rejoined == [True] and m.view.plan.coordinator == "h"
        assert any(k == "PushPlan" and ad == "10.0.0.9:1" for ad, k, _ in links.calls)
