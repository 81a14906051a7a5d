"""The API peer's scheduler: continuous batching of every running sequence into one frame per step."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from backends.errors import RequestError
from backends.generation import Delta, Generation
from backends.sampling import SamplingParams
from backends.shard import Sample
from backends.tokenizer import Tokenizer
from backends.weights import Checkpoint
from mesh.auth import MAX_MESSAGE_BYTES
from mesh.metrics import PeerMetrics
from mesh.protocol import FrameError, params_to_pb
from protos import together_pb2 as pb

log = logging.getLogger(__name__)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE.value[0], grpc.StatusCode.FAILED_PRECONDITION.value[0],
             grpc.StatusCode.DEADLINE_EXCEEDED.value[0]}
FAIL_FAST_S = 4.0  # how long stalled sequences wait for a reassignment before a plan without capacity fails them
MAX_FRAME_BYTES = MAX_MESSAGE_BYTES // 8  # a frame's share of the gRPC message limit, headers and all
WIRE_VALUE_BYTES = 4  # hidden states travel as float32 at most
FRAME_TIMEOUT_FLOOR_S = 10.0  # a lost frame is noticed after this, or a few step times if longer
PREFILL_GUESS_S = 0.02  # seconds per prefill token until one is measured (generous: no false timeouts)


class Ring(Protocol):
    """What the scheduler needs of its peer (a mesh.node.Node): the plan, a way into the ring, and
    the registry it counts into."""

    @property
    def node_id(self) -> str: ...
    @property
    def plan(self) -> pb.Plan: ...
    @property
    def ck(self) -> Checkpoint: ...
    @property
    def metrics(self) -> PeerMetrics: ...
    def new_frame_id(self) -> int: ...
    async def run_frame(self, frame: pb.Frame, timeout: float = ...) -> pb.Result: ...
    async def release(self, seq_ids: list[str]) -> int: ...


class RingUnavailable(Exception):
    """The ring cannot serve right now (incomplete, or a stage failed)."""


class QueueFull(RequestError):
    """Too many requests are waiting."""


class TooLarge(RequestError):
    """A request that can never fit in the ring's KV memory."""


@dataclass
class Request:
    gen: Generation
    queue: asyncio.Queue[Delta | Exception | None] = field(default_factory=asyncio.Queue)  # None: the end
    fed: int = 0  # tokens of its history the ring's caches hold (0: the next frame (re)starts it)
    cancelled: bool = False
    adapter: str = ""
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    stalled_since: float | None = None  # when a failure paused it (for replay and its deadline)
    stalled_at: float = 0.0
    stalled_epoch: int = -1
    deltas: list[Delta] = field(default_factory=list)  # kept for logprobs of non-streamed answers

    @property
    def seq_id(self) -> str:
        return self.gen.seq_id


class Scheduler:
    """Admits requests into a queue (with a cap) and steps all running sequences together."""

    def __init__(self, node: Ring, tok: Tokenizer, max_batch: int = 32, max_queue: int = 256,
                 max_prefill_tokens: int = 4096, max_kv_tokens: int = 1 << 20,
                 recovery_timeout: float = 30.0, max_frame_bytes: int = MAX_FRAME_BYTES,
                 frame_timeout_floor: float = FRAME_TIMEOUT_FLOOR_S) -> None:
        self.node, self.tok, self.metrics = node, tok, node.metrics
        self.token_bytes = node.ck.config.hidden_size * WIRE_VALUE_BYTES + 8  # hidden row + its token id
        if max_frame_bytes < 4 * self.token_bytes + 4096:
            raise ValueError(f"max_frame_bytes {max_frame_bytes} cannot carry a frame of this model")
        self.max_frame_bytes, self.frame_timeout_floor = max_frame_bytes, frame_timeout_floor
        self._in_flight: set[str] = set()  # sequences of the frame in the ring now
        self._step_batch: list[Request] = []  # the requests of the step under way (they fail if it breaks)
        self._s_per_token: float | None = None  # measured prefill time per token
        self.max_kv_tokens = max_kv_tokens
        self.max_batch, self.max_queue, self.max_prefill_tokens = max_batch, max_queue, max_prefill_tokens
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[int]] = set()  # held until done: the loop keeps only weak references
        self.recovery_timeout = recovery_timeout
        # recent windows for the web page's percentiles; the totals live in self.metrics
        self.step_ms: list[float] = []  # wall time of each ring step
        self.hop_overhead_ms: list[float] = []

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for t in list(self._releases):
            t.cancel()
        for r in self.waiting + self.running:
            r.queue.put_nowait(RingUnavailable("the peer is shutting down"))

    @property
    def stats(self) -> dict[str, int]:
        """The scheduler's totals, read from the peer's metrics (counted there, once)."""
        m = self.metrics
        return {"requests": m.count(m.requests), "tokens": m.count(m.tokens), "steps": m.count(m.steps),
                "errors": m.count(m.errors)}

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def kv_budget(self) -> int:
        """Tokens of KV cache the ring can hold at once: the tightest stage's free memory after its
        weights, over what one token costs there (capped by max_kv_tokens)."""
        stages = {s.node_id: s for s in self.node.plan.stages}
        per_token_layer = self.node.ck.config.kv_bytes_per_token(4)
        budget = self.max_kv_tokens
        for p in self.node.plan.peers:
            st = stages.get(p.node_id)
            if st is None or not p.free_memory:
                continue
            n = st.end - st.start
            room = int(p.free_memory) - n * int(p.layer_bytes)
            budget = min(budget, max(0, room) // max(1, n * per_token_layer))
        return budget

    def kv_in_use(self) -> int:
        return sum(len(r.gen.prompt) + r.gen.max_new for r in self.running)

    def submit(self, prompt: list[int], params: SamplingParams, adapter: str = "") -> Request:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
        seq_id = f"{self.node.node_id[:8]}-{uuid.uuid4().hex[:12]}"
        gen = Generation(seq_id, prompt, params, self.tok, self.node.ck.config.max_position_embeddings)
        need, budget = len(prompt) + gen.max_new, self.kv_budget()
        if need > budget:
            raise TooLarge(f"this request needs room for {need} tokens of KV cache but the ring holds "
                           f"at most {budget}; lower max_tokens or shorten the prompt")
        req = Request(gen, adapter=adapter)
        self.waiting.append(req)
        self.metrics.requests.inc()
        self._wake.set()
        return req

    def cancel(self, req: Request) -> None:
        """The client went away: the sequence leaves between steps, and its caches are freed once no
        frame in the ring carries it (freeing them under a frame in flight would fail that frame)."""
        if req.cancelled or req.gen.finished:
            return
        req.cancelled = True
        if req in self.waiting:
            self.waiting.remove(req)
        elif req in self.running and req.seq_id not in self._in_flight:
            self.running.remove(req)
            self._release([req.seq_id])

    async def _loop(self) -> None:
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
            try:
                await self._step()
            except Exception as e:  # the loop outlives any bug: only the requests of this step fail
                log.exception("a scheduler step failed")
                self._fail([r for r in self._step_batch if r in self.running],
                           RequestError(f"this request's step failed: {type(e).__name__}: {e}"))
                await asyncio.sleep(0.05)
            finally:
                self._in_flight, self._step_batch = set(), []
                gone = [r for r in self.running if r.cancelled]
                for r in gone:
                    self.running.remove(r)
                if gone:
                    self._release([r.seq_id for r in gone])

    async def _step(self) -> None:
        """One frame around the ring for every running sequence (long prompts a chunk at a time)."""
        if not self._ready_to_step():
            await asyncio.sleep(0.05)
            return
        self._admit()
        batch = [r for r in self.running if not r.cancelled]
        if not batch:
            return
        self._step_batch = batch
        frame, fed = self._frame(batch)
        if not fed:
            return
        batch = [r for r in batch if r.seq_id in fed]
        self._in_flight = set(fed)
        tokens, t0 = sum(fed.values()), time.perf_counter()
        try:
            result = await self.node.run_frame(frame, timeout=self._deadline(tokens))
        except FrameError as e:
            result = pb.Result(error=str(e), error_code=e.code.value[0])
        wall = time.perf_counter() - t0
        failed = set(result.failed_seqs) or ({r.seq_id for r in batch} if result.error else set())
        hit = [r for r in batch if r.seq_id in failed and not r.cancelled]
        if hit and result.error_code in RETRYABLE:
            self._stall(hit, result.error)
        elif hit:
            self._fail(hit, RequestError(result.error))
        ok = [r for r in batch if r.seq_id not in failed]
        for r in ok:
            r.fed += fed[r.seq_id]
        if ok:
            self._measure(ok, result, wall * 1000, tokens)
            self._dispatch(ok, result)

    def _deadline(self, tokens: int) -> float:
        """How long a frame of `tokens` may take before it counts as lost: a few recent step times
        (with a floor), plus a few times the measured prefill time of its tokens."""
        recent = sorted(self.step_ms[-32:])
        step = recent[len(recent) // 2] / 1000 if recent else 0.0
        per_token = self._s_per_token if self._s_per_token is not None else PREFILL_GUESS_S
        return max(self.frame_timeout_floor, 4 * step) + 4 * tokens * per_token

    def _measure(self, batch: list[Request], result: pb.Result, wall: float, tokens: int) -> None:
        if tokens >= 32:  # a prefill: its time per token sizes the next long frame's deadline
            rate = wall / 1000 / tokens
            self._s_per_token = rate if self._s_per_token is None else 0.7 * self._s_per_token + 0.3 * rate
        if tokens == 1 and result.hop_ms:
            # what the ring adds on top of compute, per network hop, for one-token frames
            stages = self.node.plan.stages
            hops = len(result.hop_ms) - (1 if stages and stages[0].node_id == self.node.node_id else 0)
            hops += 0 if stages and stages[-1].node_id == self.node.node_id else 1
            if hops > 0:
                overhead = (wall - sum(result.hop_ms)) / hops
                self.metrics.hop_overhead_seconds.observe(overhead / 1000)
                self.hop_overhead_ms.append(overhead)
                del self.hop_overhead_ms[:-1024]
        self.metrics.steps.inc()
        self.metrics.step_seconds.observe(wall / 1000)
        self.step_ms.append(wall)
        del self.step_ms[:-1024]

    def _stall(self, reqs: list[Request], why: str) -> None:
        """A stage failed or the ring changed: keep the sequences and replay them on the new path."""
        now = time.monotonic()
        for r in reqs:
            if r.stalled_since is None:
                r.stalled_since = now
                log.warning("sequence %s stalled (%s); it resumes when the ring is whole again", r.seq_id, why)
            r.stalled_epoch = self.node.plan.epoch
            r.stalled_at = now
            r.fed = 0  # the next frames carry its whole history and rebuild the caches

    def _ready_to_step(self) -> bool:
        """False while stalled sequences wait for a new plan; fails them when no recovery comes."""
        stalled = [r for r in self.running if r.stalled_since is not None]
        if not stalled:
            return True
        plan, now = self.node.plan, time.monotonic()
        lost_for_good = not plan.complete and "no peer holds" in plan.missing and "loading" not in plan.missing
        for r in stalled:
            waited = now - (r.stalled_since or now)
            if waited > self.recovery_timeout or (lost_for_good and waited > FAIL_FAST_S):
                why = (f"the ring lost layers and no peer can take them ({plan.missing}); retry when a "
                       f"peer joins") if lost_for_good else f"the ring did not recover within {waited:.0f} s"
                self._fail([r], RingUnavailable(why))
        stalled = [r for r in self.running if r.stalled_since is not None]
        if not stalled:
            return True
        # retry once the plan moved on (or after a pause, if the failure was a passing one)
        return plan.complete and all(r.stalled_epoch != plan.epoch or now - r.stalled_at > 1.0 for r in stalled)

    def _admit(self) -> None:
        """First come, first served, while the batch, the step's prefill budget and the ring's KV
        memory allow; every running sequence then advances one token per step (round robin)."""
        budget = self.max_prefill_tokens
        kv_free = self.kv_budget() - self.kv_in_use()
        while self.waiting and len(self.running) < self.max_batch:
            nxt = self.waiting[0]
            n = len(nxt.gen.prompt)
            if budget < n and budget != self.max_prefill_tokens:
                break  # long prompts join the next step, so decodes keep flowing
            need = n + nxt.gen.max_new
            if need > kv_free and self.running:
                break  # waits until finished sequences give their KV memory back
            budget -= n
            kv_free -= need
            self.running.append(self.waiting.pop(0))

    def _frame(self, batch: list[Request]) -> tuple[pb.Frame, dict[str, int]]:
        """The step's frame and how many tokens of each sequence it feeds: decodes first, then prompts
        and replays in chunks, all under the frame's byte budget and the step's prefill budget."""
        seqs: list[pb.SeqEntry] = []
        tokens: list[int] = []
        fed: dict[str, int] = {}
        room, prefill = self.max_frame_bytes - 1024, self.max_prefill_tokens
        for r in sorted(batch, key=lambda r: len(r.gen.all_tokens) - r.fed > 1):  # decodes first
            g = r.gen
            history = g.all_tokens
            start = r.fed == 0
            head = 64 + (5 * len(history) + 64 if start else 0)  # entry, with the sampler and history
            todo = len(history) - r.fed
            n = todo if todo == 1 else min(todo, prefill, (room - head) // self.token_bytes)
            if n < 1 or room < head + n * self.token_bytes:
                continue  # no room left in this frame: it goes on next step
            e = pb.SeqEntry(seq_id=g.seq_id, offset=r.fed, length=n, more=r.fed + n < len(history))
            if start:  # first chunk, or a replay's: (re)create the caches
                try:
                    e.sampling.CopyFrom(params_to_pb(g.params))
                except Exception as err:  # parameters that cannot go on the wire fail this request alone
                    log.exception("cannot send %s into the ring", g.seq_id)
                    self._fail([r], RequestError(f"cannot send this request into the ring: {err}"))
                    continue
                e.start, e.adapter = True, r.adapter
                e.history.extend(history)
            if todo > 1:
                prefill -= n
            room -= head + n * self.token_bytes
            seqs.append(e)
            tokens.extend(history[r.fed:r.fed + n])
            fed[g.seq_id] = n
        return pb.Frame(frame_id=self.node.new_frame_id(), seqs=seqs, tokens=tokens), fed

    def _dispatch(self, batch: list[Request], result: pb.Result) -> None:
        by_id = {tr.seq_id: tr for tr in result.results}
        done: list[str] = []
        for r in batch:
            if r.cancelled or r.fed < len(r.gen.all_tokens):
                continue  # dropped by its client, or more chunks of its prompt to go
            tr = by_id.get(r.seq_id)
            if tr is None:
                self._stall([r], "its token did not come back")
                continue
            try:
                self._deliver(r, tr)
            except Exception as e:  # one request's bug (e.g. its detokenizer) fails it alone
                log.exception("cannot deliver a token of %s", r.seq_id)
                self._fail([r], RequestError(f"cannot deliver this request's token: {type(e).__name__}: {e}"))
                continue
            if r.gen.finished:
                r.queue.put_nowait(None)
                self.running.remove(r)
                done.append(r.seq_id)
        if done:
            self._release(done)

    def _deliver(self, r: Request, tr: pb.TokenResult) -> None:
        if r.stalled_since is not None:
            took = time.monotonic() - r.stalled_since
            log.warning("sequence %s resumed after %.2f s (replayed %d tokens)", r.seq_id, took,
                        len(r.gen.all_tokens))
            self.metrics.recovery_seconds.observe(took)
            r.stalled_since = None
        if r.first_token_at is None:
            r.first_token_at = time.monotonic()
            self.metrics.first_token_seconds.observe(r.first_token_at - r.created)
        d = r.gen.add(Sample(tr.seq_id, tr.token, tr.logprob, list(zip(tr.top_tokens, tr.top_logprobs))))
        self.metrics.tokens.inc()  # one sampled token of one sequence (a frame carries many)
        if r.gen.params.logprobs >= 0:
            r.deltas.append(d)
        r.queue.put_nowait(d)

    def _fail(self, batch: list[Request], err: Exception) -> None:
        self.metrics.errors.inc(len(batch))
        for r in batch:
            if r in self.running:
                self.running.remove(r)
            r.queue.put_nowait(err)
        self._release([r.seq_id for r in batch])

    def _release(self, seq_ids: list[str]) -> None:
        """Free finished or failed sequences' caches on every stage, without holding up the step."""
        task = asyncio.ensure_future(self.node.release(seq_ids))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
