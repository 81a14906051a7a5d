"""The coordinator splits peers that start together by the speed each measured on its backend."""

from __future__ import annotations

import asyncio
import time

import pytest

from mesh import coordination
from mesh.coordination import CoordinatorRole
from mesh.tasks import TaskSet
from mesh.view import PlanView
from protos import together_pb2 as pb
from tests.mesh.test_roles import FakeLinks

GiB = 1 << 30


def info(node_id: str, started_at: float, layer_ms: float, head_ms: float = 0.0) -> pb.PeerInfo:
    return pb.PeerInfo(node_id=node_id, name=node_id, address=f"10.0.0.{len(node_id)}:1", started_at=started_at,
                       model="m", backend="torch", free_memory=8 * GiB, layer_bytes=1 << 20, layer_ms=layer_ms,
                       head_ms=head_ms, start=-1, end=-1)


def claim(node: pb.PeerInfo) -> pb.JoinRequest:
    return pb.JoinRequest(peer=node, want_start=-1, want_end=-1)


async def claims_while_one_peer_measures(measure_s: float) -> tuple[pb.JoinReply, pb.JoinReply, bool]:
    """'early' claims at once; 'late', known (probed) since it started, claims after measuring for
    measure_s; the claim window is 0.05 s."""
    view = PlanView("early", "early", "10.0.0.5", 30)
    view.port = 1
    coord = CoordinatorRole(view, FakeLinks(), TaskSet(), "m", 30, kv_reserve=0, claim_window_s=0.05,
                            rejoin=lambda: None)
    now = time.time()
    view.known["late"] = info("late", now, 0.0)  # its Status before it measured: no speed yet
    coord.become(epoch=0)
    first = asyncio.ensure_future(coord.join(claim(info("early", now - 1, 1.0, 8.0))))
    await asyncio.sleep(measure_s)
    waited = not first.done()
    second = await coord.join(claim(info("late", now, 1.0, 8.0)))
    return await first, second, waited


def test_claims_wait_for_a_peer_that_started_with_them_and_is_still_measuring() -> None:
    early, late, waited = asyncio.run(claims_while_one_peer_measures(0.4))
    assert waited  # the early claim was held past its window
    # one split of both by speed: equal peers, the last stage's head (8 layers' worth) counted
    assert (early.start, early.end, late.start, late.end) == (0, 19, 19, 30), (early, late)


def test_the_wait_for_a_measuring_peer_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(coordination, "MEASURE_WAIT_S", 0.2)
    early, late, _ = asyncio.run(claims_while_one_peer_measures(0.6))
    assert (early.start, early.end) == (0, 30) and not late.ok  # it went on without the silent peer


@pytest.mark.parametrize("started_ago", [0.0, 120.0])
def test_a_peer_that_reported_its_speed_or_started_long_ago_is_not_waited_for(started_ago) -> None:
    async def go() -> pb.JoinReply:
        view = PlanView("early", "early", "10.0.0.5", 30)
        view.port = 1
        coord = CoordinatorRole(view, FakeLinks(), TaskSet(), "m", 30, kv_reserve=0, claim_window_s=0.05,
                                rejoin=lambda: None)
        # measured already, or silent but long started (an old peer of a stale snapshot)
        view.known["other"] = info("other", time.time() - started_ago, 1.0 if not started_ago else 0.0)
        coord.become(epoch=0)
        return await asyncio.wait_for(coord.join(claim(info("early", time.time(), 1.0))), 1.0)

    reply = asyncio.run(go())
    assert (reply.start, reply.end) == (0, 30)
