"""The link-aware planner (mesh/planner.py): cost model, order, split, standbys, memory."""

from __future__ import annotations

import pytest

from mesh.placement import split_proportional
from mesh.planner import (LAN_MBPS, LAN_RTT_MS, Link, Machine, Shape, Unplaceable, evaluate, hop_ms,
                          link_between, plan)

MB = 1 << 20
SHAPE = Shape(num_layers=30, hidden_size=576, kv_reserve=0)


def machines(*names: str, memory: int = 100 * MB, layer_ms: float = 1.0, head_ms: float = 0.0,
             api: str = "") -> list[Machine]:
    return [Machine(n, memory, MB, layer_ms, layer_ms / 10, head_ms, api=n == api, name=n) for n in names]


def sym(pairs: dict[tuple[str, str], tuple[float, float]]) -> dict[tuple[str, str], Link]:
    out = {}
    for (a, b), (rtt, mbps) in pairs.items():
        out[(a, b)] = out[(b, a)] = Link(rtt, mbps)
    return out


def fast_lan(names: str) -> dict[tuple[str, str], Link]:
    return sym({(a, b): (0.3, 1000.0) for a in names for b in names if a < b})


def sizes(p) -> dict[str, int]:
    return {n: e - s for n, s, e in p.stages}


def test_equal_fast_links_keep_the_balanced_split_of_today() -> None:
    # the same answer split_proportional gives (which the ring tests rely on), heads included
    for head in (0.0, 8.0):
        ms = machines("a", "b", "c", head_ms=head, api="a")
        want = split_proportional(30, MB, 0, [(m.node_id, m.free_memory, m.layer_ms, m.head_ms) for m in ms])
        free = sym({(x, y): (0.0, 1e12) for x in "abc" for y in "abc" if x < y})
        assert plan(SHAPE, ms, free).stages == want  # links that cost nothing: exactly today's split
        got = plan(SHAPE, ms, fast_lan("abc"))  # a fast LAN: the same order, within a layer per stage
        assert got.standby == [] and [n for n, _, _ in got.stages] == [n for n, _, _ in want]
        assert all(abs((e - s) - (e2 - s2)) <= 1 for (_, s, e), (_, s2, e2) in zip(got.stages, want))


def test_a_slow_peer_gets_fewer_layers() -> None:
    ms = machines("a", "b", api="a") + [Machine("slow", 100 * MB, MB, 3.0, 0.3, name="slow")]
    p = plan(SHAPE, ms, fast_lan(["a", "b", "slow"]))
    got = sizes(p)
    assert sum(got.values()) == 30 and got["slow"] < got["a"] and got["slow"] < got["b"]
    # even ten times slower it keeps a share: on fast links it does not only slow the ring (it adds a
    # stage for pipelined streams), though one stream alone would be faster without it
    ms[-1] = Machine("slow", 100 * MB, MB, 10.0, 1.0, name="slow")
    p = plan(SHAPE, ms, fast_lan(["a", "b", "slow"]))
    assert p.standby == [] and 0 < sizes(p)["slow"] < 5


def test_the_ring_order_avoids_a_slow_link() -> None:
    # b and c reach each other over a 12 ms link, everything else is fast: the ring puts a (the API
    # peer) between them, b -> a -> c -> back to a, and never sends over b-c
    ms = machines("a", "b", "c", api="a")
    links = sym({("a", "b"): (0.3, 1000.0), ("a", "c"): (0.3, 1000.0), ("b", "c"): (12.0, 1000.0)})
    p = plan(SHAPE, ms, links)
    assert p.standby == [] and [n for n, _, _ in p.stages] in (["b", "a", "c"], ["c", "a", "b"])
    assert max(h.ms for h in p.hops) < 1.0
    bad = evaluate(SHAPE, ms, links, [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)])
    assert p.decode_ms < bad.decode_ms - 5


def test_a_peer_behind_a_slow_link_gets_fewer_layers() -> None:
    # c's links all cost 5 ms: unavoidable, not slow enough to drop c, so c's stage is kept short
    ms = machines("a", "b", "c", api="a")
    links = sym({("a", "b"): (0.3, 1000.0), ("a", "c"): (5.0, 1000.0), ("b", "c"): (5.0, 1000.0)})
    p = plan(SHAPE, ms, links)
    got = sizes(p)
    assert p.standby == [] and sum(got.values()) == 30
    assert got["c"] < 10 and got["c"] < got["a"] and got["c"] <= got["b"]  # b sends over a slow hop too


def test_order_minimises_the_sum_of_hop_costs() -> None:
    # a chain a - b - c - d of fast links, every other pair slow: the ring follows the chain
    names = "abcd"
    pairs = {(x, y): (20.0, 100.0) for x in names for y in names if x < y}
    pairs.update({("a", "b"): (0.2, 1000.0), ("b", "c"): (0.2, 1000.0), ("c", "d"): (0.2, 1000.0),
                  ("a", "d"): (0.2, 1000.0)})
    ms = [Machine(n, 100 * MB, MB, 8.0, 0.8, name=n, api=n == "c") for n in names]
    p = plan(SHAPE, ms, sym(pairs))
    order = [n for n, _, _ in p.stages]
    assert len(order) == 4
    ring = order + [order[0]]
    assert all(h.ms < 1.0 for h in p.hops), p.hops  # no slow hop used
    assert all(frozenset(x) in {frozenset("ab"), frozenset("bc"), frozenset("cd"), frozenset("ad")}
               for x in zip(ring, ring[1:]))


def test_a_peer_behind_a_very_slow_link_stands_by_when_the_rest_fits() -> None:
    ms = machines("a", "b", "c", api="a")
    links = sym({("a", "b"): (0.3, 1000.0), ("a", "c"): (60.0, 20.0), ("b", "c"): (60.0, 20.0)})
    p = plan(SHAPE, ms, links)
    assert p.standby == ["c"] and sizes(p) == {"a": 15, "b": 15}
    assert any("c stands by" in n for n in p.notes)
    # ... but not when the others cannot hold the model without it
    small = [Machine(n, 12 * MB, MB, 1.0, name=n, api=n == "a") for n in "ab"] + machines("c")
    p = plan(SHAPE, small, links)
    assert sizes(p)["c"] >= 6 and p.standby == []
    assert p.limit.startswith(("link", "memory"))


def test_memory_limits_are_respected() -> None:
    ms = [Machine("a", 4 * MB + 3, MB, 0.5, name="a"), Machine("b", 40 * MB, MB, 1.0, name="b"),
          Machine("c", 9 * MB, MB, 0.5, name="c")]
    p = plan(Shape(30, 576, kv_reserve=MB // 4), ms, fast_lan("abc"))
    got = sizes(p)
    assert sum(got.values()) == 30
    assert got.get("a", 0) <= 3 and got.get("c", 0) <= 7  # (1 MB weights + 0.25 MB KV) per layer
    assert p.limit.startswith("memory:")


def test_impossible_names_the_shortfall() -> None:
    ms = [Machine("a", 10 * MB, MB, 1.0, name="a"), Machine("b", 5 * MB, MB, 1.0, name="b")]
    with pytest.raises(Unplaceable) as e:
        plan(SHAPE, ms)
    msg = str(e.value)
    assert "not enough memory" in msg and "short by 15 layers" in msg and "a 10" in msg and "b 5" in msg


def test_cost_model_of_a_ring() -> None:
    ms = machines("a", "b", api="a")
    links = sym({("a", "b"): (10.0, 8.0)})  # 10 ms round trip, 1 MB/s
    p = evaluate(SHAPE, ms, links, [("a", 0, 20), ("b", 20, 30)])
    hidden = 576 * 4 + 160
    # compute 30 ms; a -> b: 5 ms + hidden bytes at 1 MB/s; b -> a: 5 ms + a token id
    want = 30.0 + (5 + hidden * 8 / 8000) + (5 + 164 * 8 / 8000)
    assert p.decode_ms == pytest.approx(want)
    assert [h.bytes for h in p.hops] == [164, hidden, 164]
    assert p.hops[0].ms == 0.0  # the API peer is stage 0: no hop in
    assert p.decode_tokens_per_s == pytest.approx(1000 / want)
    assert 0 < p.prefill_tokens_per_s


def test_unmeasured_links_count_as_a_lan_and_say_so() -> None:
    ln, assumed = link_between({}, "a", "b")
    assert assumed and (ln.rtt_ms, ln.mbps) == (LAN_RTT_MS, LAN_MBPS)
    assert hop_ms(ln, 0) == LAN_RTT_MS / 2
    p = plan(SHAPE, machines("a", "b"))
    assert any("not measured" in n for n in p.notes)
    # a link measured one way serves the other way too
    ln, assumed = link_between({("b", "a"): Link(7.0, 50.0)}, "a", "b")
    assert not assumed and ln.rtt_ms == 7.0


def test_many_peers_use_a_greedy_order_and_still_cover() -> None:
    names = [f"p{i}" for i in range(9)]
    ms = [Machine(n, 100 * MB, MB, 1.0, name=n) for n in names]
    p = plan(SHAPE, ms, fast_lan(names))
    assert sum(sizes(p).values()) == 30 and len(p.stages) == 9


# ------------------------------------------------------------------ the coordinator's use of it


def peer_info(n: str, links: dict[str, float], api: bool = False, free: int = 100 * MB):
    from protos import together_pb2 as pb

    return pb.PeerInfo(node_id=n, name=n, backend="torch", free_memory=free, layer_bytes=MB, layer_ms=1.0,
                       prefill_ms=0.1, head_ms=0.0, dtype="float32", start=-1, end=-1, api="h:1" if api else "",
                       started_at=ord(n),
                       links=[pb.LinkStat(node_id=o, rtt_ms=r, mbps=1000.0) for o, r in links.items()])


def slow_c() -> list:
    return [peer_info("a", {"b": 0.3, "c": 60.0}, api=True), peer_info("b", {"a": 0.3, "c": 60.0}),
            peer_info("c", {"a": 60.0, "b": 60.0})]


def test_layer_map_places_by_links_and_predicts_on_the_plan() -> None:
    from mesh.coordinator import LayerMap

    lm = LayerMap("m", 30, "a", 0, hidden_size=576)
    got = lm.claim_together(slow_c())
    assert got["c"][0] is None and "stands by" in got["c"][1]
    assert got["a"][0] == (0, 15) and got["b"][0] == (15, 30) and "link-aware" in got["a"][1]
    plan = lm.plan()
    assert plan.predicted_tokens_per_s == pytest.approx(1000 / 30.3, rel=0.02)
    assert plan.predicted_prefill_tokens_per_s > plan.predicted_tokens_per_s
    assert plan.limit.startswith("compute:")


def test_layer_map_memory_placement_ignores_speed_and_links() -> None:
    from mesh.coordinator import LayerMap

    lm = LayerMap("m", 30, "a", 0, hidden_size=576, placement="memory")
    infos = slow_c()
    infos[0].free_memory = 20 * MB  # layers by free memory, in join order
    got = lm.claim_together(infos)
    # shares by the layers that fit (20, 30, 30): c, 60 ms away, still gets its third
    assert [got[n][0] for n in "abc"] == [(0, 8), (8, 19), (19, 30)]
    assert "memory-only" in got["a"][1]
    assert lm.plan().predicted_tokens_per_s > 0  # predicted for any plan, by the same model


def test_layer_map_without_links_keeps_the_proportional_split() -> None:
    from mesh.coordinator import LayerMap

    lm = LayerMap("m", 30, "a", 0, hidden_size=576)
    infos = [peer_info(n, {}) for n in "abc"]
    got = lm.claim_together(infos)
    assert [got[n][0] for n in "abc"] == [(0, 10), (10, 20), (20, 30)] and "proportional" in got["a"][1]


def test_claims_wait_for_a_peer_whose_links_are_still_being_measured() -> None:
    import asyncio
    import time

    from mesh.coordination import CoordinatorRole
    from mesh.tasks import TaskSet
    from mesh.view import PlanView
    from protos import together_pb2 as pb
    from tests.mesh.test_roles import FakeLinks

    async def go() -> tuple[pb.JoinReply, pb.JoinReply, bool]:
        view = PlanView("a", "a", "10.0.0.5", 30)
        view.port = 1
        coord = CoordinatorRole(view, FakeLinks(), TaskSet(), "m", 30, kv_reserve=0, claim_window_s=0.05,
                                rejoin=lambda: None, hidden_size=576)
        coord.become(epoch=0)
        a, c = slow_c()[0], slow_c()[2]
        for i in (a, c):
            i.started_at, i.model, i.address = time.time(), "m", f"{i.name}:1"
        del c.links[:]  # c claims before its probes are back
        first = asyncio.ensure_future(coord.join(pb.JoinRequest(peer=a, want_start=-1, want_end=-1)))
        second = asyncio.ensure_future(coord.join(pb.JoinRequest(peer=c, want_start=-1, want_end=-1)))
        await asyncio.sleep(0.4)
        waited = not first.done()
        c.links.extend(slow_c()[2].links[:1])  # its next heartbeat brings its link to a
        await coord.heartbeat(pb.HeartbeatRequest(peer=c))
        return await first, await second, waited

    first, second, waited = asyncio.run(go())
    assert waited  # held past the window until c's links came
    assert (first.start, first.end) == (0, 30) and not second.ok  # then c, 60 ms away, stands by
