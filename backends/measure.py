"""How fast this peer runs the model, measured on what it will really run: its backend, dtype,
device, thread count and the checkpoint's own weights (one middle layer, loaded and freed), so the
coordinator can split the layers by speed."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import numpy as np

from backends.shard import LayerShard, SeqChunk, load_shard
from backends.weights import Checkpoint
from backends.wire import Hidden

PREFILL = 16  # tokens of the warm-up chunk (also timed: the prefill rate)
STEPS = 16  # timed one-token decode steps
PREFILL_EVERY = 4  # a timed prefill chunk after every 4th step: the fastest of 5 (one alone read up to 4x slow
# beside a peer measuring and a busy core)
FLUSH_BYTES = 64 << 20  # read between steps: a decode streams every layer's weights from memory, not cache


@dataclass(frozen=True)
class Speed:
    """One peer's measured speed, per layer."""

    layer_ms: float  # one decode step (one token) through one decoder layer
    head_ms: float  # the last stage's extra per decode step (norm, lm_head, sampling), timed or estimated
    prefill_ms: float  # one token of a prefill chunk through one layer
    dtype: str  # the compute dtype the shard resolved to
    weight_format: str  # how its weights are held, e.g. "int4/g32", "bfloat16", "float32"
    seconds: float  # what measuring took (loads included)


def measured_layer(num_layers: int) -> int:
    """The layer measure_speed times: a middle one; a 1- or 2-layer model has none, so its first one
    (with the embedding). A copy from peers fetches it before measuring (mesh/supply.py)."""
    return (num_layers - 1) // 2


def measure_speed(backend: str, ck: Checkpoint, dtype: str = "auto", device: str | None = None,
                  threads: int | None = None, head: bool = False) -> Speed:
    """Time one middle layer of `ck` (not the first or last: no embedding, no head) on this
    backend, dtype, device and thread count. The head's cost is estimated from the layer's by
    multiply-adds, or with `head` timed on the last layer (which loads the head: seconds). Every
    layer loaded here is freed before this returns."""
    t0 = time.perf_counter()
    n = ck.config.num_hidden_layers
    k = measured_layer(n)
    flush = np.ones(FLUSH_BYTES, np.uint8)
    shard = load_shard(backend, ck, k, k + 1, dtype=dtype, device=device, threads=threads)
    try:
        resolved, fmt = shard.dtype, shard.weight_format
        prefill_ms, layer_ms = _time_steps(shard, flush)
        if shard.is_last:  # a one-layer model: one stage, its head already counted
            head_ms = 0.0
        elif head:
            del shard
            gc.collect()
            shard = load_shard(backend, ck, n - 1, n, dtype=dtype, device=device, threads=threads)
            head_ms = max(0.0, _time_steps(shard, flush)[1] - layer_ms)
        else:
            head_ms = layer_ms * head_layers(ck)
    finally:
        del shard
        gc.collect()
    return Speed(layer_ms, head_ms, prefill_ms, resolved, fmt, time.perf_counter() - t0)


def _time_steps(shard: LayerShard, flush: np.ndarray) -> tuple[float, float]:
    """(ms per prefill token, ms per decode step: each the fastest of its runs) of one sequence on `shard`."""
    rng = np.random.default_rng(0)
    hidden = shard.config.hidden_size
    vocab = shard.config.vocab_size

    def x(tokens: int) -> np.ndarray | Hidden:
        if shard.is_first:
            return rng.integers(0, vocab, tokens).astype(np.int32)
        h = rng.standard_normal((tokens, hidden), dtype=np.float32)
        return Hidden(memoryview(h.tobytes()), "float32", (tokens, hidden))

    shard.add_sequence("measure")
    try:
        shard.forward([SeqChunk("measure", 0, PREFILL)], x(PREFILL))  # warm-up: first-call paths
        pos, steps, chunks = PREFILL, [], []
        for i in range(STEPS + 1):  # the first step warms the decode path
            inp = x(1)
            int(flush[::64].sum())  # one byte per cache line: the weights leave the caches
            t = time.perf_counter()
            shard.forward([SeqChunk("measure", pos, 1)], inp)
            if i:
                steps.append(time.perf_counter() - t)
            pos += 1
            if i % PREFILL_EVERY == 0:  # prefill chunks spread among the steps, not bunched in one busy moment
                inp = x(PREFILL)
                t = time.perf_counter()
                shard.forward([SeqChunk("measure", pos, PREFILL)], inp)
                chunks.append(time.perf_counter() - t)
                pos += PREFILL
        prefill_ms = min(chunks) * 1000 / PREFILL
    finally:
        shard.free_sequence("measure")
    # the fastest: other work on a shared host (peers starting beside it, measuring too) only ever adds
    # time to a step; the lower quartile still read ~20 % slow with three peers measuring on two cores
    return prefill_ms, min(steps) * 1000


def head_layers(ck: Checkpoint) -> float:
    """The lm_head's multiply-adds per token in decoder layers' worth: what the last stage pays on
    top of its layers when its head is not timed (loading it costs seconds at start)."""
    c = ck.config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    return c.hidden_size * c.vocab_size / layer
