"""TorchShard: a [start, end) slice of a Llama-family model on torch (CPU or CUDA)."""

from __future__ import annotations

import warnings
from typing import Iterator, Sequence, cast

import numpy as np
import torch

from backends.lora import Adapter
from backends.errors import RequestError
from backends.shard import LayerShard, Sample, SeqChunk, SeqState, accept
from backends.torch.lora import MultiLoRALinear, apply_adapter
from backends.torch.model import DTYPES, load_slice
from backends.torch.sampling import Sampler, make_generator, make_sampler
from backends.weights import Checkpoint
from backends.wire import Hidden


class TorchShard(LayerShard):
    backend = "torch"

    def __init__(self, checkpoint: Checkpoint, start: int, end: int, dtype: str,
                 wire_dtype: str | None = None, device: str | None = None,
                 threads: int | None = None, packed: bool = True):
        super().__init__(checkpoint, start, end, dtype, wire_dtype)
        if threads:
            torch.set_num_threads(int(threads))  # peers sharing a host split its cores on purpose
        self.device = torch.device(device or "cpu")
        # packed=False: every weight dense in `dtype` (the reference the packed path is checked against)
        self.model = load_slice(checkpoint, start, end, dtype, self.device, packed=packed)
        self._open_caches()

    def _open_caches(self) -> None:
        self.pool = self.model.new_pool()  # every sequence's KV cache, one slot (row) each
        self.slots: dict[str, int] = {}
        self.samplers: dict[str, Sampler] = {}

    @property
    def _rng_device(self) -> torch.device:
        # torch's CPU generator serves every device but CUDA, whose sampling draws on the GPU
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # ---- caches

    def _new_cache(self, seq_id: str, st: SeqState) -> None:
        self.slots[seq_id] = self.pool.alloc()
        if self.is_last:
            st.rng = make_generator(st.params, self._rng_device)
            self.samplers[seq_id] = make_sampler(st.params)

    def _free_cache(self, seq_id: str) -> None:
        slot = self.slots.pop(seq_id, None)
        if slot is not None:
            self.pool.free(slot)
        self.samplers.pop(seq_id, None)

    def _trim_cache(self, seq_id: str, length: int) -> None:
        self.pool.trim(self.slots[seq_id], length)

    # ---- the prefix cache: a block is (keys; values) of every layer, (2, layers, Hkv, n, D), a copy

    @property
    def prefix_supported(self) -> bool:
        return True

    def _export_kv(self, seq_id: str, start: int, end: int) -> torch.Tensor:
        k, v, slot = self.pool.k, self.pool.v, self.slots[seq_id]
        assert k is not None and v is not None
        return torch.stack((k[:, slot, :, start:end], v[:, slot, :, start:end]))  # stack copies

    def _import_kv(self, seq_id: str, blobs: list) -> None:
        slot = self.slots[seq_id]
        self.pool.reserve(slot, sum(int(b.shape[3]) for b in blobs))
        k, v = self.pool.k, self.pool.v
        assert k is not None and v is not None
        at = 0
        for b in blobs:  # each block straight into the sequence's row: one copy, no concatenation
            n = int(b.shape[3])
            k[:, slot, :, at:at + n] = b[0]
            v[:, slot, :, at:at + n] = b[1]
            at += n

    def _apply_adapter(self, adapter: Adapter, weights: dict) -> None:
        apply_adapter(self.model, self.start, adapter.name, weights, adapter.scale, self.route)

    def cache_nbytes(self) -> int:
        return self.pool.nbytes

    @property
    def weight_format(self) -> str:
        return self.model.weight_format

    def weight_nbytes(self) -> int:
        seen: dict[int, int] = {}
        for p in [*self.model.parameters(), *self.model.buffers()]:  # packed weights are buffers
            seen[p.data_ptr()] = p.nbytes
        return sum(seen.values()) + sum(m.lora_nbytes for m in self.model.modules()
                                        if isinstance(m, MultiLoRALinear))

    # ---- compute

    def _input(self, x: np.ndarray | Hidden | None) -> torch.Tensor:
        if self.is_first:
            return torch.from_numpy(np.array(x, dtype=np.int64)).to(self.device)  # a copy: wire buffers are read-only
        if not isinstance(x, Hidden):
            raise RequestError("a slice after the first takes hidden states")
        with warnings.catch_warnings():  # read-only wire buffers are fine: we never write to them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(x.data, dtype=DTYPES[x.dtype])
        return t.view(x.shape).to(self.device, DTYPES[self.dtype])

    def _forward(self, chunks: list[SeqChunk], x: np.ndarray | Hidden | None, want_logits: bool):
        drafts = self._draft_ids(chunks, x) if self.is_last else {}
        with torch.inference_mode():
            return self._run(chunks, self._input(x), want_logits, drafts)

    def _run(self, chunks: list[SeqChunk], x: torch.Tensor, want_logits: bool,
             drafts: dict[str, list[int]] | None = None):
        starts = np.cumsum([0] + [c.length for c in chunks])
        outs: list[torch.Tensor | None] = [None] * len(chunks)
        single = [i for i, c in enumerate(chunks) if c.length == 1]
        if len(single) > 1:  # the common decode step: one forward over every sequence's token
            idx = torch.tensor(starts[single], device=self.device)
            pos = torch.tensor([[chunks[i].offset] for i in single], device=self.device)
            self._route([chunks[i].seq_id for i in single])
            h = self.model(x[idx][:, None], pos, self.pool, [self.slots[chunks[i].seq_id] for i in single])
            for j, i in enumerate(single):
                outs[i] = h[j]
        for i, c in enumerate(chunks):
            if outs[i] is None:  # prefill chunks: one sequence at a time
                pos = torch.arange(c.offset, c.offset + c.length, device=self.device)[None]
                self._route([c.seq_id])
                outs[i] = self.model(x[starts[i]:starts[i + 1]][None], pos, self.pool, [self.slots[c.seq_id]],
                                     rowwise=c.drafts > 0)[0]
        done = cast(list[torch.Tensor], outs)  # every chunk has its output now
        if not self.is_last:
            h = torch.cat(done) if len(done) > 1 else done[0]  # (T, C)
            h = h.to(DTYPES[self.wire_dtype]).contiguous().cpu()
            return Hidden(h.view(torch.uint8).numpy().data.cast("B"), self.wire_dtype, tuple(h.shape))
        if want_logits:
            h = torch.cat(done) if len(done) > 1 else done[0]
            return self.model.head(h).float().cpu().numpy()
        # the head runs only on the positions a draw needs: a sampled chunk's last, or a drafted one's 1 + k
        rows = [o[-(c.drafts + 1):] for c, o in zip(chunks, done) if c.sample]
        if not rows:
            return []
        logits = self.model.head(torch.cat(rows) if len(rows) > 1 else rows[0]).float()  # (rows, vocab)
        samples: list[Sample] = []
        at = 0
        for c in (c for c in chunks if c.sample):
            part, at = logits[at:at + c.drafts + 1], at + c.drafts + 1
            if c.drafts and drafts is not None:
                samples += accept(drafts[c.seq_id], self._draws(c, part, drafts[c.seq_id]))
            else:
                masks = self._grammar_masks(c.seq_id)
                samples.append(self._draw(c, part[-1], c.offset + c.length, (), masks[0] if masks else None))
        return samples

    def _draws(self, c: SeqChunk, logits: torch.Tensor, drafts: list[int]) -> Iterator[Sample]:
        """The draws at a drafted chunk's positions, lazily (verification stops at a mismatch); a
        constrained one's masks come from its grammar after the drafts before each position."""
        first = c.offset + c.length - c.drafts  # the position the first draft stands at
        masks = self._grammar_masks(c.seq_id, drafts)
        for j in range(c.drafts + 1):
            yield self._draw(c, logits[j], first + j, drafts[:j], masks[min(j, len(masks) - 1)] if masks else None)

    def _draw(self, c: SeqChunk, row: torch.Tensor, position: int, before: Sequence[int],
              allowed: np.ndarray | None = None) -> Sample:
        """The token at `position` from its logits, as a plain step draws it; the penalties also see
        `before` (drafts accepted ahead of it, not in the history yet); `allowed`: the grammar's mask."""
        st = self.seqs[c.seq_id]
        if st.params.seed is not None and not st.params.greedy:  # the key of this position
            st.rng = make_generator(st.params, self._rng_device, position)
        view = SeqState(st.params, st.history + list(before), rng=st.rng) if before else st
        mask = None if allowed is None else torch.from_numpy(allowed).to(row.device, non_blocking=True)
        tok, lp, top = self.samplers[c.seq_id](row, view, mask)
        return Sample(c.seq_id, tok, lp, top)
