"""The API peer's side of the prefix cache: what it told the ring's stages to keep (the same block keys
they compute, backends/prefix.py), so that a (re)start sends only the tokens past the longest prefix
the stages hold (`SeqEntry.prefix`), and what a stage's "prefix not cached" refusal means: that
sequence starts again from 0 at once (no stall), and the blocks the stage lacks are forgotten.

The mirror is a belief, not a lock: a stage may have evicted blocks since (memory, LRU) or be a new
peer after a loss; the refusal corrects it, so the answer is always the one a cold run gives."""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Sequence

from backends.prefix import BLOCK, MISS, NO_CACHE, block_hashes, salt_of
from protos import together_pb2 as pb

if TYPE_CHECKING:
    from mesh.batching import Request

log = logging.getLogger(__name__)
MAX_KEYS = 1 << 18  # keys remembered (16 bytes each), least recently used forgotten first
NO_CACHE_PAUSE_S = 60.0  # a stage keeps no prefix cache (off there, or a TP stage): offer none this long
_HOLDS = re.compile(r"holds (\d+) of its (\d+) blocks")


class PrefixMirror:
    """Which block keys the ring's stages were told to keep, per model label and adapter."""

    def __init__(self, label: str, max_keys: int = MAX_KEYS) -> None:
        self.label, self.max_keys = label, max_keys
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self.cached_tokens = 0  # prompt tokens the stages did not compute again (from their stores)
        self.retries = 0  # starts refused with "prefix not cached" and sent again from 0
        self.paused_until = 0.0  # a stage of the ring keeps no prefix cache: no prefixes until then

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self, tokens: Sequence[int], adapter: str) -> list[bytes]:
        return block_hashes(tokens, salt_of(self.label, adapter))

    def choose(self, tokens: Sequence[int], adapter: str) -> int:
        """The prefix a start of `tokens` takes from the stages: the longest run of known leading
        blocks, leaving at least one token to compute (the last stage draws from the last one)."""
        if time.monotonic() < self.paused_until:
            return 0
        keys = self.keys(tokens[:max(0, len(tokens) - 1)], adapter)
        n = 0
        while n < len(keys) and keys[n] in self._keys:
            n += 1
        for k in reversed(keys[:n]):
            self._keys.move_to_end(k)
        return n * BLOCK

    def learn(self, tokens: Sequence[int], adapter: str) -> None:
        """The stages keep the complete blocks of `tokens` (their caches hold every one of them)."""
        for k in reversed(self.keys(tokens, adapter)):
            self._keys[k] = None
            self._keys.move_to_end(k)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)

    def forget(self, tokens: Sequence[int], adapter: str, held: int = 0) -> None:
        """A stage lacks the blocks of `tokens` from block `held` on: they are no prefix to offer."""
        for k in self.keys(tokens, adapter)[held:]:
            self._keys.pop(k, None)

    def stats(self) -> dict[str, int]:
        return {"keys": len(self._keys), "cached_tokens": self.cached_tokens, "retries": self.retries}

    # ---- the scheduler's hooks

    def starting(self, running: list[Request]) -> None:
        """Choose the prefix of every sequence whose next frame (re)starts it."""
        for r in running:
            if r.sent == 0 and r.inflight == 0 and not r.cancelled and not r.ended:
                r.prefix = 0 if r.cold else self.choose(r.gen.all_tokens, r.adapter)
                r.learn = True

    def refused(self, hit: list[Request], error: str) -> list[Request]:
        """Of the sequences a frame failed, those a stage refused for a prefix it lacks: restarted at
        once from 0 (their caches are rebuilt like a replay's, with no stall); the others returned."""
        if MISS not in error:
            return hit
        m = _HOLDS.search(error)
        held = int(m.group(1)) if m else 0
        if NO_CACHE in error:  # asking again soon would only cost another retry
            self.paused_until = time.monotonic() + NO_CACHE_PAUSE_S
        rest = []
        for r in hit:
            if r.prefix and r.fed == 0:
                self.forget(r.gen.all_tokens[:r.prefix], r.adapter, held)
                self.retries += 1
                log.info("sequence %s: a stage lacks its %d-token prefix (%s); sending it whole",
                         r.seq_id, r.prefix, error)
                r.sent, r.prefix, r.cold = 0, 0, True
                r.incarnation += 1  # anything of its failed start still in the ring comes back stale
            else:
                rest.append(r)
        return rest

    def answered(self, r: Request) -> None:
        """A sequence's (re)start came back with a token: the stages kept its blocks."""
        if r.learn:
            r.learn = r.cold = False  # a later replay may try a prefix again
            self.learn(r.gen.all_tokens, r.adapter)
            if r.first_token_at is None:  # the answer's own prefill, not a replay's
                r.cached = r.prefix
                self.cached_tokens += r.prefix

    def keep(self, reqs: list[Request]) -> list[pb.KeepSeq]:
        """What the stages keep of these sequences as they free them: the complete blocks of those
        finished or cancelled with whole caches (not failed, not stalled)."""
        out = []
        for r in reqs:
            if (r.gen.finished or r.cancelled) and r.stalled_since is None and r.fed >= BLOCK:
                toks = r.gen.all_tokens
                self.learn(toks[:min(r.fed, len(toks) - 1)], r.adapter)
                # the stages keep positions below len(tokens) - 1: exactly the `fed` ones every stage holds
                # as committed (past them a stage may hold rejected drafts)
                out.append(pb.KeepSeq(seq_id=r.seq_id, tokens=toks[:r.fed + 1]))
        return out
