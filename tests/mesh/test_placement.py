import pytest

from mesh.placement import (
    choose_coordinator,
    format_size,
    free_ranges,
    layers_that_fit,
    parse_size,
    plan_claim,
    reassign,
    split_proportional,
)

MiB = 1 << 20
GiB = 1 << 30
N = 30
LAYER = 100 * MiB
KV = 20 * MiB
ONE = LAYER + KV  # what one layer costs with its KV reserve


def covers(stages, n=N) -> bool:
    cursor = 0
    for _, s, e in sorted(stages, key=lambda st: st[1]):
        if s != cursor or e <= s:
            return False
        cursor = e
    return cursor == n


# ------------------------------------------------------------------ parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("100000", 100000),
        ("4GB", 4 * 10**9),
        ("4gb", 4 * 10**9),
        ("512MiB", 512 * MiB),
        ("1.5G", int(1.5 * GiB)),
        ("2 GiB", 2 * GiB),
        ("64k", 64 * 1024),
        ("10KB", 10_000),
        ("7B", 7),
        ("1T", 1 << 40),
        (" 3M ", 3 * MiB),
        (".5G", GiB // 2),
        (42, 42),
    ],
)
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("junk", ["", "GB", "four GB", "4XB", "-1G", "1.2.3G", "4 G B", "nan"])
def test_parse_size_junk(junk) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(junk)


def test_parse_size_negative_int() -> None:
    with pytest.raises(ValueError):
        parse_size(-5)


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(int(1.5 * GiB)) == "1.5 GiB"
    assert format_size(120 * MiB) == "120.0 MiB"


def test_layers_that_fit() -> None:
    assert layers_that_fit(10 * ONE, LAYER, KV) == 10
    assert layers_that_fit(10 * ONE - 1, LAYER, KV) == 9
    assert layers_that_fit(-5, LAYER, KV) == 0
    with pytest.raises(ValueError):
        layers_that_fit(GiB, 0, 0)


def test_free_ranges() -> None:
    assert free_ranges(N, []) == [(0, N)]
    assert free_ranges(N, [(0, 10), ("b", 15, 20)]) == [(10, 15), (20, 30)]
    assert free_ranges(N, [(0, 30)]) == []
    assert free_ranges(N, [(5, 12), (10, 30)]) == [(0, 5)]


# ------------------------------------------------------------------ plan_claim


def test_claim_first_peer_gets_what_fits_from_zero() -> None:
    rng, reason = plan_claim(N, LAYER, KV, [], 12 * ONE + 5)
    assert rng == (0, 12)
    assert "[0, 12)" in reason


def test_claim_never_more_than_layers_left() -> None:
    assert plan_claim(N, LAYER, KV, [], 100 * ONE)[0] == (0, N)
    assert plan_claim(N, LAYER, KV, [("a", 0, 25)], 100 * ONE)[0] == (25, 30)


def test_claim_lowest_free_layer_first_contiguous() -> None:
    taken = [("a", 0, 5), ("b", 10, 30)]
    assert plan_claim(N, LAYER, KV, taken, 20 * ONE)[0] == (5, 10)
    assert plan_claim(N, LAYER, KV, taken, 3 * ONE)[0] == (5, 8)
    # plain (start, end) claims work too
    assert plan_claim(N, LAYER, KV, [(0, 5), (10, 30)], 3 * ONE)[0] == (5, 8)


def test_claim_cannot_hold_one_layer() -> None:
    rng, reason = plan_claim(N, LAYER, KV, [], ONE - 1)
    assert rng is None
    assert "one layer" in reason and format_size(ONE) in reason


def test_claim_kv_reserve_counts() -> None:
    # enough for the weights of one layer but not for its KV reserve too
    rng, _ = plan_claim(N, LAYER, KV, [], LAYER + KV // 2)
    assert rng is None


def test_claim_everything_taken_stands_by() -> None:
    rng, reason = plan_claim(N, LAYER, KV, [("a", 0, 30)], 10 * ONE)
    assert rng is None and "standing by" in reason


def test_claim_want_granted() -> None:
    rng, reason = plan_claim(N, LAYER, KV, [("a", 0, 10)], 10 * ONE, want=(10, 20))
    assert rng == (10, 20) and "granted" in reason


def test_claim_want_overlap_names_owner() -> None:
    rng, reason = plan_claim(N, LAYER, KV, [("alice", 0, 10), ("bob", 20, 30)], 30 * ONE, want=(8, 22))
    assert rng is None
    assert "alice holds [0, 10)" in reason and "bob holds [20, 30)" in reason


def test_claim_want_adjacent_is_not_overlap() -> None:
    assert plan_claim(N, LAYER, KV, [("a", 0, 10), ("b", 20, 30)], 30 * ONE, want=(10, 20))[0] == (10, 20)


@pytest.mark.parametrize("want", [(-1, 5), (5, 5), (7, 3), (25, 31)])
def test_claim_want_out_of_bounds(want) -> None:
    rng, reason = plan_claim(N, LAYER, KV, [], 100 * ONE, want=want)
    assert rng is None and "within [0, 30)" in reason


def test_claim_want_too_big_for_memory() -> None:
    rng, reason = plan_claim(N, LAYER, KV, [], 5 * ONE, want=(0, 10))
    assert rng is None and "room for 5 layers" in reason


# ------------------------------------------------------------------ split_proportional


def test_split_equal_peers_equal_ranges() -> None:
    stages = split_proportional(N, LAYER, KV, [("a", 30 * ONE, 1.0), ("b", 30 * ONE, 1.0), ("c", 30 * ONE, 1.0)])
    assert stages == [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]


def test_split_uneven_memory_uneven_ranges_that_fit() -> None:
    peers = [("a", 6 * ONE, 1.0), ("b", 12 * ONE, 1.0), ("c", 40 * ONE, 1.0)]
    stages = split_proportional(N, LAYER, KV, peers)
    assert covers(stages)
    sizes = {n: e - s for n, s, e in stages}
    assert sizes["a"] <= 6 and sizes["b"] <= 12
    # equal speeds: equal stages where memory allows; memory caps a (and b just fits c's share)
    assert sizes == {"a": 6, "b": 12, "c": 12}
    for node, free, _ in peers:
        assert sizes[node] * ONE <= free


def test_split_faster_peer_gets_more() -> None:
    stages = split_proportional(N, LAYER, KV, [("slow", 30 * ONE, 4.0), ("fast", 30 * ONE, 1.0)])
    assert covers(stages)
    sizes = {n: e - s for n, s, e in stages}
    assert sizes["fast"] > sizes["slow"]
    assert sizes == {"slow": 6, "fast": 24}


def test_split_capped_peer_surplus_goes_to_others() -> None:
    stages = split_proportional(N, LAYER, KV, [("tiny", 2 * ONE, 0.1), ("big", 100 * ONE, 1.0)])
    assert stages == [("tiny", 0, 2), ("big", 2, 30)]


def test_split_peer_that_cannot_hold_a_layer_is_standby() -> None:
    stages = split_proportional(N, LAYER, KV, [("a", 20 * ONE, 1.0), ("none", ONE - 1, 1.0), ("b", 20 * ONE, 1.0)])
    assert [n for n, _, _ in stages] == ["a", "b"]
    assert covers(stages)


def test_split_not_enough_capacity_covers_a_prefix() -> None:
    stages = split_proportional(N, LAYER, KV, [("a", 8 * ONE, 1.0), ("b", 10 * ONE, 1.0)])
    assert stages == [("a", 0, 8), ("b", 8, 18)]


def test_split_more_peers_than_layers() -> None:
    peers = [(f"p{i:02d}", 10 * ONE, 1.0) for i in range(8)]
    stages = split_proportional(4, LAYER, KV, peers)
    assert covers(stages, 4)
    assert all(e - s == 1 for _, s, e in stages)
    assert [n for n, _, _ in stages] == ["p00", "p01", "p02", "p03"]  # ties go to the earlier peer


def test_split_unmeasured_speed_and_determinism() -> None:
    peers = [("a", 30 * ONE, 0.0), ("b", 30 * ONE, 1.0), ("c", 17 * ONE, 2.5)]
    first = split_proportional(N, LAYER, KV, peers)
    assert first == split_proportional(N, LAYER, KV, peers)
    assert covers(first)


def test_split_no_peers() -> None:
    assert split_proportional(N, LAYER, KV, []) == []


def test_split_by_measured_speed_twice_as_fast_gets_twice_the_layers() -> None:
    # ms per layer as backends/measure.py reports them here: float32 vs bfloat16 with int4 weights
    stages = split_proportional(N, LAYER, KV, [("f32", 30 * ONE, 1.64), ("int4", 30 * ONE, 0.82)])
    assert stages == [("f32", 0, 10), ("int4", 10, 30)]
    # memory permitting: the fast peer fits 12 layers, the slow one takes the rest
    stages = split_proportional(N, LAYER, KV, [("f32", 30 * ONE, 1.64), ("int4", 12 * ONE, 0.82)])
    assert stages == [("f32", 0, 18), ("int4", 18, 30)]


def test_split_counts_the_head_of_the_last_stage() -> None:
    # equal peers whose head costs 8 layers: stage times 19 and 11 + 8, not 15 and 15 + 8
    stages = split_proportional(N, LAYER, KV, [("a", 30 * ONE, 1.0, 8.0), ("b", 30 * ONE, 1.0, 8.0)])
    assert stages == [("a", 0, 19), ("b", 19, 30)]
    # three peers: the last stage's share shrinks by the head, the others split the rest evenly
    three = split_proportional(N, LAYER, KV, [(n, 30 * ONE, 1.0, 6.0) for n in "abc"])
    assert three == [("a", 0, 12), ("b", 12, 24), ("c", 24, 30)]


def test_split_gives_the_last_stage_to_the_peer_whose_head_costs_least() -> None:
    # b's head is cheap (2 ms), a's dear (20 ms): b ends the ring (16 + 0 vs 14 + 2), whatever the order
    for peers in ([("b", 30 * ONE, 1.0, 2.0), ("a", 30 * ONE, 1.0, 20.0)],
                  [("a", 30 * ONE, 1.0, 20.0), ("b", 30 * ONE, 1.0, 2.0)]):
        assert split_proportional(N, LAYER, KV, peers) == [("a", 0, 16), ("b", 16, 30)]


def test_layer_map_splits_peers_claiming_together_by_their_reported_speed() -> None:
    from mesh.coordinator import LayerMap
    from protos import together_pb2 as pb

    def peer(n: str, layer_ms: float, head_ms: float) -> pb.PeerInfo:
        return pb.PeerInfo(node_id=n, name=n, backend="torch", free_memory=30 * ONE, layer_bytes=LAYER,
                           layer_ms=layer_ms, head_ms=head_ms, start=-1, end=-1)

    lm = LayerMap("m", N, "x", KV)
    got = lm.claim_together([peer("slow", 2.0, 16.0), peer("fast", 1.0, 8.0)])
    assert got["slow"][0] == (0, 13) and got["fast"][0] == (13, 30)  # 26 ms and 17 + 8 = 25 ms


# ------------------------------------------------------------------ reassign


STAGES = [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]


def test_reassign_prefers_standby_that_fits_whole_range() -> None:
    candidates = [
        ("a", 30 * ONE, 1.0, (0, 10)),
        ("c", 30 * ONE, 1.0, (20, 30)),
        ("small", 5 * ONE, 0.5, None),
        ("slowbig", 20 * ONE, 3.0, None),
        ("fastbig", 20 * ONE, 1.0, None),
    ]
    stages, missing = reassign(N, STAGES, {"b"}, candidates, layer_bytes=LAYER, kv_reserve=KV)
    assert missing == []
    assert stages == [("a", 0, 10), ("fastbig", 10, 20), ("c", 20, 30)]


def test_reassign_extends_neighbours_with_room() -> None:
    candidates = [("a", 16 * ONE, 1.0, (0, 10)), ("c", 14 * ONE, 1.0, (20, 30)), ("small", 3 * ONE, 1.0, None)]
    stages, missing = reassign(N, STAGES, {"b"}, candidates, layer_bytes=LAYER, kv_reserve=KV)
    assert missing == []
    assert covers(stages)
    sizes = {n: e - s for n, s, e in stages}
    assert set(sizes) == {"a", "c"}
    assert sizes["a"] <= 16 and sizes["c"] <= 14


def test_reassign_lost_first_and_last_stage() -> None:
    candidates = [("b", 30 * ONE, 1.0, (10, 20))]
    stages, missing = reassign(N, STAGES, {"a", "c"}, candidates, layer_bytes=LAYER, kv_reserve=KV)
    assert missing == [] and stages == [("b", 0, 30)]


def test_reassign_neighbours_plus_standby() -> None:
    candidates = [("a", 12 * ONE, 1.0, (0, 10)), ("c", 12 * ONE, 1.0, (20, 30)), ("s", 6 * ONE, 1.0, None)]
    stages, missing = reassign(N, STAGES, {"b"}, candidates, layer_bytes=LAYER, kv_reserve=KV)
    assert missing == []
    assert stages == [("a", 0, 12), ("s", 12, 18), ("c", 18, 30)]


def test_reassign_no_capacity_returns_missing() -> None:
    candidates = [("a", 10 * ONE, 1.0, (0, 10)), ("c", 11 * ONE, 1.0, (20, 30)), ("s", 2 * ONE, 1.0, None)]
    stages, missing = reassign(N, STAGES, {"b"}, candidates, layer_bytes=LAYER, kv_reserve=KV)
    assert stages is None and missing == [(10, 20)]


def test_reassign_lost_peer_never_reused_and_nothing_lost() -> None:
    candidates = [("a", 30 * ONE, 1.0, (0, 10)), ("b", 30 * ONE, 1.0, None), ("c", 30 * ONE, 1.0, (20, 30))]
    stages, _ = reassign(N, STAGES, {"b"}, candidates, layer_bytes=LAYER, kv_reserve=KV)
    assert stages is not None and "b" not in {n for n, _, _ in stages}
    assert reassign(N, STAGES, set(), candidates, layer_bytes=LAYER, kv_reserve=KV) == (list(STAGES), [])


def test_reassign_two_gaps_two_standbys() -> None:
    stages4 = [("a", 0, 8), ("b", 8, 15), ("c", 15, 22), ("d", 22, 30)]
    candidates = [
        ("a", 8 * ONE, 1.0, (0, 8)),
        ("c", 7 * ONE, 1.0, (15, 22)),
        ("s1", 8 * ONE, 1.0, None),
        ("s2", 8 * ONE, 1.0, None),
    ]
    stages, missing = reassign(N, stages4, {"b", "d"}, candidates, layer_bytes=LAYER, kv_reserve=KV)
    assert missing == []
    assert stages == [("a", 0, 8), ("s1", 8, 15), ("c", 15, 22), ("s2", 22, 30)]


# ------------------------------------------------------------------ choose_coordinator


def test_choose_coordinator_oldest_then_node_id() -> None:
    assert choose_coordinator([("b", 5.0), ("a", 7.0), ("c", 3.0)]) == "c"
    assert choose_coordinator([("b", 3.0), ("a", 3.0)]) == "a"
    assert choose_coordinator([("z", 1.0)]) == "z"
    with pytest.raises(ValueError):
        choose_coordinator([])


def test_layer_map_tensor_parallel_group_is_one_stage_and_lost_with_any_rank() -> None:
    from mesh.coordinator import LayerMap
    from protos import together_pb2 as pb

    def peer(n: str, age: float, backend: str = "torch", group: str = "g") -> pb.PeerInfo:
        return pb.PeerInfo(node_id=n, name=n, backend=backend, started_at=age, free_memory=8 * GiB,
                           layer_bytes=LAYER, tp_group=group, tp_size=2 if group else 0, start=-1, end=-1)

    lm = LayerMap("m", N, "x", KV)
    rng, why = lm.claim_tp(peer("lead", 1.0), (0, 15))
    assert rng is None and why == "waiting for tensor-parallel group 'g': 1/2 peers"
    rng, why = lm.claim_tp(peer("mlx", 3.0, "mlx"), None)
    assert rng is None and why.startswith("refused") and "cannot mix backends" in why
    lm.members.pop("mlx")
    rng, why = lm.claim_tp(peer("second", 2.0), None)
    assert rng is None and why.startswith("member of tensor-parallel group 'g'")
    rng, why = lm.claim_tp(peer("lead", 1.0), (0, 15))
    assert rng == (0, 15) and "tensor-parallel group 'g' of 2 peers" in why
    assert lm.claim(peer("b", 4.0, group=""), (15, 30))[0] == (15, 30)
    assert [(s.node_id, s.start, s.end, list(s.tp_members)) for s in lm.plan().stages] == [
        ("lead", 0, 15, ["lead", "second"]), ("b", 15, 30, [])]
    assert lm.claim_tp(peer("second", 2.0), None)[1] == "member of tensor-parallel group 'g': rank 1"
    assert not lm.left_group(peer("second", 2.0)) and lm.left_group(peer("second", 2.0, group=""))
    epoch = lm.epoch
    assert lm.remove("second")  # a rank is gone: the group's whole stage is lost
    assert lm.epoch > epoch and [s[0] for s in lm.stages] == ["b"] and lm.missing() == [(0, 15)]
    assert not lm.in_tp(peer("lead", 1.0)) and "g" in lm.broken
