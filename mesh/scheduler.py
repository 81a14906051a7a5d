"""The API peer's scheduler: continuous batching of the running sequences into frames, up to one frame
per stage in the ring at once (micro-batches), long prompts a chunk at a time."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Protocol

import grpc

from backends.constrain import check_grammar
from backends.errors import RequestError
from backends.generation import Delta, Generation
from backends.sampling import SamplingParams
from backends.shard import Sample
from backends.tokenizer import Tokenizer
from backends.weights import Checkpoint
from mesh.auth import MAX_MESSAGE_BYTES
from mesh import trace
from mesh.batching import Flight, Request, group_size, pick
from mesh.drafting import Drafting, landed
from mesh.metrics import PeerMetrics
from mesh.prefixes import PrefixMirror
from mesh.steptimes import FRAME_TIMEOUT_FLOOR_S, StepTimes
from mesh.protocol import FrameError
from protos import together_pb2 as pb

log = logging.getLogger(__name__)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE.value[0], grpc.StatusCode.FAILED_PRECONDITION.value[0],
             grpc.StatusCode.DEADLINE_EXCEEDED.value[0]}
FAIL_FAST_S = 4.0  # how long stalled sequences wait for a reassignment before a plan without capacity fails them
MAX_FRAME_BYTES = MAX_MESSAGE_BYTES // 8  # a frame's share of the gRPC message limit, headers and all
WIRE_VALUE_BYTES = 4  # hidden states travel as float32 at most
PREFILL_CHUNK = 512  # prompt tokens per frame: a long prompt never holds up decodes for longer


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
    async def release(self, seq_ids: list[str], keep: list[pb.KeepSeq] = ...) -> int: ...


class RingUnavailable(Exception):
    """The ring cannot serve right now (incomplete, or a stage failed)."""


class QueueFull(RequestError):
    """Too many requests are waiting."""


class TooLarge(RequestError):
    """A request that can never fit in the ring's KV memory."""


class Scheduler:
    """Admits requests into a queue (with a cap) and steps the running sequences in micro-batches."""

    def __init__(self, node: Ring, tok: Tokenizer, max_batch: int = 32, max_queue: int = 256,
                 max_prefill_tokens: int = 4096, max_kv_tokens: int = 1 << 20,
                 recovery_timeout: float = 30.0, max_frame_bytes: int = MAX_FRAME_BYTES,
                 frame_timeout_floor: float = FRAME_TIMEOUT_FLOOR_S, prefill_chunk: int = PREFILL_CHUNK,
                 micro_batches: int = 0, drafting: Drafting | None = None,
                 prefixes: PrefixMirror | None = None) -> None:
        # micro_batches: frames in the ring at once (0: one per stage of the plan); drafting: speculative
        # decoding's drafts (mesh/drafting.py), None: none
        self.node, self.tok, self.metrics = node, tok, node.metrics
        self.drafting = drafting
        self.prefixes = prefixes  # what the stages' prefix caches hold (mesh/prefixes.py), None: off
        self.token_bytes = node.ck.config.hidden_size * WIRE_VALUE_BYTES + 8  # hidden row + its token id
        if max_frame_bytes < 4 * self.token_bytes + 4096:
            raise ValueError(f"max_frame_bytes {max_frame_bytes} cannot carry a frame of this model")
        if prefill_chunk < 1 or micro_batches < 0:
            raise ValueError("prefill_chunk must be at least 1 and micro_batches at least 0")
        self.max_frame_bytes = max_frame_bytes
        self.prefill_chunk, self.micro_batches = prefill_chunk, micro_batches
        self._flights: dict[int, asyncio.Task[None]] = {}  # frame id -> the task awaiting its Result
        self._launches = 0
        self.max_kv_tokens = max_kv_tokens
        self.max_batch, self.max_queue, self.max_prefill_tokens = max_batch, max_queue, max_prefill_tokens
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[int]] = set()  # held until done: the loop keeps only weak references
        self._outbox: list[tuple[asyncio.Queue[Delta | Exception | None], Delta | Exception | None]] | None = None
        self.recovery_timeout = recovery_timeout
        self.times = StepTimes(node, frame_timeout_floor)  # step times, and the deadlines they give
        # recent windows for the web page's percentiles (the totals live in self.metrics)
        self.step_ms, self.decode_ms = self.times.step_ms, self.times.decode_ms
        self.hop_overhead_ms = self.times.hop_overhead_ms

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        for t in [self._task, *self._flights.values()]:
            if t is not None:
                t.cancel()
                try:
                    await t
                except (asyncio.CancelledError, Exception):
                    pass
        for rt in list(self._releases):
            rt.cancel()
        for r in self.waiting + self.running:
            r.queue.put_nowait(RingUnavailable("the peer is shutting down"))
        if self.drafting is not None:
            await self.drafting.close()

    @property
    def stats(self) -> dict[str, int]:
        """The scheduler's totals, read from the peer's metrics (counted there, once)."""
        m = self.metrics
        return {"requests": m.count(m.requests), "tokens": m.count(m.tokens), "steps": m.count(m.steps),
                "errors": m.count(m.errors)}

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def _group(self) -> int:
        """Sequences per frame: the running ones spread over the slots."""
        return group_size(sum(1 for r in self.running if not r.cancelled), self.slots())

    def slots(self) -> int:
        """How many frames may be in the ring at once: one per stage, so each has one to compute."""
        return self.micro_batches or max(1, len(self.node.plan.stages))

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

    def submit(self, prompt: list[int], params: SamplingParams, adapter: str = "", draft: bool = True) -> Request:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
        if params.grammar:  # a grammar that cannot compile is the client's 400, never a stage's failure
            check_grammar(params.grammar, self.tok)
        seq_id = f"{self.node.node_id[:8]}-{uuid.uuid4().hex[:12]}"
        gen = Generation(seq_id, prompt, params, self.tok, self.node.ck.config.max_position_embeddings)
        need, budget = len(prompt) + gen.max_new, self.kv_budget()
        if need > budget:
            raise TooLarge(f"this request needs room for {need} tokens of KV cache but the ring holds "
                           f"at most {budget}; lower max_tokens or shorten the prompt")
        req = Request(gen, adapter=adapter, draft=draft)
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
        elif req in self.running:
            self.running.remove(req)
            self._retire([req])

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                if self.drafting is not None:  # a draft model drafts off the loop before the frames go
                    await self.drafting.prepare(self.running, self._group())
            except Exception as e:
                self._step_failed(e)
                await asyncio.sleep(0.05)
                continue
            if not self._try_fill():
                await asyncio.sleep(0.05)
            if not self.waiting and not self.running and not self._flights:
                await self._wake.wait()
            elif self._flights and len(self._flights) >= self.slots():
                await self._wake.wait()  # a frame coming back wakes the loop
            else:  # waiting on a plan, or sequences that could not go this time: look again shortly
                try:
                    await asyncio.wait_for(self._wake.wait(), 0.05)
                except asyncio.TimeoutError:
                    pass

    def _step_failed(self, e: Exception) -> None:
        """The loop outlives any bug: only the requests of that frame fail."""
        log.exception("a scheduler step failed")
        self._fail([r for r in self.running if r.ready],
                   RequestError(f"this request's step failed: {type(e).__name__}: {e}"))

    def _try_fill(self) -> bool:
        try:
            self._fill()
            return True
        except Exception as e:
            self._step_failed(e)
            return False

    def _fill(self) -> None:
        """Send frames until every slot of the ring is taken or no sequence is ready to go."""
        if not self._ready_to_step():
            return
        self._admit()
        while len(self._flights) < self.slots():
            drafts = self.drafting.drafts(self.running, self._group()) if self.drafting is not None else {}
            if self.prefixes is not None:  # how much of each (re)start the stages hold already
                self.prefixes.starting(self.running)
            seqs, tokens, fed, bad = pick(self.running, self._group(),
                                          self.max_frame_bytes - 1024, self.prefill_chunk, self.token_bytes,
                                          drafts)
            for r, err in bad:
                self._fail([r], err)
            if not fed:
                return
            frame = pb.Frame(frame_id=self.node.new_frame_id(), seqs=seqs, tokens=tokens)
            for r, n in fed:
                r.sent += n
                r.inflight += 1
                r.trim = False  # the stages drop its rejected drafts before they run this frame
            self._launches += 1
            computed = sum(n - e.prefix for (_, n), e in zip(fed, seqs))  # not the prefixes the stages hold
            fl = Flight(frame, [(r, r.incarnation, n) for r, n in fed], computed,
                        alone=not self._flights, launch_no=self._launches,
                        drafts={e.seq_id: list(e.draft_ids) for e in seqs if e.drafts})
            if trace.ON:
                trace.mark("launch", frame.frame_id)
            self._flights[frame.frame_id] = asyncio.ensure_future(self._fly(fl))

    async def _fly(self, fl: Flight) -> None:
        """One frame around the ring, then its tokens to their requests (failures to theirs alone)."""
        try:
            result = await self.node.run_frame(fl.frame, timeout=self.times.deadline(fl.positions))
        except FrameError as e:
            result = pb.Result(error=str(e), error_code=e.code.value[0])
        except Exception as e:  # the loop outlives any bug: only this frame's requests fail
            log.exception("a frame failed on its way round the ring")
            result = pb.Result(error=f"this request's step failed: {type(e).__name__}: {e}",
                               error_code=grpc.StatusCode.INTERNAL.value[0])
        finally:
            self._flights.pop(fl.frame.frame_id, None)
            for r, _, _ in fl.entries:
                r.inflight -= 1
            self._wake.set()
        if trace.ON:
            trace.mark("back", fl.frame.frame_id)
        live = [(r, n) for r, inc, n in fl.entries if inc == r.incarnation and not r.ended]
        self._outbox = []  # this frame's tokens reach their streams once the next frame is on its way
        try:
            self._land(fl, result, live)
        except Exception as e:
            log.exception("a scheduler step failed")
            self._fail([r for r, _ in live if r in self.running],
                       RequestError(f"this request's step failed: {type(e).__name__}: {e}"))
        finally:
            self._retire([r for r, _, _ in fl.entries])
            # the next frame goes now, before the streams' handlers run: its compute overlaps their work
            # (a draft model drafts on the loop's own turn first)
            if self.drafting is None or self.drafting.model is None:
                self._try_fill()
            out, self._outbox = self._outbox, None
            for q, item in out:
                q.put_nowait(item)

    def _post(self, r: Request, item: Delta | Exception | None) -> None:
        """A token (or the end) for `r`'s stream: now, or after the next frame left (`_fly`)."""
        if self._outbox is None:
            r.queue.put_nowait(item)
        else:
            self._outbox.append((r.queue, item))

    def _land(self, fl: Flight, result: pb.Result, live: list[tuple[Request, int]]) -> None:
        wall = time.perf_counter() - fl.t0
        failed = set(result.failed_seqs) or ({r.seq_id for r, _ in live} if result.error else set())
        hit = [r for r, _ in live if r.seq_id in failed and not r.cancelled]
        if hit and self.prefixes is not None:  # a stage lacked a prefix: those start again at once, whole
            hit = self.prefixes.refused(hit, result.error)
        if hit and result.error_code in RETRYABLE:
            self._stall(hit, result.error)
        elif hit:
            self._fail(hit, RequestError(result.error))
        ok = [r for r, n in live if r.seq_id not in failed]
        for r, n in live:
            if r.seq_id not in failed:
                r.fed += n
        if ok:
            clean = fl.alone and fl.launch_no == self._launches  # no other frame shared the ring with it
            self.times.record(result, wall * 1000, fl.tokens, clean)
            if clean and self.drafting is not None:
                self.drafting.timed(fl, wall)
            self._dispatch(ok, result, fl.drafts)

    def _stall(self, reqs: list[Request], why: str) -> None:
        """A stage failed or the ring changed: keep the sequences and replay them on the new path."""
        now = time.monotonic()
        for r in reqs:
            if r.stalled_since is None:
                r.stalled_since = now
                log.warning("sequence %s stalled (%s); it resumes when the ring is whole again", r.seq_id, why)
            r.stalled_epoch = self.node.plan.epoch
            r.stalled_at = now
            r.fed = r.sent = 0  # the next frames carry its whole history and rebuild the caches
            r.incarnation += 1  # frames of it still in the ring come back stale
            r.trim = False  # a replay creates its caches anew
            if self.drafting is not None:
                self.drafting.reset(r)

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

    def _dispatch(self, batch: list[Request], result: pb.Result, drafts: dict[str, list[int]]) -> None:
        by_id: dict[str, list[pb.TokenResult]] = {}
        for tr in result.results:  # a sequence with drafts has several, in order
            by_id.setdefault(tr.seq_id, []).append(tr)
        done: list[Request] = []
        for r in batch:
            if r.cancelled or r.fed < len(r.gen.all_tokens):
                continue  # dropped by its client, or more chunks of its prompt to go
            trs, drafted = by_id.get(r.seq_id, []), drafts.get(r.seq_id, [])
            accepted = landed(self.drafting, r, drafted, [tr.token for tr in trs])
            if accepted is None:
                self._stall([r], "its token did not come back" if not trs else
                            f"the ring answered {len(trs)} tokens for {len(drafted)} drafts")
                continue
            if self.prefixes is not None:
                self.prefixes.answered(r)
            try:
                for n, tr in enumerate(trs, 1):  # the accepted drafts, then the last stage's own token
                    self._deliver(r, tr)
                    if r.gen.finished:
                        break  # a stop string, EOS or max_tokens among them: the rest is dropped
            except Exception as e:  # one request's bug (e.g. its detokenizer) fails it alone
                log.exception("cannot deliver a token of %s", r.seq_id)
                self._fail([r], RequestError(f"cannot deliver this request's token: {type(e).__name__}: {e}"))
                continue
            # the accepted drafts it kept are in every stage's cache; rejected ones go on its next trip
            r.fed, r.sent = r.fed + min(n, accepted), r.sent + min(n, accepted)
            r.trim = accepted < len(drafted)
            if r.gen.finished:
                self._post(r, None)
                self.running.remove(r)
                r.ended = True
                done.append(r)
        self._retire(done)

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
        self._post(r, d)

    def _fail(self, batch: list[Request], err: Exception) -> None:
        self.metrics.errors.inc(len(batch))
        for r in batch:
            if r in self.running:
                self.running.remove(r)
            r.ended = True
            self._post(r, err)
        self._retire(batch)

    def _retire(self, reqs: list[Request]) -> None:
        """Free the caches of sequences that ended or were cancelled, once no frame carries them (a
        release could overtake a frame in flight, or one that creates them again)."""
        gone = [r for r in reqs if (r.ended or r.cancelled) and not r.inflight and not r.released]
        for r in gone:
            r.released = True
            if r in self.running:
                self.running.remove(r)
        if gone and self.drafting is not None:
            self.drafting.release([r.seq_id for r in gone])
        if gone:
            self._release([r.seq_id for r in gone], self.prefixes.keep(gone) if self.prefixes else [])

    def _release(self, seq_ids: list[str], keep: list[pb.KeepSeq]) -> None:
        """Free finished or failed sequences' caches on every stage, without holding up the step (the
        stages keep the complete blocks of `keep`'s tokens first)."""
        task = asyncio.ensure_future(self.node.release(seq_ids, keep) if keep else self.node.release(seq_ids))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
