"""Consecutive slices in one process, hidden states handed on as the (dtype, shape, bytes) triple
a mesh Frame carries, checked by the receiving side: the path the mesh takes, minus the network."""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from backends.errors import ShardSpecError
from backends.generation import Delta, Generation
from backends.sampling import SamplingParams
from backends.shard import BACKENDS, LayerShard, Sample, SeqChunk, load_shard
from backends.tokenizer import Tokenizer
from backends.weights import Checkpoint
from backends.speculation import AdaptiveK, Drafter
from backends.wire import Hidden

_SPEC = re.compile(r"^(?:(?P<backend>[a-z]+):)?(?P<start>\d+)-(?P<end>\d+)(?:\*(?P<tp>\w*))?$")


@dataclass(frozen=True)
class SliceSpec:
    backend: str
    start: int
    end: int
    tp: int = 1  # ranks of a tensor-parallel group serving the slice (backends/tp.py)


def parse_shards(spec: str, num_layers: int, default_backend: str) -> list[SliceSpec]:
    """Parse 'mlx:0-12,torch:12-30' into consecutive slices covering [0, num_layers) exactly;
    'torch:12-30*2' serves a slice with a tensor-parallel group of 2 processes."""
    out: list[SliceSpec] = []
    for part in [p.strip() for p in spec.split(",")]:
        m = _SPEC.match(part)
        if not m:
            raise ShardSpecError(f"bad shard {part!r}: expected BACKEND:START-END, e.g. mlx:0-12 "
                                 f"(or mlx:0-12*2 for a tensor-parallel group of 2)")
        backend = m.group("backend") or default_backend
        if backend not in BACKENDS:
            raise ShardSpecError(f"bad shard {part!r}: unknown backend {backend!r} "
                                 f"(expected {' or '.join(BACKENDS)})")
        start, end = int(m.group("start")), int(m.group("end"))
        if start >= end:
            raise ShardSpecError(f"bad shard {part!r}: START must be below END (ranges are half-open)")
        tp = m.group("tp")
        if tp is not None and (not tp.isdigit() or int(tp) < 1):
            raise ShardSpecError(f"bad shard {part!r}: '*{tp}' must be a number of tensor-parallel "
                                 f"ranks, e.g. {backend}:{start}-{end}*2")
        out.append(SliceSpec(backend, start, end, int(tp or 1)))
    expect = 0
    for s in out:
        if s.start > expect:
            raise ShardSpecError(f"gap in --shards: layers {expect}-{s.start} are not assigned")
        if s.start < expect:
            raise ShardSpecError(f"overlap in --shards: layer {s.start} is assigned twice")
        expect = s.end
    if expect > num_layers:
        raise ShardSpecError(f"--shards goes to layer {expect} but the model has {num_layers} layers")
    if expect < num_layers:
        raise ShardSpecError(f"--shards stops at layer {expect}; the model has {num_layers} layers "
                             f"(end the last slice at {num_layers})")
    return out


class Pipeline:
    """Slices run back to back; between them the hidden states are copied and checked as a stage
    that receives them over the network would."""

    def __init__(self, shards: list[LayerShard]):
        self.shards = shards
        self._ids = itertools.count()
        self.bytes_per_hop = 0  # last step's payload per hop, for statistics

    @classmethod
    def load(cls, ck: Checkpoint, slices: list[SliceSpec], dtype: str = "auto",
             wire_dtype: str | None = None, threads: int | None = None,
             device: str | None = None) -> "Pipeline":
        from backends.tp import load_tp_shard

        shards: list[LayerShard] = []
        try:
            for s in slices:
                if s.tp > 1:
                    shards.append(load_tp_shard(s.backend, ck, s.start, s.end, s.tp, dtype=dtype,
                                                wire_dtype=wire_dtype, threads=threads))
                else:
                    shards.append(load_shard(s.backend, ck, s.start, s.end, dtype=dtype,
                                             wire_dtype=wire_dtype, device=device, threads=threads))
        except BaseException:
            cls(shards).close()
            raise
        return cls(shards)

    def close(self) -> None:
        """Stop the tensor-parallel groups among the slices (plain slices hold no processes)."""
        for sh in self.shards:
            close = getattr(sh, "close", None)
            if close is not None:
                close()

    @property
    def config(self):
        return self.shards[0].config

    def add(self, seq_id: str, params: SamplingParams, prompt: list[int], adapter: str = "") -> None:
        for sh in self.shards:
            sh.add_sequence(seq_id, params, prompt, adapter)

    def load_adapter(self, adapter) -> None:
        for sh in self.shards:
            sh.load_adapter(adapter)

    def free(self, seq_id: str) -> None:
        for sh in self.shards:
            sh.free_sequence(seq_id)

    def step(self, chunks: list[SeqChunk], tokens: np.ndarray, logits: bool = False
             ) -> list[Sample] | np.ndarray:
        x: np.ndarray | Hidden = tokens
        for sh in self.shards[:-1]:
            h = sh.forward(chunks, x)
            if not isinstance(h, Hidden):
                raise TypeError(f"slice [{sh.start}, {sh.end}) is not the last but returned samples")
            x = h.copy()
            self.bytes_per_hop = x.nbytes
        last = self.shards[-1]
        if logits:
            return last.logits(chunks, x)
        out = last.forward(chunks, x)
        if isinstance(out, Hidden):
            raise TypeError(f"the last slice [{last.start}, {last.end}) returned hidden states, not samples")
        return out

    def generate(self, prompt: list[int], params: SamplingParams, tok: Tokenizer,
                 stats: dict | None = None, adapter: str = "", draft: Drafter | None = None,
                 draft_tokens: int = 8, adaptive: bool = True) -> Iterator[Delta]:
        """Stream the deltas of one sequence (a batch of one; the mesh scheduler batches). With a
        drafter, each step verifies up to `draft_tokens` drafted tokens (as many as AdaptiveK finds
        worth it; adaptive=False: always that many): the answer is the same, in fewer steps."""
        seq_id = f"local-{next(self._ids)}"
        gen = Generation(seq_id, prompt, params, tok, self.config.max_position_embeddings)
        self.add(seq_id, params, prompt, adapter)
        # in one process a trip is compute: AdaptiveK weighs the measured price of a drafted position
        ak = AdaptiveK(draft_tokens, cost=0.3, timed=True) if draft is not None and adaptive else None
        spec = {"steps": 0, "drafted": 0, "accepted": 0}
        try:
            t0 = time.perf_counter()
            (s,) = self.step([SeqChunk(seq_id, 0, len(prompt))], np.asarray(prompt, np.int32))
            t1 = time.perf_counter()
            yield gen.add(s)
            while not gen.finished:
                pos = len(prompt) + len(gen.tokens) - 1
                ts = time.perf_counter()  # a trip's time counts its drafting
                drafts = self._drafts(seq_id, gen, pos, draft, ak.k() if ak else draft_tokens)
                out = self.step([SeqChunk(seq_id, pos, 1 + len(drafts), drafts=len(drafts), draft_ids=drafts)],
                                np.asarray([gen.tokens[-1]] + drafts, np.int32))
                assert isinstance(out, list)
                spec["steps"] += 1
                if ak is not None:
                    ak.update(len(drafts), len(out) - 1, time.perf_counter() - ts)
                if drafts:
                    spec["drafted"] += len(drafts)
                    spec["accepted"] += len(out) - 1
                    for sh in self.shards[:-1]:  # the last slice rolled itself back
                        sh.trim(seq_id, pos + len(out))
                for s in out:
                    if not gen.finished:
                        yield gen.add(s)
            t2 = time.perf_counter()
            if stats is not None:
                stats.update(prompt_tokens=len(prompt), generated_tokens=len(gen.tokens),
                             prefill_s=t1 - t0, decode_s=t2 - t1, finish_reason=gen.finish_reason,
                             bytes_per_hop=self.bytes_per_hop, **spec)
        finally:
            self.free(seq_id)
            if draft is not None:
                draft.free(seq_id)

    def _drafts(self, seq_id: str, gen: Generation, pos: int, draft: Drafter | None, k: int) -> list[int]:
        """Up to k drafts to verify after the last token: no more than the answer and the context
        have room for, and only where every slice can roll the rejected ones back."""
        if draft is None:
            return []
        k = min(k, gen.max_new - len(gen.tokens) - 1, self.config.max_position_embeddings - pos - 2)
        if k <= 0 or not all(sh.can_draft(seq_id, k) for sh in self.shards):
            return []
        return draft.propose_many({seq_id: (gen.all_tokens, k)}).get(seq_id, [])[:k]
