"""The API peer's side of speculative decoding: what each running sequence drafts before its next trip
around the ring, and what the ring accepted of it.

A drafted decode is one entry `[last token, d1..dk]` (`SeqEntry.drafts` = k); the last stage answers
with the accepted drafts and one token of its own, and every stage before it drops the rejected
positions on the sequence's next trip (`SeqEntry.trim`). Drafts come from prompt lookup (microseconds:
drafted inline as a frame is built) or from a draft model on this peer (batched over the sequences about
to step, on a worker thread, never on the event loop)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from backends.errors import TogetherError
from backends.config import ModelConfig
from backends.speculation import AdaptiveK, Drafter, DraftModel, PromptLookup, max_drafts
from mesh.batching import Flight, Request
from mesh.metrics import PeerMetrics

if TYPE_CHECKING:
    from backends.tokenizer import Tokenizer
    from mesh.node import Node

log = logging.getLogger(__name__)
Runner = Callable[[Callable[[], Any]], Awaitable[Any]]  # runs a function off the event loop
COST_GUESS = 0.1  # a drafted token's share of a trip until one stream's trips are timed
TRIPS = 32  # recent trips of one stream alone in the ring that price a drafted position


async def start_drafting(node: Node, tok: Tokenizer) -> Drafting:
    """The drafts of an API peer as its `--draft` and `--draft-tokens` say: a draft model loads here, on
    this peer's backend, dtype and device, off the event loop (a tokenizer unlike the served model's is
    refused: a one-line error at start); it drafts on the compute thread."""
    from backends.speculation import make_drafter

    cfg = node.cfg
    spec = cfg.draft if cfg.draft_tokens > 0 else "off"
    load = lambda: make_drafter(spec, node.ck, tok, backend=cfg.backend, dtype=node.dtype,  # noqa: E731
                                device=node.device, threads=cfg.threads)
    try:  # a model loads on a thread of its own: the compute thread may be loading this peer's layers
        drafter = load() if spec.lower() in ("off", "lookup") else await asyncio.to_thread(load)
    except TogetherError as e:
        raise TogetherError(f"--draft {spec}: {e}; or use --draft lookup (no model) or --draft off") from None
    if isinstance(drafter, DraftModel):
        log.info("drafting with %s (up to %d tokens a trip)", spec, cfg.draft_tokens)
    return Drafting(drafter, node.metrics, cfg.draft_tokens, spec=spec, run=node.stage.call,
                    config=node.ck.config)


def decoding(r: Request) -> bool:
    """Whether the next frame may carry `r` as a decode (its one new token), the only entry that drafts."""
    return r.draft and r.ready and r.sent > 0 and r.todo == 1


class Drafting:
    """Every running sequence's drafts: how many to draft next (`AdaptiveK`, per sequence, following what
    the ring accepts), the drafts made for its committed tokens, and the acceptance counts."""

    def __init__(self, drafter: Drafter | None, metrics: PeerMetrics, k_max: int, spec: str = "",
                 run: Runner | None = None, config: ModelConfig | None = None) -> None:
        # spec: what drafts, as --draft names it; run: the compute thread of this peer (a draft model's);
        # config: the served model's (a sliding window caps the drafts an MLX stage can take back)
        self.metrics, self.k_max, self.config = metrics, k_max, config
        # prompt lookup drafts inline (microseconds); a drafter that computes, in batches off the loop
        self.lookup = drafter if isinstance(drafter, PromptLookup) else None
        self.model = drafter if self.lookup is None else None
        self.spec = spec or ("off" if drafter is None else "model" if self.model is not None else "lookup")
        self._run: Runner = run or asyncio.to_thread
        self._k: dict[str, AdaptiveK] = {}
        # seq id -> (committed tokens they follow, drafts): made once per step, used if still current
        self._made: dict[str, tuple[int, list[int]]] = {}
        self._frees: set[asyncio.Task[Any]] = set()
        # one stream's trips alone in the ring, (positions, seconds), and a draft model's seconds per draft
        self._trips: deque[tuple[int, float]] = deque(maxlen=TRIPS)
        self._draft_s = 0.0
        metrics.gauge("spec_acceptance_rate", "Drafted tokens the ring accepted, over those drafted.",
                      self.acceptance)

    @property
    def on(self) -> bool:
        return (self.model is not None or self.lookup is not None) and self.k_max > 0

    @property
    def cost(self) -> float:
        """What one more drafted token costs, as a share of a one-token trip around the ring: the time its
        position adds to a trip (small on slow links, larger where verifying is compute-bound) plus a
        draft model's time to draft it. From a line fitted to one stream's recent trips (seconds against
        positions); a guess until trips of two lengths are timed."""
        if len({p for p, _ in self._trips}) < 2:
            return COST_GUESS
        n = len(self._trips)
        mp, mt = sum(p for p, _ in self._trips) / n, sum(t for _, t in self._trips) / n
        slope = sum((p - mp) * (t - mt) for p, t in self._trips) / sum((p - mp) ** 2 for p, _ in self._trips)
        slope = max(0.0, slope)
        trip = mt - slope * (mp - 1)  # a one-token trip on that line
        if trip <= 0:
            return COST_GUESS
        return min(1.0, max(0.005, (slope + self._draft_s) / trip))

    def timed(self, fl: Flight, wall: float) -> None:
        """A frame alone in the ring came back after `wall` seconds: a one-sequence decode (drafted or
        not) is a point of the trip's time against its positions."""
        if len(fl.entries) == 1 and fl.tokens == 1:
            self._trips.append((fl.positions, wall))

    def acceptance(self) -> float:
        m = self.metrics
        drafted = m.count(m.spec_drafted)
        return m.count(m.spec_accepted) / drafted if drafted else 0.0

    def _due(self, running: list[Request], group: int) -> list[tuple[Request, int]]:
        """The sequences about to decode that have no drafts for their committed tokens yet, each with
        how many to draft: its adaptive k (asked once per step), never past its max_tokens (the trip's
        own token comes on top of the drafts). k = 0 records that this step goes undrafted. A drafted
        position slows every sequence of its frame (`group` of them), so it costs that many times more."""
        out = []
        for r in running:
            made = self._made.get(r.seq_id)
            if not decoding(r) or made is not None and made[0] == len(r.gen.all_tokens):
                continue
            ak = self._k.get(r.seq_id)
            if ak is None:
                ak = self._k[r.seq_id] = AdaptiveK(k_max=self.k_max)
            ak.cost = min(1.0, self.cost * max(1, group))
            k = max(0, min(ak.k(), r.gen.max_new - len(r.gen.tokens) - 1))
            cap = max_drafts(self.config, len(r.gen.all_tokens) - 1) if self.config is not None else None
            k = k if cap is None else min(k, cap)  # past it a rotating cache could not drop rejected drafts
            if k == 0:
                self._made[r.seq_id] = (len(r.gen.all_tokens), [])
            else:
                out.append((r, k))
        return out

    async def prepare(self, running: list[Request], group: int = 1) -> None:
        """A draft model drafts for every sequence about to decode, in one batch off the event loop."""
        model = self.model
        if model is None or self.k_max < 1:
            return
        wants = {r.seq_id: (list(r.gen.all_tokens), k) for r, k in self._due(running, group)}
        if not wants:
            return
        t0 = time.perf_counter()
        try:
            got = await self._run(lambda: model.propose_many(wants))
        except Exception:  # drafting is an optimisation: these sequences decode plainly this time
            log.exception("the draft model failed; %d sequence(s) decode without drafts", len(wants))
            got = {}
        # a draft model drafts the batch's longest k one after another: that is each draft's price
        per = (time.perf_counter() - t0) / max(k for _, k in wants.values())
        self._draft_s = per if not self._draft_s else 0.8 * self._draft_s + 0.2 * per
        for s, (tokens, k) in wants.items():
            self._made[s] = (len(tokens), list(got.get(s, []))[:k])

    def drafts(self, running: list[Request], group: int = 1) -> dict[str, list[int]]:
        """seq id -> the drafts of its next decode, for the sequences that have any (prompt lookup drafts
        here, in microseconds; a draft model's drafts were made by `prepare`)."""
        if self.lookup is not None and self.k_max > 0:
            for r, k in self._due(running, group):
                self._made[r.seq_id] = (len(r.gen.all_tokens), list(self.lookup.propose(r.gen.all_tokens, k))[:k])
        out = {}
        for r in running:
            made = self._made.get(r.seq_id)
            if made and made[1] and made[0] == len(r.gen.all_tokens) and decoding(r):
                out[r.seq_id] = made[1]
        return out

    def landed(self, r: Request, drafted: list[int], accepted: int) -> None:
        """The ring accepted `accepted` of the tokens drafted for `r`'s trip: count them; k follows."""
        if drafted:
            self.metrics.spec_drafted.inc(len(drafted))
            self.metrics.spec_accepted.inc(accepted)
            ak = self._k.get(r.seq_id)
            if ak is not None:
                ak.update(len(drafted), accepted)

    def reset(self, r: Request) -> None:
        """The sequence stalled and will be replayed: drafts made for it are void."""
        self._made.pop(r.seq_id, None)

    def release(self, seq_ids: list[str]) -> None:
        """The sequences ended: forget them (a draft model frees its caches off the loop)."""
        for s in seq_ids:
            self._k.pop(s, None)
            self._made.pop(s, None)
        model = self.model
        if model is not None and seq_ids:
            def free() -> None:
                for s in seq_ids:
                    model.free(s)

            task = asyncio.ensure_future(self._run(free))
            self._frees.add(task)
            task.add_done_callback(self._frees.discard)

    async def close(self) -> None:
        """Free the draft model (on its thread, after any drafting under way)."""
        model, self.model, self.lookup = self.model, None, None
        if model is not None:
            await self._run(model.close)

    def view(self) -> dict[str, Any]:
        """This API peer's speculation for /v1/mesh: what drafts, up to how many, and the acceptance."""
        m = self.metrics
        return {"draft": self.spec, "k_max": self.k_max, "drafted_tokens": m.count(m.spec_drafted),
                "accepted_tokens": m.count(m.spec_accepted), "acceptance": round(self.acceptance(), 4)}


def landed(drafting: Drafting | None, r: Request, drafted: list[int], tokens: list[int]) -> int | None:
    """The ring answered `tokens` for `r`'s trip that carried `drafted`: how many drafts it accepted,
    or None when the answer cannot be one for that trip (no token, too many, or accepted tokens that
    are not the drafts: the sequence is then replayed)."""
    a = len(tokens) - 1
    if not 0 <= a <= len(drafted) or tokens[:a] != drafted[:a]:
        return None
    if drafting is not None:
        drafting.landed(r, drafted, a)
    return a
