"""The prefix cache of a stage: the KV of prompt blocks it has computed, kept for later sequences.

Keys are a hash chain over complete blocks of BLOCK token ids, salted with the model label and the
adapter ("LABEL+ADAPTER"), so the API peer and every stage compute the same keys from the same tokens
and a sequence never reuses another adapter's (or the base model's) keys and values. A block's key
names its whole prefix, so equal keys mean equal positions and equal tokens before them.

`PrefixStore` holds the blocks a backend exported (opaque blobs with their true byte size), bounded
by bytes and evicted least recently used; children always go before their parents, so every block
left is reachable from the root. `PrefixCache` is what a `LayerShard` keeps: the store, its salt and
the prompts to keep once their last chunk has run.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from backends.errors import RequestError

# tokens per block: 32 keeps a chat history's reuse fine-grained (a turn's end is lost only to its
# last partial block) while a block's import is still one copy per layer (perf/bench_prefix.py)
BLOCK = 32
MISS = "prefix not cached"  # in a stage's refusal; the API peer retries the sequence from 0
NO_CACHE = "keeps no prefix cache"  # ... from a stage that keeps none at all (off, or it cannot)


class PrefixMiss(RequestError):
    """A sequence asked for a prefix this stage's prefix cache does not hold (any more)."""


def salt_of(label: str, adapter: str = "") -> str:
    """The salt of a model label and an adapter ('' = the base model)."""
    return f"{label}+{adapter}"


def block_hashes(tokens: Sequence[int], salt: str) -> list[bytes]:
    """The keys of the complete blocks of `tokens`: block i's key hashes block i-1's key and its own
    BLOCK token ids (so it names the whole prefix); the chain starts from the salt."""
    n = len(tokens) // BLOCK
    if n == 0:
        return []
    ids = np.asarray(tokens[:n * BLOCK], dtype="<i8").tobytes()
    h = hashlib.blake2b(salt.encode(), digest_size=16).digest()
    out = []
    step = BLOCK * 8
    for i in range(n):
        h = hashlib.blake2b(h + ids[i * step:(i + 1) * step], digest_size=16).digest()
        out.append(h)
    return out


@dataclass
class _Block:
    blob: Any
    nbytes: int
    parent: bytes | None
    children: int = 0


class PrefixStore:
    """Blocks by key, least recently used first, within `budget_bytes`. A chain is touched from its
    deepest block to its root, so a parent is always more recent than its children and eviction
    (the least recent block without children) takes children first."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise RequestError(f"a prefix cache budget must be 0 or more bytes, got {budget_bytes}")
        self.budget = budget_bytes
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0  # blocks imported / asked for but absent / evicted

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def depth(self, keys: Sequence[bytes]) -> int:
        """How many leading blocks of a chain the store holds."""
        n = 0
        while n < len(keys) and keys[n] in self._blocks:
            n += 1
        return n

    def take(self, keys: Sequence[bytes]) -> list[Any]:
        """The blobs of a whole chain (touched), or PrefixMiss naming how much of it is here."""
        have = self.depth(keys)
        if have < len(keys):
            self.misses += len(keys) - have
            raise PrefixMiss(f"{MISS}: this stage holds {have} of its {len(keys)} blocks")
        self.hits += len(keys)
        self._touch(keys)
        return [self._blocks[k].blob for k in keys]

    def put(self, keys: Sequence[bytes], export: Callable[[int], Any], limit: int | None = None) -> int:
        """Store the chain `keys` (block i's blob from `export(i)`, something with `nbytes`), as far as
        the budget (and `limit` bytes) allow without evicting the chain itself; returns the blocks added."""
        chain, cap = set(keys), self.budget if limit is None else min(self.budget, limit)
        added = 0
        for i, k in enumerate(keys):
            if k in self._blocks:
                continue
            blob = export(i)
            size = int(blob.nbytes)
            if not self._make_room(size, chain, cap):
                break  # the rest of the chain would have no parent
            parent = keys[i - 1] if i else None
            self._blocks[k] = _Block(blob, size, parent)
            if parent is not None:
                self._blocks[parent].children += 1
            self.bytes += size
            added += 1
        self._touch(keys[:self.depth(keys)])
        return added

    def shrink(self, budget: int) -> None:
        """Evict until the store holds at most `budget` bytes (live sequences need the memory)."""
        while self.bytes > budget and self._evict_one(set()):
            pass

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        return {"bytes": self.bytes, "blocks": len(self._blocks), "budget": self.budget, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions}

    def _touch(self, keys: Sequence[bytes]) -> None:
        for k in reversed(keys):  # the root last: the most recent
            self._blocks.move_to_end(k)

    def _make_room(self, size: int, keep: set[bytes], cap: int) -> bool:
        if size > cap:
            return False
        while self.bytes + size > cap:
            if not self._evict_one(keep):
                return False
        return True

    def _evict_one(self, keep: set[bytes]) -> bool:
        """Drop the least recently used block that has no children (and is not in `keep`)."""
        for k, b in self._blocks.items():
            if b.children == 0 and k not in keep:
                del self._blocks[k]
                if b.parent is not None and b.parent in self._blocks:
                    self._blocks[b.parent].children -= 1
                self.bytes -= b.nbytes
                self.evictions += 1
                return True
        return False


class PrefixCache:
    """A shard's prefix cache: its store, the label that salts its keys, and the prompts of running
    sequences to keep once their last chunk has run. `room()` (if given) is the memory live
    sequences leave: the store never holds more, so its memory comes out of no sequence's share."""

    def __init__(self, budget_bytes: int, label: str, room: Callable[[], int] | None = None) -> None:
        self.store = PrefixStore(budget_bytes)
        self.label = label
        self.room = room
        self.prompts: dict[str, list[int]] = {}

    def keys(self, tokens: Sequence[int], adapter: str) -> list[bytes]:
        return block_hashes(tokens, salt_of(self.label, adapter))

    def fit(self) -> None:
        """Give memory back to live sequences: evict down to min(budget, room())."""
        if self.room is not None and self.store.bytes:
            self.store.shrink(min(self.store.budget, max(0, self.room())))

    def budget_now(self) -> int:
        return self.store.budget if self.room is None else min(self.store.budget, max(0, self.room()))
