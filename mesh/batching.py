"""What the scheduler puts in a frame: its requests, how they split into micro-batches (one frame per
group in the ring at once), and the chunks of long prompts. Pure: no I/O, no event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from backends.errors import RequestError
from backends.generation import Delta, Generation
from mesh.protocol import params_to_pb
from protos import together_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class Request:
    gen: Generation
    queue: asyncio.Queue[Delta | Exception | None] = field(default_factory=asyncio.Queue)  # None: the end
    fed: int = 0  # tokens of its history the ring's caches hold (0: the next frame (re)starts it)
    sent: int = 0  # tokens of its history sent into the ring (fed, plus chunks still in flight)
    inflight: int = 0  # frames in the ring that carry it
    incarnation: int = 0  # bumped by a stall: results of frames sent before it are stale
    cancelled: bool = False
    ended: bool = False  # finished or failed: its caches go once no frame carries it
    released: bool = False
    adapter: str = ""
    draft: bool = True  # its decodes may carry drafts (speculative decoding), if this peer drafts
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    stalled_since: float | None = None  # when a failure paused it (for replay and its deadline)
    stalled_at: float = 0.0
    stalled_epoch: int = -1
    trim: bool = False  # its last trip had rejected drafts: stages before the last hold positions past `fed`
    deltas: list[Delta] = field(default_factory=list)  # kept for logprobs of non-streamed answers
    # the prefix cache (mesh/prefixes.py): tokens its next (re)start takes from the stages' stores; its
    # start's blocks are still to be learnt; it must start cold (a stage lacked its prefix); the prompt
    # tokens its answer got from the stores (usage's cached_tokens)
    prefix: int = 0
    learn: bool = False
    cold: bool = False
    cached: int = 0

    @property
    def seq_id(self) -> str:
        return self.gen.seq_id

    @property
    def todo(self) -> int:
        """Tokens of its history not yet sent into the ring."""
        return len(self.gen.all_tokens) - self.sent

    @property
    def ready(self) -> bool:
        """Whether the next frame may carry it: something left to send, and a (re)start only once no
        older frame carries it. Later chunks of one prompt may follow each other into the ring, since
        every link delivers in order and every stage runs frames in order."""
        if self.cancelled or self.ended or self.todo < 1:
            return False
        return self.sent > 0 or self.inflight == 0


@dataclass
class Flight:
    """A frame in the ring and what it feeds: (request, its incarnation when sent, tokens)."""
    frame: pb.Frame
    entries: list[tuple[Request, int, int]]
    tokens: int
    alone: bool  # no other frame was in the ring when it left (its wall time is a clean step time)
    launch_no: int
    t0: float = field(default_factory=time.perf_counter)
    drafts: dict[str, list[int]] = field(default_factory=dict)  # seq id -> the drafts it carries

    @property
    def fed(self) -> dict[str, int]:
        return {r.seq_id: n for r, _, n in self.entries}

    @property
    def positions(self) -> int:
        """Positions every stage computes: its tokens plus their drafts."""
        return self.tokens + sum(len(d) for d in self.drafts.values())


def group_size(live: int, micro_batches: int) -> int:
    """Sequences per frame so that `live` sequences fill `micro_batches` frames evenly."""
    return max(1, -(-live // max(1, micro_batches)))


def pick(running: list[Request], group: int, room: int, prefill: int, token_bytes: int,
         drafts: dict[str, list[int]] | None = None
         ) -> tuple[list[pb.SeqEntry], list[int], list[tuple[Request, int]], list[tuple[Request, Exception]]]:
    """The next frame's entries and tokens, and (request, tokens fed) for each: decodes first (oldest
    first), then prompts and replays a chunk at a time, at most `group` sequences, under `room` bytes
    and `prefill` prompt tokens. A decode with `drafts` (seq id -> proposed tokens) carries its last
    token and as many of them as fit (`SeqEntry.drafts`). Requests whose parameters cannot go on the
    wire come back apart."""
    seqs: list[pb.SeqEntry] = []
    tokens: list[int] = []
    fed: list[tuple[Request, int]] = []
    bad: list[tuple[Request, Exception]] = []
    for r in sorted((r for r in running if r.ready), key=lambda r: r.todo > 1):
        if len(fed) >= group:
            break
        history = r.gen.all_tokens
        start = r.sent == 0
        skip = r.prefix if start else 0  # tokens the stages take from their prefix caches
        at, todo = r.sent + skip, r.todo - skip
        head = 64 + (5 * len(history) + 64 if start else 0)  # entry, with the sampler and history
        n = 1 if todo == 1 else min(todo, prefill, (room - head) // token_bytes)
        if n < 1 or room < head + n * token_bytes:
            continue  # no room left in this frame: it goes in a later one
        e = pb.SeqEntry(seq_id=r.seq_id, offset=at, length=n, more=at + n < len(history), prefix=skip)
        if start:  # first chunk, or a replay's: (re)create the caches
            try:
                e.sampling.CopyFrom(params_to_pb(r.gen.params))
            except Exception as err:  # parameters that cannot go on the wire fail this request alone
                log.exception("cannot send %s into the ring", r.seq_id)
                bad.append((r, RequestError(f"cannot send this request into the ring: {err}")))
                continue
            e.start, e.adapter = True, r.adapter
            e.history.extend(history)
            e.generated = len(history) - len(r.gen.prompt)  # a replay's output: its grammar consumes it
        elif r.trim:  # rejected drafts of its last trip still sit in the caches before the last stage
            e.trim = True
        d = (drafts or {}).get(r.seq_id, []) if n == 1 and not (start or e.more) else []
        d = d[:max(0, (room - head) // token_bytes - 1)]
        if n > 1:
            prefill -= n
        room -= head + (n + len(d)) * token_bytes
        e.length, e.drafts = n + len(d), len(d)
        e.draft_ids.extend(d)
        seqs.append(e)
        tokens.extend(history[at:at + n] + d)
        fed.append((r, skip + n))
    return seqs, tokens, fed, bad
