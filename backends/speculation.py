"""Drafts for speculative decoding: who proposes the next tokens that the last slice then verifies.

A drafter proposes up to k tokens per sequence from its committed tokens (prompt + generated); the
model then runs `[last token, d1..dk]` as one chunk and the last slice keeps the drafts that equal
what it draws itself (`LayerShard.forward`), so drafts change speed, never the answer. Drafts are
always deterministic (prompt lookup; a draft model drafting greedily), which is what makes "accept
while equal to the draw" the standard rejection rule.

- `PromptLookup`: n-grams of the sequence itself (no model; strong on edits, summaries, code, RAG).
- `DraftModel`: a small whole model with the same tokenizer, on this process's backend.
- `AdaptiveK`: how many to draft next, from the measured acceptance (0 where drafting does not pay).
- `make_drafter`: `off | lookup | MODEL` as `--draft` takes it.

Every drafter has `propose_many({seq_id: (tokens, k)}) -> {seq_id: drafts}`, `free(seq_id)` and
`close()`; a draft model computes in the caller's thread (the mesh calls it off the event loop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from backends.config import ModelConfig
from backends.errors import ModelError, RequestError
from backends.shard import LayerShard, SeqChunk, load_shard
from backends.tokenizer import Tokenizer
from backends.weights import Checkpoint, open_checkpoint

DRAFT_CHOICES = "off, lookup, or a draft model (a name or path as --model takes, same tokenizer)"


class Drafter(Protocol):
    """What the pipeline and the mesh ask of a draft source."""

    def propose_many(self, wants: dict[str, tuple[list[int], int]]) -> dict[str, list[int]]: ...

    def free(self, seq_id: str) -> None: ...

    def close(self) -> None: ...


class PromptLookup:
    """Prompt lookup decoding: the tokens that followed the latest earlier occurrence of the
    sequence's longest suffix n-gram (max_ngram down to min_ngram tokens)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise RequestError(f"prompt lookup n-grams: need 1 <= min ({min_ngram}) <= max ({max_ngram})")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the suffix's latest earlier occurrence; [] if none."""
        if k <= 0 or len(tokens) < 2:
            return []
        arr = np.asarray(tokens, dtype=np.int64)
        n_max = min(self.max_ngram, len(arr) - 1)
        for n in range(n_max, self.min_ngram - 1, -1):
            # windows starting at 0 .. len - n - 1: an occurrence before the suffix itself
            windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
            hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
            if hits.size:
                at = int(hits[-1]) + n
                return arr[at:at + k].tolist()
        return []

    def propose_many(self, wants: dict[str, tuple[list[int], int]]) -> dict[str, list[int]]:
        return {s: self.propose(toks, k) for s, (toks, k) in wants.items()}

    def free(self, seq_id: str) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class _Fed:
    tokens: list[int] = field(default_factory=list)  # what the draft model's cache holds, in order


class DraftModel:
    """A whole model (one LayerShard) that drafts greedily for the served model. It keeps a cache
    per sequence, brought to each call's committed tokens by trimming what differs (rejected
    drafts) and feeding what is new; several sequences draft in one batch per step."""

    def __init__(self, shard: LayerShard, name: str = "draft", vocab: int | None = None):
        if not (shard.is_first and shard.is_last):
            raise RequestError("a draft model must be one whole model (layers 0 to the end)")
        self.shard, self.name = shard, name
        self.fed: dict[str, _Fed] = {}
        self.context = shard.config.max_position_embeddings
        self.vocab = vocab or shard.config.vocab_size  # the served model's: drafts past it are cut

    @classmethod
    def load(cls, spec: str, target: Checkpoint, target_tok: Tokenizer | None = None,
             backend: str = "torch", dtype: str = "auto", device: str | None = None,
             threads: int | None = None) -> "DraftModel":
        """Load the draft model `spec` (a name, path or hub id, as --model takes) for `target`,
        refusing one whose tokenizer differs from the target's."""
        from backends.models import resolve_model

        ck = open_checkpoint(resolve_model(spec, quiet=True))
        check_same_tokenizer(ck, target, target_tok, spec)
        return cls(load_shard(backend, ck, 0, ck.config.num_hidden_layers, dtype=dtype, device=device,
                              threads=threads), name=spec, vocab=target.config.vocab_size)

    def propose_many(self, wants: dict[str, tuple[list[int], int]]) -> dict[str, list[int]]:
        """Up to k greedy drafts per sequence ({seq_id: (committed tokens, k)})."""
        out: dict[str, list[int]] = {s: [] for s in wants}
        live = {s: (toks, k) for s, (toks, k) in wants.items()
                if k > 0 and toks and len(toks) + k <= self.context}
        if not live:
            return out
        try:
            self._draft(live, out)
        except Exception:  # its caches may be out of step with `fed` now: start those over next time
            for sid in live:
                self.free(sid)
            raise
        for sid in live:  # a greedy draft reads no history: keep it from growing
            st = self.shard.seqs.get(sid)
            if st is not None:
                st.history.clear()
        return out

    def _draft(self, live: dict[str, tuple[list[int], int]], out: dict[str, list[int]]) -> None:
        chunks, ids = self._sync(live)
        while chunks:  # one batch per draft position; a sequence leaves when it has its k
            samples = self.shard.forward(chunks, np.asarray(ids, np.int32))
            assert isinstance(samples, list)
            chunks, ids = [], []
            for s in samples:
                fed = self.fed[s.seq_id]
                if s.token >= self.vocab or len(out[s.seq_id]) >= live[s.seq_id][1]:
                    continue
                out[s.seq_id].append(s.token)
                if len(out[s.seq_id]) < live[s.seq_id][1]:  # the last draft need not be fed
                    chunks.append(SeqChunk(s.seq_id, len(fed.tokens), 1))
                    ids.append(s.token)
                    fed.tokens.append(s.token)

    def _sync(self, live: dict[str, tuple[list[int], int]]) -> tuple[list[SeqChunk], list[int]]:
        """Bring each sequence's cache to its committed tokens but the last; the first chunks to run
        (each ending with the last committed token, whose logits give the first draft)."""
        chunks: list[SeqChunk] = []
        ids: list[int] = []
        for s, (toks, _) in live.items():
            fed = self.fed.get(s)
            if fed is None or not self.shard.has_sequence(s):
                self.shard.add_sequence(s)
                fed = self.fed[s] = _Fed()
            keep = _common_prefix(fed.tokens, toks, len(toks) - 1)
            self.shard.trim(s, keep)
            del fed.tokens[keep:]
            new = toks[keep:]
            chunks.append(SeqChunk(s, keep, len(new)))
            ids += new
            fed.tokens += new
        return chunks, ids

    def free(self, seq_id: str) -> None:
        if self.fed.pop(seq_id, None) is not None:
            self.shard.free_sequence(seq_id)

    def close(self) -> None:
        for s in list(self.fed):
            self.free(s)
        close = getattr(self.shard, "close", None)
        if close is not None:
            close()


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    if a[:n] == b[:n]:
        return n
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0])


def check_same_tokenizer(draft: Checkpoint, target: Checkpoint, target_tok: Tokenizer | None = None,
                         spec: str = "") -> None:
    """Refuse a draft model whose tokenizer is not the target's (its drafts would be other tokens)."""
    if Path(draft.path).resolve() == Path(target.path).resolve():
        return
    names = f"the draft model {spec or draft.path} and the served model {target.path}"
    try:
        mine = Tokenizer.from_checkpoint(draft).hf.get_vocab()
    except ModelError as e:
        raise ModelError(f"{names}: cannot read the draft model's tokenizer ({e})") from None
    theirs = (target_tok or Tokenizer.from_checkpoint(target)).hf.get_vocab()
    if mine != theirs:
        raise ModelError(f"{names} have different tokenizers ({len(mine)} vs {len(theirs)} tokens"
                         f"{'' if len(mine) != len(theirs) else ', other ids'}): a draft model must "
                         f"share the served model's tokenizer; use --draft lookup or --draft off")


class AdaptiveK:
    """How many tokens one sequence drafts next. It keeps decayed counts of accepted drafts and of
    rejections (a trip that stopped short), and picks the k in [0, k_max] that maximises the expected
    tokens per trip, (1 - a^(k+1)) / (1 - a) for acceptance a, over the trip's cost, 1 + cost * k
    (`cost`: one more verified position relative to a whole trip; measured instead when `update` is
    given the trips' times; `timed`: the caller times every trip, and the first and every 32nd go
    without drafts, to time a plain one). At k = 0 it probes again now and then (every `probe_every`
    trips, doubling while probes fail, at most 64)."""

    def __init__(self, k_max: int = 8, cost: float = 0.1, probe_every: int = 8, decay: float = 0.8,
                 timed: bool = False):
        if k_max < 0:
            raise RequestError(f"--draft-tokens must be >= 0, got {k_max}")
        self.k_max, self.cost, self.decay = k_max, cost, decay
        self.accepted, self.rejected = 2.0, 1.0  # a prior that starts by drafting
        self.probe_every = self._probe_base = probe_every
        self._idle = 0  # trips at k = 0 since the last probe
        self._probing = False
        self._plain: float | None = None  # measured: seconds of a trip without drafts
        self._extra: float | None = None  # ... and of each drafted position more
        self.timed, self._trips = timed, 0

    @property
    def rate(self) -> float:
        """The estimated probability that a draft is accepted."""
        return self.accepted / max(self.accepted + self.rejected, 1e-9)

    def k(self) -> int:
        """How many to draft on the next trip."""
        if self.timed:
            self._trips += 1
            if self._plain is None or self._trips % 32 == 0:
                return 0  # a plain trip, to time
        best = _best_k(self.rate, self.k_max, self.cost)
        if best > 0 or self.k_max == 0:
            return best
        self._idle += 1
        if self._idle >= self.probe_every:
            self._idle, self._probing = 0, True
            return min(2, self.k_max)
        return 0

    def update(self, drafted: int, accepted: int, seconds: float | None = None) -> None:
        """Account for a trip: `drafted` proposed, the first `accepted` of them kept, in `seconds` (if
        measured: then `cost` follows the measured price of a drafted position)."""
        if seconds is not None:
            self._timed(drafted, seconds)
        if drafted <= 0:
            return
        self.accepted = self.accepted * self.decay + accepted
        self.rejected = self.rejected * self.decay + (1 if accepted < drafted else 0)
        if self._probing:
            good = _best_k(self.rate, self.k_max, self.cost) > 0
            self.probe_every = self._probe_base if good else min(64, self.probe_every * 2)
            self._probing = False


    def _timed(self, drafted: int, seconds: float) -> None:
        if drafted == 0:
            self._plain = seconds if self._plain is None else 0.8 * self._plain + 0.2 * seconds
        elif self._plain is not None:
            per = max(0.0, seconds - self._plain) / drafted
            self._extra = per if self._extra is None else 0.8 * self._extra + 0.2 * per
        if self._plain and self._extra is not None:
            self.cost = self._extra / self._plain


def _best_k(a: float, k_max: int, cost: float) -> int:
    a = min(a, 0.999)
    gains = [(1 - a ** (k + 1)) / (1 - a) / (1 + cost * k) for k in range(k_max + 1)]
    return int(np.argmax(gains))


def max_drafts(config: ModelConfig, length: int) -> int | None:
    """The most drafts a sequence whose caches hold `length` positions may carry on a ring serving
    this model (None: no limit): an MLX stage keeps sliding-window layers in rotating caches, which
    can drop drafted positions only while they have not wrapped (see `LayerShard.can_draft`)."""
    window, types = config.raw.get("sliding_window"), config.raw.get("layer_types") or []
    if not window or "sliding_attention" not in types:
        return None
    return max(0, int(window) - length - 2)


def make_drafter(spec: str, target: Checkpoint | None = None, target_tok: Tokenizer | None = None,
                 backend: str = "torch", dtype: str = "auto", device: str | None = None,
                 threads: int | None = None) -> Drafter | None:
    """The drafter `--draft` names: None for off, PromptLookup for lookup, else a DraftModel of the
    model `spec` (resolved as --model is) on `backend`, checked against the target's tokenizer."""
    s = (spec or "off").strip()
    if s.lower() == "off":
        return None
    if s.lower() == "lookup":
        return PromptLookup()
    if target is None:
        raise RequestError(f"--draft {s}: a draft model needs the served model to check its tokenizer")
    try:
        return DraftModel.load(s, target, target_tok, backend=backend, dtype=dtype, device=device,
                               threads=threads)
    except ModelError as e:
        raise ModelError(f"--draft {s}: {e} (--draft takes {DRAFT_CHOICES})") from None
