"""This peer's stage of the ring: it checks a frame, runs it through its shard off the event loop, and
passes the hidden states on to the next stage, or (last stage) the sampled tokens back to the frame's
origin.

A hop's time on a stage is thread hand-offs more than work (perf/bench_hop.py, bench_ring.py): a frame
is checked and queued for the compute thread as it comes off its stream, before any task is made for
it, and the compute thread is a plain thread blocked on a queue whose result reaches the event loop in
one `call_soon_threadsafe` (an executor adds its own futures, locks and a second callback)."""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import grpc
import numpy as np

from backends.errors import GroupError, RequestError
from backends.shard import LayerShard, Sample, SeqChunk
from backends.wire import Hidden, WireError
from mesh import trace
from mesh.links import Payload, Peers
from mesh.metrics import PeerMetrics
from mesh.protocol import FrameError, params_from_pb
from mesh.view import PlanView
from protos import together_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_LEASE_S = 60.0  # a sequence unseen for this long is freed (its API peer is gone)
# a sequence a stage cannot continue is replayed from its history by its API peer (retryable)
_DROPPED = grpc.StatusCode.FAILED_PRECONDITION
BACKLOG = 32  # frames a stage takes off one stream before the earliest is done (the ring keeps far fewer)


class ComputeThread:
    """The one thread every call into a shard runs on (loading and forwards never overlap), fed by a
    queue: it blocks on the queue between calls and hands each result to the caller's event loop
    in one call_soon_threadsafe."""

    def __init__(self, name: str = "compute", cpus: frozenset[int] | None = None) -> None:
        # cpus: the cores this thread (and the threads its backend starts from it) may run on; None: any
        self.name, self.cpus = name, cpus
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Queue `fn`; its result (or exception) settles the returned future on the running loop."""
        if self._closed:
            raise RuntimeError("the compute thread is shut down")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put((fn, fut))
        if self._thread is None:  # started by the first call (a stage that never computes has none)
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()
        return fut

    def _work(self) -> None:
        if self.cpus:  # this thread's own affinity (Linux): the backend's threads, started from it, inherit it
            os.sched_setaffinity(0, self.cpus)
        while (job := self._jobs.get()) is not None:
            fn, fut = job
            if fut.cancelled():  # its caller is gone (a read of a flag: no lock needed)
                continue
            try:
                result, error = fn(), None
            except BaseException as e:  # the caller's to handle, as an executor would hand it back
                result, error = None, e
            try:
                fut.get_loop().call_soon_threadsafe(_settle, fut, result, error)
            except RuntimeError:  # the loop is closed: nobody waits
                pass
            del job, fn, fut, result, error  # no reference to a frame's buffers while blocked

    def close(self) -> None:
        """Stop after the call under way; the calls still queued are cancelled."""
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[1].get_loop().call_soon_threadsafe(job[1].cancel)
        self._jobs.put(None)


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


@dataclass
class _Begun:
    """A frame checked and queued for the compute thread."""

    sh: LayerShard
    index: int
    entries: list[pb.SeqEntry]
    ids: list[str]
    computed: asyncio.Future[tuple[list[pb.SeqEntry], list[tuple[str, str]], Hidden | list[Sample], float]]


class Stage:
    """The loaded shard (if any) and the one compute thread every call into it runs on."""

    def __init__(self, view: PlanView, links: Peers, metrics: PeerMetrics,
                 deliver: Callable[[pb.Result], None], group_failed: Callable[[str], None],
                 lease: float = DEFAULT_LEASE_S, cpus: frozenset[int] | None = None) -> None:
        # deliver: hand a Result to this peer's own origin; group_failed: a rank of the TP group is gone;
        # cpus: the cores the compute thread is pinned to (--cpus)
        self.view, self.links, self.metrics = view, links, metrics
        self._deliver, self._group_failed = deliver, group_failed
        self.shard: LayerShard | None = None
        self._compute = ComputeThread(cpus=cpus)  # one per backend
        self.hop_ms: list[float] = []  # recent compute time of frames at this stage
        self._hop_tokens: list[int] = []  # tokens (frame positions) of those frames
        self.bytes_per_token_hop = 0  # serialized size of a one-token frame to the next stage
        # the lease: a sequence not seen in a frame for `lease` seconds lost its API peer (or its
        # release): the sweep frees it
        self.lease = lease
        self.seen: dict[str, tuple[str, float]] = {}  # seq id -> (its origin, last frame here)
        self._busy: dict[str, int] = {}  # sequences of the frames under way here (they overlap), and how many
        self._sweeper: asyncio.Task[None] | None = None
        self._received: deque[asyncio.Task[None]] = deque()  # frames taken off the Forward streams, in order

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the compute thread: loading and forwards never overlap, the loop stays free."""
        return await self._compute.submit(fn)

    async def load(self, make: Callable[[], LayerShard]) -> None:
        self.shard = None  # the old slice's memory goes before the new one's comes
        self.shard = await self.call(make)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for t in self._received:
            t.cancel()
        self._compute.close()

    def tokens_per_s(self) -> float:
        """Tokens (frame positions) per second of compute over the recent frames, not frames."""
        ms, n = sum(self.hop_ms[-32:]), sum(self._hop_tokens[-32:])
        return 1000.0 * n / ms if ms > 0 else 0.0

    async def release(self, seq_ids: list[str], keep: Sequence[pb.KeepSeq] = ()) -> int:
        """Free these sequences' caches here (after keeping the complete blocks of `keep`'s committed
        tokens in the prefix cache); how many this stage held."""
        for s in seq_ids:
            self.seen.pop(s, None)
        sh = self.shard
        if sh is None:
            return 0

        def free() -> int:
            for k in keep:
                try:
                    sh.keep(k.seq_id, list(k.tokens))
                except Exception:  # keeping is a cache's favour: the caches are freed regardless
                    log.exception("could not keep the prefix of %s", k.seq_id)
            return sum(sh.free_sequence(s) for s in seq_ids)

        return await self.call(free)

    def _renew(self, seq_ids: list[str], origin: str) -> None:
        now = time.monotonic()
        for s in seq_ids:
            self.seen[s] = (origin, now)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep())

    async def _sweep(self) -> None:
        """Free sequences idle past the lease: their API peer is gone, or their release was lost."""
        while self.seen:
            await asyncio.sleep(max(0.05, self.lease / 4))
            now = time.monotonic()
            idle = [s for s, (_, t) in self.seen.items() if now - t > self.lease and s not in self._busy]
            freed = await self.release(idle) if idle else 0
            if freed:
                log.warning("freed %d sequence(s) idle for over %.1f s (their API peer is gone?)",
                            freed, self.lease)

    # ---------------------------------------------------------------- frames

    async def receive(self, frame: pb.Frame) -> None:
        """Take a frame off a Forward stream without waiting for the one before it to be computed and
        sent on: its compute queues behind theirs (the compute thread runs frames in arrival order,
        and the next hop's stream writes them in that order). Waits only while the backlog is full."""
        while self._received and self._received[0].done():
            self._received.popleft()
        if len(self._received) >= BACKLOG:
            await asyncio.wait([self._received[0]])
        # the compute is queued now, and the task that sends its result on starts while it runs
        task = asyncio.ensure_future(self._run_or_fail(frame, self._begin_or_error(frame)))
        self._received.append(task)

    def _begin_or_error(self, frame: pb.Frame) -> _Begun | Exception:
        try:
            return self._begin(frame)
        except Exception as e:  # the frame's own task reports it (below)
            return e

    async def _run_or_fail(self, frame: pb.Frame, begun: _Begun | Exception) -> None:
        try:
            if isinstance(begun, Exception):
                raise begun
            await self._finish(frame, begun)
        except FrameError as e:
            await self.fail(frame, e)
        except Exception as e:  # a bug fails this frame, never the stream or the frames behind it
            log.exception("frame %d failed in %s", frame.frame_id, self.view.name)
            await self.fail(frame, FrameError(grpc.StatusCode.INTERNAL, f"{self.view.name}: {type(e).__name__}: {e}"))

    async def handle_frame(self, frame: pb.Frame) -> None:
        """Run one frame through this stage, then pass it on (or return the tokens to its origin).
        A sequence this stage cannot run (unknown here, out of step) leaves the frame alone."""
        await self._finish(frame, self._begin(frame))

    def _begin(self, frame: pb.Frame) -> _Begun:
        """Check a frame and queue its compute (FrameError: refused)."""
        sh, index, entries, x = self._check(frame)
        fid = frame.frame_id
        if trace.ON:
            trace.mark("submit", fid)
        computed = self._compute.submit(lambda: _timed(sh, entries, x, fid))
        ids = [e.seq_id for e in entries]
        self._renew(ids, frame.origin)
        for s in ids:
            self._busy[s] = self._busy.get(s, 0) + 1
        return _Begun(sh, index, entries, ids, computed)

    async def _finish(self, frame: pb.Frame, begun: _Begun) -> None:
        """Wait for a begun frame's compute, then pass its output on. The next message is made while
        the compute runs (the loop is idle then) and the stage's own records are kept after the
        output left: Python run right after a compute finds its caches cold (the weights went
        through them) and is ~20x slower than warm (~100 us to make and encode a one-token Frame
        against ~6 us, measured on this 2-core VM), and that time is the hop's."""
        sh, index = begun.sh, begun.index
        ahead = _next_message(frame, begun.entries, sh.is_last)
        try:
            kept, dropped, out, seconds = await self._forward(sh, frame, begun.computed)
            if trace.ON:
                trace.mark("resume", frame.frame_id)
        except BaseException:
            self._unbusy(begun.ids)
            raise
        nxt: pb.Frame | None = None
        try:
            if isinstance(out, list) != isinstance(ahead, pb.Result):  # not what the shard's is_last said
                ahead = _next_message(frame, begun.entries, isinstance(out, list))
            if dropped:
                why = "; ".join([e for e in (frame.error,) if e] + [why for _, why in dropped])
                ahead.failed_seqs.extend(s for s, _ in dropped)
                ahead.error, ahead.error_code = why, _DROPPED.value[0]
                if isinstance(ahead, pb.Frame):
                    del ahead.seqs[:]
                    ahead.seqs.extend(kept)
            ahead.hop_ms.append(seconds * 1000)
            if isinstance(out, list):  # the last stage sampled: tokens go back to the origin
                assert isinstance(ahead, pb.Result)
                ahead.results.extend(pb.TokenResult(seq_id=s.seq_id, token=s.token, logprob=s.logprob,
                                                  top_tokens=[t for t, _ in s.top_logprobs],
                                                  top_logprobs=[lp for _, lp in s.top_logprobs]) for s in out)
                await self.send_result(frame.origin, ahead)
                if trace.ON:
                    trace.mark("sent", frame.frame_id)
                return
            assert isinstance(ahead, pb.Frame)
            nxt = ahead
            nxt.dtype = out.dtype
            nxt.shape.extend(out.shape)
            addr, _ = self.view.stage_of(index + 1)
            # the hidden states go onto the wire uncopied (a shard never writes a returned buffer again)
            await self.send_frame(addr, nxt, memoryview(out.data).cast("B"))
            if trace.ON:
                trace.mark("sent", frame.frame_id)
        finally:
            self._unbusy(begun.ids)
            self._renew([e.seq_id for e in kept], frame.origin)  # idle time counts from the frame's end
            self.metrics.stage_compute_seconds.observe(seconds)
            self.hop_ms.append(seconds * 1000)
            self._hop_tokens.append(sum(e.length for e in kept))
            del self.hop_ms[:-64], self._hop_tokens[:-64]
            if isinstance(out, list):
                self.metrics.stage_tokens.inc(len(out))
            elif nxt is not None and len(kept) == 1 and kept[0].length == 1:
                # + data's tag and length, unless it went into the message (a stage of its own)
                self.bytes_per_token_hop = nxt.ByteSize() + (0 if nxt.data else out.nbytes + 3)

    def _unbusy(self, ids: list[str]) -> None:
        for s in ids:
            if (n := self._busy.get(s, 0)) > 1:
                self._busy[s] = n - 1
            else:
                self._busy.pop(s, None)

    def _check(self, frame: pb.Frame) -> tuple[LayerShard, int, list[pb.SeqEntry], np.ndarray | Hidden]:
        """Refuse a frame of another plan, for a peer that is no stage, or with inconsistent contents."""
        view = self.view
        if frame.epoch != view.plan.epoch:
            raise FrameError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"stale plan epoch {frame.epoch} (this peer is at {view.plan.epoch})")
        sh = self.shard
        if sh is None:
            raise FrameError(grpc.StatusCode.UNAVAILABLE, f"{view.name} holds no layers")
        index = view.my_index()
        if index is None:
            raise FrameError(grpc.StatusCode.FAILED_PRECONDITION, f"{view.name} is not a stage of the plan")
        entries = list(frame.seqs)
        if not entries or len({e.seq_id for e in entries}) != len(entries):
            raise FrameError(grpc.StatusCode.INVALID_ARGUMENT,
                             "corrupt frame: no sequences, or a sequence twice in one frame")
        x: np.ndarray | Hidden
        try:
            if sh.is_first:
                x = np.frombuffer(np.asarray(frame.tokens, np.int32).tobytes(), np.int32)
            else:
                x = Hidden(frame.data, frame.dtype, tuple(frame.shape))
        except WireError as e:
            raise FrameError(grpc.StatusCode.INVALID_ARGUMENT, f"corrupt frame: {e}") from None
        return sh, index, entries, x

    async def _forward(self, sh: LayerShard, frame: pb.Frame, computed: asyncio.Future[
                           tuple[list[pb.SeqEntry], list[tuple[str, str]], Hidden | list[Sample], float]]
                       ) -> tuple[list[pb.SeqEntry], list[tuple[str, str]], Hidden | list[Sample], float]:
        """The frame's compute on the compute thread, its errors as this frame's failure."""
        try:
            return await computed
        except FrameError:
            raise
        except GroupError as e:  # a rank of this peer's group is gone: the stage is lost
            if sh is self.shard:
                self._group_failed(str(e))
            raise FrameError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except (RequestError, WireError) as e:
            raise FrameError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except Exception as e:  # poisoned numbers or a backend bug fail this frame, not the whole link
            if sh is not self.shard:  # its group was dissolved under it: the sequences are replayed
                raise FrameError(grpc.StatusCode.UNAVAILABLE, f"{self.view.name}'s stage changed: {e}") from None
            log.exception("frame %d failed in %s's compute", frame.frame_id, self.view.name)
            raise FrameError(grpc.StatusCode.INTERNAL,
                             f"{self.view.name} failed: {type(e).__name__}: {e}") from None

    def start_here(self, frame: pb.Frame) -> Awaitable[None]:
        """Queue a frame's compute on this stage now (its check and submit run before this returns) and
        return what passes its output on once computed (an origin's own stage 0: no task hop first)."""
        return self._run_or_fail(frame, self._begin_or_error(frame))

    def send_frame(self, address: str, frame: pb.Frame, payload: Payload = b"") -> Awaitable[None]:
        """Pass a frame (its hidden states in `payload`, if not in `data`) to the stage at `address`;
        failures go to its origin. This stage runs it in place, its compute queued before this returns
        (`start_here`: an origin's own stage 0 takes no task hop first)."""
        if address == self.view.address:
            if len(payload):
                frame.data = bytes(payload)
            return self.start_here(frame)
        return self._send_on(address, frame, payload)

    async def _send_on(self, address: str, frame: pb.Frame, payload: Payload) -> None:
        try:
            await self.links.stream(address, "Forward").send(frame, payload)
        except ConnectionError as e:
            await self.fail(frame, FrameError(grpc.StatusCode.UNAVAILABLE, str(e)))

    async def fail(self, frame: pb.Frame, e: FrameError) -> None:
        """Tell the frame's origin that its sequences failed here, and why."""
        failed = (e.seqs or [s.seq_id for s in frame.seqs]) + list(frame.failed_seqs)  # and earlier stages' drops
        res = pb.Result(frame_id=frame.frame_id, error=str(e), error_code=e.code.value[0], failed_seqs=failed)
        await self.send_result(frame.origin, res)

    async def send_result(self, origin: str, res: pb.Result) -> None:
        if origin == self.view.address:
            self._deliver(res)
        else:
            try:
                await self.links.stream(origin, "Deliver").send(res)
            except ConnectionError as e:
                log.warning("cannot return results to %s: %s", origin, e)


def _next_message(frame: pb.Frame, entries: list[pb.SeqEntry], last: bool) -> pb.Frame | pb.Result:
    """What a stage sends on after `frame`, without the compute's output: the Result to the origin
    (last stage) or the next stage's Frame."""
    if last:
        return pb.Result(frame_id=frame.frame_id, hop_ms=frame.hop_ms, failed_seqs=frame.failed_seqs,
                         error=frame.error, error_code=frame.error_code)
    return pb.Frame(frame_id=frame.frame_id, epoch=frame.epoch, seqs=entries, origin=frame.origin,
                    hop_ms=frame.hop_ms, failed_seqs=frame.failed_seqs, error=frame.error, error_code=frame.error_code)


def _timed(sh: LayerShard, entries: list[pb.SeqEntry], x: np.ndarray | Hidden, frame_id: int = 0
           ) -> tuple[list[pb.SeqEntry], list[tuple[str, str]], Hidden | list[Sample], float]:
    """_run on the compute thread, and its compute time there (not its wait for the thread nor the
    hand-offs: those are the hop's, and frames behind others wait)."""
    if trace.ON:
        trace.mark("cstart", frame_id)
    t0 = time.perf_counter()
    kept, dropped, out = _run(sh, entries, x)
    t1 = time.perf_counter()
    if trace.ON:
        trace.mark("cend", frame_id)
    return kept, dropped, out, t1 - t0


def _run(sh: LayerShard, entries: list[pb.SeqEntry], x: np.ndarray | Hidden
         ) -> tuple[list[pb.SeqEntry], list[tuple[str, str]], Hidden | list[Sample]]:
    """On the compute thread: drop the rows of sequences this shard cannot continue (each fails
    alone), open the caches of the sequences this frame starts, then run the rest."""
    kept, dropped, rows = [], [], []
    pos = 0
    for e in entries:
        at = sh.position(e.seq_id)
        if e.trim and not e.start and at is not None and at > e.offset:
            sh.trim(e.seq_id, e.offset)  # drafts the last stage rejected on the sequence's last trip
            at = e.offset
        if e.drafts and (e.more or e.drafts >= e.length or len(e.draft_ids) != e.drafts):
            dropped.append((e.seq_id, f"sequence {e.seq_id!r}: {e.drafts} drafts ({len(e.draft_ids)} ids) in a "
                                      f"chunk of {e.length} tokens{' that draws no token' if e.more else ''}"))
        elif e.start and e.prefix and (why := sh.prefix_missing(e.history, e.prefix, e.adapter)):
            dropped.append((e.seq_id, f"sequence {e.seq_id!r}: {why}"))  # its API peer sends it whole
        elif e.start or at == e.offset:
            kept.append(e)
            rows.append((pos, pos + e.length))
        elif at is None:
            dropped.append((e.seq_id, f"unknown sequence {e.seq_id!r} (released, or its cache expired)"))
        else:
            dropped.append((e.seq_id, f"sequence {e.seq_id!r}: chunk at position {e.offset} but the cache "
                                      f"holds {at} tokens"))
        pos += e.length
    if not kept:
        raise FrameError(_DROPPED, "; ".join(why for _, why in dropped), [s for s, _ in dropped])
    if dropped:
        x = _rows(x, rows, pos)
    started = [e.seq_id for e in kept if e.start]
    for e in kept:
        if e.start:
            sh.add_sequence(e.seq_id, params_from_pb(e.sampling), list(e.history), e.adapter, e.prefix,
                            e.generated)
    try:
        return kept, dropped, sh.forward([SeqChunk(e.seq_id, e.offset, e.length, not e.more, e.drafts,
                                                list(e.draft_ids)) for e in kept], x)
    except Exception:
        for s in started:  # a refused frame must not leave caches behind
            sh.free_sequence(s)
        raise


def _rows(x: np.ndarray | Hidden, rows: list[tuple[int, int]], total: int) -> np.ndarray | Hidden:
    """The kept rows [a, b) of a frame's input (token ids, or hidden states of `total` rows)."""
    if isinstance(x, np.ndarray):
        return np.concatenate([x[a:b] for a, b in rows])
    if len(x.shape) != 2 or x.shape[0] != total:
        raise WireError(f"hidden states of shape {x.shape} for a frame of {total} tokens")
    width = x.nbytes // max(1, total)
    buf = memoryview(x.data).cast("B")
    data = b"".join(buf[a * width:b * width] for a, b in rows)
    return Hidden(data, x.dtype, (sum(b - a for a, b in rows), x.shape[1]))
