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
                         results=[pb.TokenResult(seq_id=s.seq_id, token=TOKEN, logprob=-0.5) for s in frame.seqs])

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
        # the second step fails for the first sequence only, with an error that is not retried
        if frame.frame_id == 2:
            victim.append(frame.seqs[0].seq_id)
            return pb.Result(frame_id=frame.frame_id, error="bad adapter", failed_seqs=victim,
                             error_code=grpc.StatusCode.INVALID_ARGUMENT.value[0])
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
