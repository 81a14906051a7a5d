"""TorchShard: a [start, end) slice of a Llama-family model on torch (CPU or CUDA)."""

from __future__ import annotations

import warnings
from typing import cast

import numpy as np
import torch

from backends.lora import Adapter
from backends.errors import RequestError
from backends.shard import LayerShard, Sample, SeqChunk, SeqState
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
            return torch.from_numpy(np.ascontiguousarray(x)).to(self.device, torch.long)
        if not isinstance(x, Hidden):
            raise RequestError("a slice after the first takes hidden states")
        with warnings.catch_warnings():  # read-only wire buffers are fine: we never write to them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(x.data, dtype=DTYPES[x.dtype])
        return t.view(x.shape).to(self.device, DTYPES[self.dtype])

    def _forward(self, chunks: list[SeqChunk], x: np.ndarray | Hidden | None, want_logits: bool):
        with torch.inference_mode():
            return self._run(chunks, self._input(x), want_logits)

    def _run(self, chunks: list[SeqChunk], x: torch.Tensor, want_logits: bool):
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
                outs[i] = self.model(x[starts[i]:starts[i + 1]][None], pos, self.pool, [self.slots[c.seq_id]])[0]
        done = cast(list[torch.Tensor], outs)  # every chunk has its output now
        if not self.is_last:
            h = torch.cat(done) if len(done) > 1 else done[0]  # (T, C)
            h = h.to(DTYPES[self.wire_dtype]).contiguous().cpu()
            return Hidden(h.view(torch.uint8).numpy().data.cast("B"), self.wire_dtype, tuple(h.shape))
        if want_logits:
            h = torch.cat(done) if len(done) > 1 else done[0]
            return self.model.head(h).float().cpu().numpy()
        last = torch.stack([o[-1] for o in done])  # (n_chunks, C)
        logits = self.model.head(last).float()  # (n_chunks, vocab)
        samples = []
        for c, row in zip(chunks, logits):
            st = self.seqs[c.seq_id]
            if st.params.seed is not None and not st.params.greedy:  # the draw of position offset+length
                st.rng = make_generator(st.params, self._rng_device, c.offset + c.length)
            tok, lp, top = self.samplers[c.seq_id](row, st)
            samples.append(Sample(c.seq_id, tok, lp, top))
        return samples
