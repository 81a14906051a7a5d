"""perf/bench_batching.py compares like with like: the ring cut where the coordinator would cut it, and
every peer of every configuration with the same drafting and prefix cache (issue 13's ring targets)."""

from __future__ import annotations

import pytest

from perf import bench_batching as bb


def test_ring_setups_cut_where_asked():
    cuts, setups = bb.ring_setups(["measured"], 19, 30)
    assert cuts == {"measured": 19}
    assert setups == {"one peer": ([0, 30], 0), "two-peer ring": ([0, 19, 30], 0)}
    cuts, setups = bb.ring_setups(["measured", "even", "17"], 19, 30, micro_batches=3, one_frame=True)
    assert cuts == {"measured": 19, "even": 15, "17": 17}
    assert setups == {"one peer": ([0, 30], 0), "ring [0,19) [19,30)": ([0, 19, 30], 3),
                      "ring [0,15) [15,30)": ([0, 15, 30], 3), "ring [0,17) [17,30)": ([0, 17, 30], 3),
                      "ring, 1 frame": ([0, 19, 30], 1)}
    cuts, setups = bb.ring_setups(["measured"], 19, 30, micro_batches=[0, 3], peer_frames=[2])
    assert setups == {"one peer": ([0, 30], 0), "one peer, 2 frames": ([0, 30], 2),
                      "two-peer ring": ([0, 19, 30], 0), "two-peer ring, 3 frames": ([0, 19, 30], 3)}
    with pytest.raises(SystemExit):
        bb.ring_setups(["30"], 19, 30)  # a cut that leaves a peer no layer


def test_every_peer_joins_with_the_same_drafting_and_prefix_cache(monkeypatch):
    joined: list[tuple[str, ...]] = []

    class Peer:
        address, api = "127.0.0.1:1", "http://127.0.0.1:2"

    class Mesh:
        def __init__(self, model: str) -> None:
            pass

        def add(self, name: str, *args: str, **kw: object) -> Peer:
            joined.append(args)
            return Peer()

        def wait_ready(self, api: Peer, stages: int) -> None:
            pass

        def stop(self) -> None:
            pass

    monkeypatch.setattr(bb, "LocalMesh", Mesh)
    monkeypatch.setattr(bb, "measure", lambda *a: {})
    extra = bb.peer_args("off", "0")
    for cuts, mb in bb.ring_setups(["measured"], 19, 30)[1].values():
        bb.start("model", "torch", "auto", cuts, mb, extra)
    assert len(joined) == 3  # one peer, then the ring's two
    for args in joined:
        assert args[args.index("--draft") + 1] == "off"
        assert args[args.index("--prefix-cache-memory") + 1] == "0"
    assert [a[a.index("--layers") + 1] for a in joined] == ["0-30", "0-19", "19-30"]
    assert "--prefix-cache-memory" not in bb.peer_args("lookup", "default")  # the peers' own default


def test_decode_rate_leaves_the_prefill_out():
    # two streams: prompts take 1 s and 2 s, then 11 tokens each at 10 tokens/s
    r = bb.rates([(0.0, 1.0, 2.0, 11), (0.0, 2.0, 3.0, 11)], wall=3.0)
    assert r["decode_tps"] == 20.0  # 10 + 10: the streams' own rates after their first token
    assert r["agg_tps"] == 22 / 3.0  # the wall-clock rate counts the prefill
    assert r["ttft_p50_ms"] == 2000.0 and r["streams"] == 2


def test_busy_is_each_peers_busiest_thread():
    before = {(1, "1"): 1.0, (1, "2"): 5.0, (2, "7"): 0.0}
    after = {(1, "1"): 1.5, (1, "2"): 6.5, (2, "7"): 1.0, (2, "8"): 0.25}  # thread 8 started in between
    assert bb.busy(before, after, [1, 2], wall=2.0) == [0.75, 0.5]
    import os
    import sys

    if sys.platform.startswith("linux"):  # /proc: this process's threads, in CPU seconds
        own = bb.thread_seconds([os.getpid()])
        assert own and all(k[0] == os.getpid() and v >= 0 for k, v in own.items())
