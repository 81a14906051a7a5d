"""Seeded sampling is a function of (seed, position): a sequence replayed after a peer loss (its cache
freed, then rebuilt from its history, in one chunk or several) draws the same tokens as before."""

from __future__ import annotations

import numpy as np
import pytest

from backends.sampling import SamplingParams
from backends.shard import LayerShard, SeqChunk, load_shard
from backends.weights import open_checkpoint
from tests.backends.test_tp import tiny_dir

PROMPT = [5, 17, 42, 9, 100, 3]
PARAMS = SamplingParams(temperature=1.0, seed=1234)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return open_checkpoint(tiny_dir(tmp_path_factory.mktemp("seeded") / "tiny-llama"))


def shard_for(backend: str, ck) -> LayerShard:
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    return load_shard(backend, ck, 0, ck.config.num_hidden_layers, dtype="float32", threads=1)


def step(sh: LayerShard, seq: str, tokens: list[int], offset: int, sample: bool = True) -> int | None:
    out = sh.forward([SeqChunk(seq, offset, len(tokens), sample)], np.asarray(tokens, np.int32))
    assert isinstance(out, list)
    return out[0].token if out else None


def generate(sh: LayerShard, seq: str, history: list[int], n: int, chunks: int = 1) -> list[int]:
    """Prefill `history` (in `chunks` pieces) then decode: the `n` tokens drawn."""
    sh.add_sequence(seq, PARAMS, history)
    cuts = np.linspace(0, len(history), chunks + 1).astype(int).tolist()
    for a, b in zip(cuts, cuts[1:-1]):
        assert step(sh, seq, history[a:b], a, sample=False) is None  # inner chunks draw nothing
    tok = step(sh, seq, history[cuts[-2]:], cuts[-2])
    out = [tok]
    while len(out) < n:
        out.append(step(sh, seq, [out[-1]], len(history) + len(out) - 1))
    return [int(t) for t in out if t is not None]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_replayed_seeded_sequence_draws_the_same_tokens(tiny, backend):
    sh = shard_for(backend, tiny)
    undisturbed = generate(sh, "a", PROMPT, 12)
    sh.free_sequence("a")
    # the peer holding the last stage died after 5 tokens: the new one rebuilds the cache from history
    again = generate(sh, "a", PROMPT + undisturbed[:5], 7)
    assert again == undisturbed[5:]
    sh.free_sequence("a")
    assert generate(sh, "a", PROMPT + undisturbed[:5], 7, chunks=3) == undisturbed[5:]  # chunked replay
    # other sequences in the shard, or another seed, do not change it; another seed does change it
    sh.add_sequence("other", SamplingParams(temperature=1.0, seed=9), PROMPT)
    step(sh, "other", PROMPT, 0)
    sh.free_sequence("a")
    assert generate(sh, "a", PROMPT, 12) == undisturbed
    sh.free_sequence("a")
    sh.add_sequence("b", SamplingParams(temperature=1.0, seed=4321), PROMPT)
    first = [step(sh, "b", PROMPT, 0)]
    for i in range(11):
        first.append(step(sh, "b", [first[-1]], len(PROMPT) + i))
    assert first != undisturbed
