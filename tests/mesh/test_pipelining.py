"""Micro-batches: the scheduler keeps one frame per stage in the ring, splits the running sequences
into groups, and lets the chunks of one long prompt follow each other in. Against a fake ring whose
stages run frames in arrival order and check every chunk against a cache position, as real stages do."""

from __future__ import annotations

import asyncio
import itertools

import grpc

from backends.generation import Delta
from backends.sampling import SamplingParams
from mesh.batching import group_size
from mesh.metrics import PeerMetrics
from mesh.scheduler import Scheduler
from protos import together_pb2 as pb

NODE = "f" * 32


def token_at(length: int) -> int:
    """The fake last stage's token after a history of `length`: a skipped or doubled step shows."""
    return 100 + length % 50


class PipeRing:
    """`stages` stages, each running one frame at a time in arrival order (a FIFO lock and a short
    sleep), each holding a position per sequence and dropping chunks out of step with it."""

    def __init__(self, ck, stages: int, compute_s: float = 0.002) -> None:
        self.node_id, self.ck, self.metrics = NODE, ck, PeerMetrics()
        n = ck.config.num_hidden_layers
        cuts = [round(i * n / stages) for i in range(stages + 1)]
        self.plan = pb.Plan(epoch=1, complete=True, num_layers=n, stages=[
            pb.Assignment(node_id=f"{i:x}" * 32, start=a, end=b) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))])
        self.locks = [asyncio.Lock() for _ in range(stages)]
        self.pos: list[dict[str, int]] = [{} for _ in range(stages)]
        self.compute_s = compute_s
        self.frames: list[pb.Frame] = []
        self.released: list[str] = []
        self.dropped: list[str] = []
        self.in_flight = self.max_in_flight = 0
        self.concurrent: list[tuple[frozenset[str], frozenset[str]]] = []  # pairs of frames in the ring together
        self._now: dict[int, frozenset[str]] = {}
        self._ids = itertools.count(1)
        self.fail_at: dict[int, pb.Result] = {}  # frame id -> the Result it gets at the last stage instead

    def new_frame_id(self) -> int:
        return next(self._ids)

    async def run_frame(self, frame: pb.Frame, timeout: float = 120.0) -> pb.Result:
        self.frames.append(frame)
        seqs = frozenset(e.seq_id for e in frame.seqs)
        self.concurrent += [(seqs, other) for other in self._now.values()]
        self._now[frame.frame_id] = seqs
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._through(frame)
        finally:
            self.in_flight -= 1
            del self._now[frame.frame_id]

    async def _through(self, frame: pb.Frame) -> pb.Result:
        entries, failed = list(frame.seqs), []
        for i, lock in enumerate(self.locks):
            async with lock:  # FIFO: frames pass each stage in the order they reached it
                await asyncio.sleep(self.compute_s)
                if i == len(self.locks) - 1 and frame.frame_id in self.fail_at:
                    return self.fail_at[frame.frame_id]
                kept = []
                for e in entries:
                    at = self.pos[i].get(e.seq_id)
                    if e.start or at == e.offset:
                        self.pos[i][e.seq_id] = e.offset + e.length
                        kept.append(e)
                    else:
                        failed.append(e.seq_id)
                        self.dropped.append(e.seq_id)
                entries = kept
        res = pb.Result(frame_id=frame.frame_id, hop_ms=[1.0] * len(self.locks), failed_seqs=failed,
                        results=[pb.TokenResult(seq_id=e.seq_id, token=token_at(e.offset + e.length))
                                 for e in entries if not e.more])
        if failed:
            res.error, res.error_code = "out of step", grpc.StatusCode.FAILED_PRECONDITION.value[0]
        return res

    async def release(self, seq_ids: list[str]) -> int:
        self.released += seq_ids
        for p in self.pos:
            for s in seq_ids:
                p.pop(s, None)
        return len(seq_ids)


async def drain(queue: asyncio.Queue[Delta | Exception | None]) -> tuple[list[int], Exception | None]:
    out: list[int] = []
    while True:
        item = await asyncio.wait_for(queue.get(), 20)
        if item is None or isinstance(item, Exception):
            return out, item
        out.append(item.token)


async def until(cond, limit: float = 10.0) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.001)
    await asyncio.wait_for(poll(), limit)


def expected(prompt_len: int, n: int) -> list[int]:
    return [token_at(prompt_len + i) for i in range(n)]


def run(ring: PipeRing, tokenizer, jobs: list[tuple[int, int]], **kw):
    """Serve (prompt length, max_tokens) jobs at once; each request's tokens and error."""
    async def main():
        sched = Scheduler(ring, tokenizer, **kw)
        await sched.start()
        try:
            reqs = [sched.submit([5 + i] * p, SamplingParams(temperature=0, max_tokens=n))
                    for i, (p, n) in enumerate(jobs)]
            out = await asyncio.gather(*(drain(r.queue) for r in reqs))
            await asyncio.sleep(0.01)
            return out
        finally:
            await sched.stop()

    return asyncio.run(main())


def test_group_size_splits_the_running_sequences_evenly() -> None:
    assert [group_size(n, 2) for n in (0, 1, 2, 7, 8, 9)] == [1, 1, 1, 4, 4, 5]
    assert group_size(8, 1) == 8 and group_size(8, 3) == 3 and group_size(3, 0) == 3


def test_two_stages_keep_two_groups_in_flight(embedded, tokenizer) -> None:
    ring = PipeRing(embedded, 2)
    jobs = [(3 + i, 12) for i in range(8)]
    out = run(ring, tokenizer, jobs)
    assert [toks for toks, _ in out] == [expected(p, n) for p, n in jobs] and all(e is None for _, e in out)
    assert ring.max_in_flight == 2 and not ring.dropped
    # decode frames carry half the sequences each, and two frames in the ring never share a sequence
    decodes = [f for f in ring.frames if all(e.length == 1 for e in f.seqs)]
    assert sum(len(f.seqs) == 4 for f in decodes) >= 0.8 * len(decodes)
    assert all(not (a & b) for a, b in ring.concurrent)
    assert sorted(ring.released) == sorted(e.seq_id for f in ring.frames for e in f.seqs if e.start)


def test_three_stages_keep_three_frames_in_flight(embedded, tokenizer) -> None:
    ring = PipeRing(embedded, 3)
    jobs = [(4, 10)] * 6
    out = run(ring, tokenizer, jobs)
    assert [toks for toks, _ in out] == [expected(4, 10)] * 6 and ring.max_in_flight == 3


def test_one_stage_keeps_one_frame_unless_asked(embedded, tokenizer) -> None:
    ring = PipeRing(embedded, 1)
    assert [t for t, _ in run(ring, tokenizer, [(3, 6)] * 4)] == [expected(3, 6)] * 4
    assert ring.max_in_flight == 1
    ring = PipeRing(embedded, 1)
    assert [t for t, _ in run(ring, tokenizer, [(3, 6)] * 4, micro_batches=2)] == [expected(3, 6)] * 4
    assert ring.max_in_flight == 2


def test_chunks_of_one_long_prompt_follow_each_other_into_the_ring(embedded, tokenizer) -> None:
    ring = PipeRing(embedded, 2)
    ((toks, err),) = run(ring, tokenizer, [(2000, 3)], prefill_chunk=512)
    assert err is None and toks == expected(2000, 3) and not ring.dropped
    chunks = [(e.offset, e.length, e.more) for f in ring.frames for e in f.seqs][:4]
    assert chunks == [(0, 512, True), (512, 512, True), (1024, 512, True), (1536, 464, False)]
    assert ring.max_in_flight == 2  # chunk k+1 at stage 0 while chunk k is at stage 1


def test_a_long_prompt_does_not_hold_up_decodes(embedded, tokenizer) -> None:
    async def main():
        ring = PipeRing(embedded, 1)
        sched = Scheduler(ring, tokenizer, prefill_chunk=256)
        await sched.start()
        try:
            short = sched.submit([3, 4], SamplingParams(temperature=0, max_tokens=30))
            await until(lambda: len(short.gen.all_tokens) >= 4)
            long = sched.submit([9] * 1500, SamplingParams(temperature=0, max_tokens=2))
            outs = await asyncio.gather(drain(short.queue), drain(long.queue))
            return ring, short.seq_id, long.seq_id, outs
        finally:
            await sched.stop()

    ring, short, long, ((t1, e1), (t2, e2)) = asyncio.run(main())
    assert t1 == expected(2, 30) and t2 == expected(1500, 2) and e1 is None and e2 is None
    with_long = [f for f in ring.frames if any(e.seq_id == long and e.length > 1 for e in f.seqs)]
    assert len(with_long) == 6  # 1500 tokens in chunks of at most 256
    assert all(sum(e.length for e in f.seqs) <= 257 for f in with_long)
    assert all(any(e.seq_id == short for e in f.seqs) for f in with_long)  # the decode rode along each time


def test_a_ring_change_under_every_group_replays_them_all(embedded, tokenizer) -> None:
    ring = PipeRing(embedded, 2)
    lost = pb.Result(error="the ring changed", error_code=grpc.StatusCode.UNAVAILABLE.value[0])
    ring.fail_at = {5: lost, 6: lost}  # two frames (both groups) fail together: every sequence replays
    jobs = [(3, 8), (4, 8), (5, 8), (6, 8)]
    out = run(ring, tokenizer, jobs)
    assert [t for t, _ in out] == [expected(p, n) for p, n in jobs] and all(e is None for _, e in out)
    replays = [e for f in ring.frames[6:] for e in f.seqs if e.start]
    assert len(replays) == 4 and all(e.offset == 0 and e.length > 1 for e in replays)
    assert ring.metrics.registry.get_sample_value("together_recovery_seconds_count") == 4


def test_a_failed_chunk_replays_the_prompt_once_the_later_one_came_back(embedded, tokenizer) -> None:
    # chunk 2 of a long prompt fails at the last stage while chunk 3 is already in the ring: chunk 3 is
    # then out of step there (dropped), its stale result is ignored, and the prompt replays whole
    ring = PipeRing(embedded, 2)
    ring.fail_at = {2: pb.Result(error="busy", error_code=grpc.StatusCode.UNAVAILABLE.value[0])}
    ((toks, err),) = run(ring, tokenizer, [(1200, 4)], prefill_chunk=400)
    assert err is None and toks == expected(1200, 4)
    starts = [i for i, f in enumerate(ring.frames) if f.seqs[0].start]
    assert starts[:2] == [0, 3] and ring.frames[2].seqs[0].offset == 800  # the replay waited for chunk 3
    assert ring.metrics.count(ring.metrics.tokens) == 4


def test_a_cancelled_prompt_is_released_only_after_all_its_chunks_came_back(embedded, tokenizer) -> None:
    async def main():
        ring = PipeRing(embedded, 2, compute_s=0.02)
        sched = Scheduler(ring, tokenizer, prefill_chunk=100)
        await sched.start()
        try:
            req = sched.submit([9] * 1000, SamplingParams(temperature=0, max_tokens=2))
            await until(lambda: ring.in_flight == 2)
            sched.cancel(req)
            assert ring.released == []  # two chunks of it are in the ring
            await until(lambda: ring.in_flight == 0)
            await asyncio.sleep(0.01)
            return ring, req.seq_id
        finally:
            await sched.stop()

    ring, seq = asyncio.run(main())
    assert ring.released == [seq] and len(ring.frames) == 2 and not ring.dropped


def test_bad_micro_batch_flags_are_clear_errors(capsys) -> None:
    from apps.cli import main

    assert main(["join", "--micro-batches", "-1"]) == 2
    assert "--micro-batches 0 (one per stage) or more" in capsys.readouterr().err
    assert main(["join", "--prefill-chunk", "0"]) == 2
    assert "--prefill-chunk 1 or more" in capsys.readouterr().err


def test_a_stage_runs_frames_sent_back_to_back_in_order_and_drops_none(tmp_path) -> None:
    # what an API peer that is stage 0 does with two micro-batches and two chunks of one prompt in
    # flight: each is sent without waiting for the others; all must reach the next stage, in order
    from backends.shard import load_shard
    from backends.weights import open_checkpoint
    from tests.backends.test_tp import tiny_dir
    from tests.mesh.test_roles import ME, FakeLinks, make_stage, make_view, peer

    ck = open_checkpoint(tiny_dir(tmp_path / "tiny-llama"))
    links = FakeLinks()
    st, delivered, _ = make_stage(make_view(stages=[("me", 0, 1), ("next", 1, 3)],
                                            peers=[peer("next", "10.0.0.2:7000")]), links,
                                  load_shard("torch", ck, 0, 1, dtype="float32", threads=1))

    def chunk(fid: int, seq: str, offset: int, n: int, more: bool) -> pb.Frame:
        toks = list(range(3, 3 + n))
        e = pb.SeqEntry(seq_id=seq, offset=offset, length=n, start=offset == 0, more=more)
        if e.start:
            e.history.extend(toks * 3)
        return pb.Frame(frame_id=fid, epoch=7, origin=ME, tokens=toks, seqs=[e])

    frames = [chunk(1, "long", 0, 6, True), chunk(2, "short", 0, 2, False), chunk(3, "long", 6, 6, True),
              chunk(4, "long", 12, 6, False)]

    async def main() -> None:
        await asyncio.gather(*(st.send_frame(ME, f) for f in frames))
        st.close()

    asyncio.run(main())
    assert not delivered  # no failure went back to the origin
    assert [(f.frame_id, f.seqs[0].offset) for _, _, f in links.sent] == [(1, 0), (2, 0), (3, 6), (4, 12)]
    assert st.shard.position("long") == 18
