"""The scheduler against a fake ring (no processes, no gRPC): batching, per-sequence failures, and the
metrics it counts into the peer's registry."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import grpc
import pytest

from backends.errors import RequestError
from backends.generation import Delta
from backends.sampling import SamplingParams
from backends.weights import Checkpoint
from mesh.metrics import PeerMetrics
from mesh.protocol import FrameError
from mesh.scheduler import Scheduler
from protos import together_pb2 as pb

NODE = "f" * 32
TOKEN = 42  # an ordinary token (not EOS) the fake last stage always samples


class FakeRing:
    """One stage on another peer, answering every frame with one token per sequence, unless
    `fault(frame)` returns a failed Result instead."""

    def __init__(self, ck: Checkpoint, fault: Callable[[pb.Frame], pb.Result | None] | None = None) -> None:
        self.node_id, self.ck, self.metrics = NODE, ck, PeerMetrics()
        self.plan = pb.Plan(epoch=1, complete=True, num_layers=ck.config.num_hidden_layers,
                            stages=[pb.Assignment(node_id="e" * 32, start=0, end=ck.config.num_hidden_layers)])
        self.fault = fault
        self.frames: list[pb.Frame] = []
        self.released: list[str] = []
        self._ids = itertools.count(1)

    def new_frame_id(self) -> int:
        return next(self._ids)

    async def run_frame(self, frame: pb.Frame, timeout: float = 120.0) -> pb.Result:
        self.frames.append(frame)
        await asyncio.sleep(0)
        failed = self.fault(frame) if self.fault else None
        if failed is not None:
            return failed
        return pb.Result(frame_id=frame.frame_id, hop_ms=[1.0],
                         results=[pb.TokenResult(seq_id=s.seq_id, token=TOKEN, logprob=-0.5)
                                  for s in frame.seqs if not s.more])  # a prompt's inner chunk draws nothing

    async def release(self, seq_ids: list[str]) -> int:
        self.released += seq_ids
        return len(seq_ids)


async def drain(queue: asyncio.Queue[Delta | Exception | None]) -> tuple[list[Delta], Exception | None]:
    """A request's deltas until its end (None) or its error."""
    out: list[Delta] = []
    while True:
        item = await asyncio.wait_for(queue.get(), 10)
        if item is None or isinstance(item, Exception):
            return out, item
        out.append(item)


def serve(ring: FakeRing, tokenizer, jobs: list[tuple[list[int], int]]) -> list[tuple[list[Delta], Exception | None]]:
    """Submit every (prompt, max_tokens) at once and collect each request's outcome."""

    async def main() -> list[tuple[list[Delta], Exception | None]]:
        sched = Scheduler(ring, tokenizer)
        await sched.start()
        try:
            reqs = [sched.submit(p, SamplingParams(temperature=0, max_tokens=n)) for p, n in jobs]
            outcomes = await asyncio.gather(*(drain(r.queue) for r in reqs))
            await asyncio.sleep(0)  # the release of finished sequences runs in the background
            return outcomes
        finally:
            await sched.stop()

    return asyncio.run(main())


def counts(m: PeerMetrics) -> dict[str, int]:
    return {"requests": m.count(m.requests), "tokens": m.count(m.tokens), "steps": m.count(m.steps),
            "errors": m.count(m.errors)}


def test_batched_sequences_count_tokens_not_frames(embedded, tokenizer) -> None:
    ring = FakeRing(embedded)
    out = serve(ring, tokenizer, [([1, 2, 3], 3), ([4, 5], 5)])
    assert [len(d) for d, _ in out] == [3, 5] and all(err is None for _, err in out)
    assert all(d.token == TOKEN for deltas, _ in out for d in deltas)
    # both sequences share each frame: 5 steps, the first a prefill of both prompts
    assert len(ring.frames) == 5
    assert [len(f.seqs) for f in ring.frames] == [2, 2, 2, 1, 1]
    assert list(ring.frames[0].tokens) == [1, 2, 3, 4, 5]
    assert counts(ring.metrics) == {"requests": 2, "tokens": 8, "steps": 5, "errors": 0}
    m = ring.metrics
    assert m.registry.get_sample_value("together_step_seconds_count") == 5
    assert m.registry.get_sample_value("together_first_token_seconds_count") == 2
    # only one-sequence decode frames measure the hop overhead
    assert m.registry.get_sample_value("together_hop_overhead_seconds_count") == 2
    assert sorted(ring.released) == sorted(s.seq_id for s in ring.frames[0].seqs)


def test_stats_are_read_from_the_registry(embedded, tokenizer) -> None:
    ring = FakeRing(embedded)
    sched = Scheduler(ring, tokenizer)
    ring.metrics.tokens.inc(7)
    ring.metrics.errors.inc(2)
    assert sched.stats == {"requests": 0, "tokens": 7, "steps": 0, "errors": 2}
    sched.stats["tokens"] = 1  # a fresh view each time: the count lives only in the registry
    assert sched.stats["tokens"] == 7
    with pytest.raises(AttributeError):
        sched.stats = {}  # type: ignore[misc]


def test_a_failing_step_fails_only_its_sequences(embedded, tokenizer) -> None:
    victim: list[str] = []

    def fault(frame: pb.Frame) -> pb.Result | None:
        # the second step fails for the first sequence only, with an error that is not retried;
        # the rest of the frame ran on, and its tokens come back in the same Result
        if frame.frame_id == 2:
            victim.append(frame.seqs[0].seq_id)
            return pb.Result(frame_id=frame.frame_id, error="bad adapter", failed_seqs=victim,
                             error_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                             results=[pb.TokenResult(seq_id=s.seq_id, token=TOKEN) for s in frame.seqs[1:]])
        return None

    ring = FakeRing(embedded, fault)
    (d1, e1), (d2, e2) = serve(ring, tokenizer, [([1, 2, 3], 4), ([4, 5], 4)])
    assert isinstance(e1, RequestError) and "bad adapter" in str(e1) and len(d1) == 1
    assert e2 is None and len(d2) == 4
    assert counts(ring.metrics) == {"requests": 2, "tokens": 5, "steps": 4, "errors": 1}
    assert victim[0] in ring.released


def test_a_retryable_failure_replays_the_sequence(embedded, tokenizer) -> None:
    def fault(frame: pb.Frame) -> pb.Result | None:
        if frame.frame_id == 2:  # a stage went away mid-generation
            return pb.Result(frame_id=2, error="the ring changed", error_code=grpc.StatusCode.UNAVAILABLE.value[0])
        return None

    ring = FakeRing(embedded, fault)
    ((deltas, err),) = serve(ring, tokenizer, [([1, 2, 3], 3)])
    assert err is None and len(deltas) == 3
    replay = ring.frames[2]  # after the failure the whole history rebuilds the caches
    assert replay.seqs[0].start and list(replay.tokens) == [1, 2, 3, TOKEN]
    m = ring.metrics
    assert counts(m) == {"requests": 1, "tokens": 3, "steps": 3, "errors": 0}
    assert m.registry.get_sample_value("together_recovery_seconds_count") == 1


def test_a_cancelled_sequence_leaves_between_steps_and_is_released_only_after_its_frame(embedded, tokenizer) -> None:
    # a client drops its stream while a frame carrying its sequence is in the ring: releasing its caches
    # then would fail that frame at the next stage ("unknown sequence") for everyone in it
    gate = asyncio.Event()
    released_during: list[list[str]] = []

    class SlowRing(FakeRing):
        async def run_frame(self, frame: pb.Frame, timeout: float = 120.0) -> pb.Result:
            if frame.frame_id == 2:
                gate.set()
                await asyncio.sleep(0.2)
                released_during.append(list(self.released))
            return await super().run_frame(frame, timeout)

    ring = SlowRing(embedded)

    async def main() -> tuple[list[Delta], Exception | None]:
        sched = Scheduler(ring, tokenizer)
        await sched.start()
        try:
            keep = sched.submit([1, 2, 3], SamplingParams(temperature=0, max_tokens=5))
            drop = sched.submit([4, 5], SamplingParams(temperature=0, max_tokens=5))
            await gate.wait()
            sched.cancel(drop)  # mid-flight
            out = await drain(keep.queue)
            await asyncio.sleep(0.05)
            return out
        finally:
            await sched.stop()

    deltas, err = asyncio.run(main())
    assert err is None and len(deltas) == 5
    dropped = ring.frames[0].seqs[1].seq_id
    assert released_during == [[]]  # not under the frame in flight
    assert dropped in ring.released  # but once it came back
    assert all(dropped not in [e.seq_id for e in f.seqs] for f in ring.frames[2:])  # and out of the next frames


def test_the_loop_survives_any_exception_and_fails_only_the_step_involved(embedded, tokenizer) -> None:
    class BuggyRing(FakeRing):
        async def run_frame(self, frame: pb.Frame, timeout: float = 120.0) -> pb.Result:
            if any(list(e.history) == [6, 6, 6] for e in frame.seqs):
                raise RuntimeError("a bug in dispatch")
            return await super().run_frame(frame, timeout)

    ring = BuggyRing(embedded)

    async def main() -> list[tuple[list[Delta], Exception | None]]:
        sched = Scheduler(ring, tokenizer)
        await sched.start()
        try:
            bad = sched.submit([6, 6, 6], SamplingParams(temperature=0, max_tokens=3))
            first = await drain(bad.queue)
            good = sched.submit([1, 2], SamplingParams(temperature=0, max_tokens=3))
            return [first, await drain(good.queue)]
        finally:
            await sched.stop()

    (d1, e1), (d2, e2) = asyncio.run(main())
    assert isinstance(e1, RequestError) and "RuntimeError: a bug in dispatch" in str(e1) and not d1
    assert e2 is None and len(d2) == 3


def test_long_prompts_and_replays_go_in_chunks_under_the_frame_budget(embedded, tokenizer) -> None:
    hidden = embedded.config.hidden_size
    budget = 2 << 20  # 2 MiB frames: ~900 tokens of float32 hidden states of this model
    sizes: list[int] = []
    replayed = {"done": False}

    def fault(frame: pb.Frame) -> pb.Result | None:
        # what the frame weighs between stages: its header plus float32 hidden states of every token
        n = sum(e.length for e in frame.seqs)
        sizes.append(pb.Frame(seqs=frame.seqs, shape=[n, hidden], dtype="float32",
                              data=b"\0" * (n * hidden * 4)).ByteSize())
        if sum(e.length == 1 for e in frame.seqs) >= 30 and not replayed["done"]:
            replayed["done"] = True  # 30 long sequences decoding: a stage is lost, they all replay at once
            return pb.Result(frame_id=frame.frame_id, error="the ring changed",
                             error_code=grpc.StatusCode.UNAVAILABLE.value[0])
        return None

    ring = FakeRing(embedded, fault)

    async def main() -> list[tuple[list[Delta], Exception | None]]:
        sched = Scheduler(ring, tokenizer, max_frame_bytes=budget, max_prefill_tokens=1 << 20,
                          prefill_chunk=1 << 20)
        await sched.start()
        try:
            reqs = [sched.submit([7] * 6000, SamplingParams(temperature=0, max_tokens=40))]
            reqs += [sched.submit([8 + i] * 700, SamplingParams(temperature=0, max_tokens=40)) for i in range(32)]
            return await asyncio.gather(*(drain(r.queue) for r in reqs))
        finally:
            await sched.stop()

    out = asyncio.run(main())
    assert all(err is None and len(d) == 40 for d, err in out)
    assert replayed["done"] and max(sizes) <= budget
    # the 6000-token prompt went in order, chunk after chunk; it drew its first token only on the last
    long_id = ring.frames[0].seqs[0].seq_id
    chunks = [(e.offset, e.length, e.more, e.start) for f in ring.frames[:12] for e in f.seqs if e.seq_id == long_id]
    assert chunks[0][0] == 0 and chunks[0][3] and len(chunks) >= 7
    assert all(a[0] + a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert [c[2] for c in chunks if c[0] + c[1] <= 6000] == [True] * (len([c for c in chunks if c[0] + c[1] < 6000])) + [False]


def test_a_lost_frame_is_noticed_within_a_few_step_times(embedded, tokenizer) -> None:
    timeouts: list[float] = []

    class LossyRing(FakeRing):
        async def run_frame(self, frame: pb.Frame, timeout: float = 120.0) -> pb.Result:
            timeouts.append(timeout)
            if frame.frame_id == 3:  # dropped on the floor: nobody ever answers
                await asyncio.sleep(timeout)
                raise FrameError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:.1f} s")
            return await super().run_frame(frame, timeout)

    ring = LossyRing(embedded)

    async def main() -> tuple[list[Delta], Exception | None, float]:
        sched = Scheduler(ring, tokenizer, frame_timeout_floor=0.3)
        await sched.start()
        try:
            t0 = asyncio.get_running_loop().time()
            out = await drain(sched.submit([1, 2, 3], SamplingParams(temperature=0, max_tokens=4)).queue)
            return (*out, asyncio.get_running_loop().time() - t0)
        finally:
            await sched.stop()

    deltas, err, took = asyncio.run(main())
    assert err is None and len(deltas) == 4 and took < 3.0  # floor + a 1 s pause before the replay
    assert timeouts[2] < 1.0 and ring.frames[2].seqs[0].start  # the lost frame (not recorded) is replayed


def test_a_request_that_cannot_be_put_on_the_wire_fails_alone(embedded, tokenizer) -> None:
    ring = FakeRing(embedded)
    bad_params = SamplingParams(temperature=1.0, seed=2**70, max_tokens=3)  # no int64 holds this seed
    (d1, e1), (d2, e2) = serve_params(ring, tokenizer, [([1, 2, 3], bad_params),
                                                        ([4, 5], SamplingParams(temperature=0, max_tokens=3))])
    assert isinstance(e1, RequestError) and "cannot send this request into the ring" in str(e1) and not d1
    assert e2 is None and len(d2) == 3


def serve_params(ring: FakeRing, tokenizer, jobs: list[tuple[list[int], SamplingParams]]):
    async def main() -> list[tuple[list[Delta], Exception | None]]:
        sched = Scheduler(ring, tokenizer)
        await sched.start()
        try:
            reqs = [sched.submit(p, params) for p, params in jobs]
            return list(await asyncio.gather(*(drain(r.queue) for r in reqs)))
        finally:
            await sched.stop()

    return asyncio.run(main())


def test_a_slow_ring_gets_a_first_prompt_deadline_from_its_measured_speed(embedded, tokenizer) -> None:
    """Before any prompt is timed, a frame's deadline follows the peers' measured layer times: a
    ring at 0.2 s per decode step (MLX on a busy CPU) must not time out a 90-token first prompt."""
    ring = FakeRing(embedded)
    n = embedded.config.num_hidden_layers
    sched = Scheduler(ring, tokenizer)
    fast = sched.times.deadline(90)
    ring.plan.peers.append(pb.PeerInfo(node_id="e" * 32, layer_ms=200 / n, head_ms=0.0))
    slow = sched.times.deadline(90)
    assert fast < 18  # the old fixed guess
    assert slow >= 4 * 90 * 0.2


def test_the_next_frame_leaves_before_the_last_ones_tokens_reach_their_streams(embedded, tokenizer) -> None:
    """A frame's return launches the next frame first (its compute then overlaps the streams' handlers), and
    only then hands the tokens to their streams, each stream's still in order."""
    log: list[str] = []

    class Ring(FakeRing):
        def new_frame_id(self) -> int:  # called as the scheduler builds a frame, in step with its launch
            fid = super().new_frame_id()
            log.append(f"launch {fid}")
            return fid

    class Recording(asyncio.Queue):
        def put_nowait(self, item) -> None:
            log.append("end" if item is None else f"token {item.token}" if isinstance(item, Delta) else "error")
            super().put_nowait(item)

    async def main() -> list[Delta]:
        sched = Scheduler(Ring(embedded), tokenizer)
        await sched.start()
        try:
            r = sched.submit([1, 2, 3], SamplingParams(temperature=0, max_tokens=3))
            r.queue = Recording()
            deltas, err = await drain(r.queue)
            assert err is None
            return deltas
        finally:
            await sched.stop()

    assert len(asyncio.run(main())) == 3
    assert log == ["launch 1", "launch 2", f"token {TOKEN}", "launch 3", f"token {TOKEN}", f"token {TOKEN}", "end"]
