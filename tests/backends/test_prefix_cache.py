"""The prefix cache (backends/prefix.py and the LayerShard's prefix part): keys, the bounded LRU store,
and sequences started from cached blocks computing exactly what they compute from scratch."""

from __future__ import annotations

import numpy as np
import pytest

from backends.errors import RequestError
from backends.lora import open_adapter
from backends.prefix import BLOCK, MISS, PrefixStore, block_hashes, salt_of
from backends.sampling import SamplingParams
from backends.shard import LayerShard, PrefixMiss, SeqChunk, load_shard
from backends.weights import open_checkpoint
from backends.wire import Hidden
from tests.backends.test_tp import tiny_dir

RNG = np.random.default_rng(7)
SYSTEM = RNG.integers(1, 256, 3 * BLOCK + 5).tolist()  # a shared head: 3 complete blocks and a bit
TAIL_A, TAIL_B = RNG.integers(1, 256, 9).tolist(), RNG.integers(1, 256, 2 * BLOCK + 3).tolist()


class Blob:
    def __init__(self, n: int) -> None:
        self.nbytes = n


# ---------------------------------------------------------------- keys and the store

def test_block_hashes_chain_complete_blocks_per_model_and_adapter():
    toks = list(range(3 * BLOCK + 7))
    keys = block_hashes(toks, salt_of("m"))
    assert len(keys) == 3 and len(set(keys)) == 3  # the partial block has no key
    assert block_hashes(toks[:2 * BLOCK], salt_of("m")) == keys[:2]  # a prefix's keys are a prefix
    other = toks[:BLOCK] + [999] + toks[BLOCK + 1:]
    changed = block_hashes(other, salt_of("m"))
    assert changed[0] == keys[0] and changed[1] != keys[1] and changed[2] != keys[2]  # a key names its past
    assert not set(keys) & set(block_hashes(toks, salt_of("m", "x")))  # an adapter never shares keys
    assert not set(keys) & set(block_hashes(toks, salt_of("other")))
    assert block_hashes(toks[:BLOCK - 1], "m+") == []


def test_the_store_stays_within_its_budget_and_evicts_children_before_parents():
    st = PrefixStore(10 * 100)
    a = block_hashes(list(range(6 * BLOCK)), "m+")
    b = block_hashes(list(range(3 * BLOCK)) + [7] * (3 * BLOCK), "m+")  # shares a's first 3 blocks
    assert st.put(a, lambda i: Blob(100)) == 6
    assert st.put(b, lambda i: Blob(100)) == 3 and st.bytes == 900 and len(st) == 9
    assert st.take(a[:2]) and st.hits == 2  # a's root is now the most recent
    c = block_hashes([5] * (4 * BLOCK), "m+")
    assert st.put(c, lambda i: Blob(100)) == 4
    assert st.bytes <= 1000 and st.evictions == 3
    # what went: leaves of the least recent chains, never a parent with a child left behind
    present = {k for k in a + b + c if k in st}
    for chain in (a, b, c):
        held = st.depth(chain)
        assert all(k not in st for k in chain[held:])  # nothing unreachable is kept
    # a's own tail was the least recent (b touched the shared head later): it went, leaf first
    assert len(present) == 10 and st.depth(c) == 4 and st.depth(b) == 6 and st.depth(a) == 3
    with pytest.raises(PrefixMiss, match="3 of its 6 blocks"):
        st.take(a)
    st.shrink(300)
    assert st.bytes == 300 and st.depth(c) == 3 and len(st) == 3  # the most recent chain's head stays
    assert st.put([b"x" * 16], lambda i: Blob(2000)) == 0  # bigger than the budget: not kept
    with pytest.raises(RequestError, match="budget"):
        PrefixStore(-1)


def test_a_chain_longer_than_the_budget_keeps_its_head():
    st = PrefixStore(250)
    keys = block_hashes(list(range(5 * BLOCK)), "m+")
    assert st.put(keys, lambda i: Blob(100)) == 2 and st.depth(keys) == 2


# ---------------------------------------------------------------- shards

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return open_checkpoint(tiny_dir(tmp_path_factory.mktemp("prefix") / "tiny-llama"))


def shards(backend: str, ck, split: int | None = None) -> list[LayerShard]:
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    n = ck.config.num_hidden_layers
    cuts = [0, n] if split is None else [0, split, n]
    out = [load_shard(backend, ck, a, b, dtype="float32", threads=1) for a, b in zip(cuts, cuts[1:])]
    for s in out:
        s.enable_prefix_cache(64 << 20, "tiny")
    return out


def run(chain: list[LayerShard], seq: str, prompt: list[int], n: int, prefix: int = 0,
        adapter: str = "") -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens of `prompt` (its first `prefix` from the caches) and each stage's output rows."""
    for s in chain:
        s.add_sequence(seq, SamplingParams(), prompt, adapter, prefix=prefix)
    out: list[int] = []
    rows: list[np.ndarray] = []
    x, off = np.asarray(prompt[prefix:], np.int32), prefix
    for _ in range(n):
        h: object = x
        for s in chain:
            h = s.forward([SeqChunk(seq, off, len(x))], h)
            if isinstance(h, Hidden):
                rows.append(np.frombuffer(h.data, np.float32).reshape(h.shape)[-1].copy())
                h = h.copy()
        off += len(x)
        assert isinstance(h, list)
        out.append(h[0].token)
        x = np.array([out[-1]], np.int32)
    return out, rows


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_prefix_from_the_cache_gives_the_same_tokens_and_hidden_states(tiny, backend):
    chain = shards(backend, tiny, split=1)
    cold, cold_rows = run(chain, "a", SYSTEM + TAIL_A, 6)
    # the prompt's 3 complete blocks were kept on both stages once its (only) chunk ran
    assert [s.prefix_stats()["blocks"] for s in chain] == [3, 3]
    assert all(s.prefix_missing(SYSTEM + TAIL_B, 3 * BLOCK) is None for s in chain)
    warm, warm_rows = run(chain, "b", SYSTEM + TAIL_A, 6, prefix=3 * BLOCK)
    assert warm == cold
    np.testing.assert_allclose(warm_rows, cold_rows, rtol=1e-5, atol=1e-5)
    assert chain[0].prefix_stats()["hits"] == 3
    # the imported copy is the sequence's own: growing, trimming and freeing it leaves the store whole
    for s in chain:
        s.trim("b", 3 * BLOCK - 10)
        s.free_sequence("b")
    again, _ = run(chain, "c", SYSTEM + TAIL_A, 6, prefix=3 * BLOCK)
    assert again == cold
    # another prompt on the same head: only its own new blocks are stored
    other, _ = run(chain, "d", SYSTEM + TAIL_B, 3)
    assert [s.prefix_stats()["blocks"] for s in chain] == [5, 5]
    assert run(chain, "e", SYSTEM + TAIL_B, 3, prefix=5 * BLOCK)[0] == other


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_keep_stores_the_committed_blocks_the_cache_holds(tiny, backend):
    (sh,) = shards(backend, tiny)
    prompt = SYSTEM[:BLOCK + 4]
    toks, _ = run([sh], "a", prompt, 2 * BLOCK)
    committed = prompt + toks  # the last committed token never went through the layers
    assert sh.prefix_stats()["blocks"] == 1
    assert sh.keep("a", committed) == (len(committed) - 1) // BLOCK - 1
    assert sh.keep("a", committed) == 0 and sh.keep("nobody", committed) == 0
    sh.free_sequence("a")
    # turn 2 of a chat: the first answer's blocks and all; the continuation equals a cold run's
    turn2 = committed + TAIL_A
    n = (len(committed) - 1) // BLOCK * BLOCK
    assert run([sh], "b", turn2, 4, prefix=n)[0] == run([sh], "c", turn2, 4)[0]


def test_a_stage_lacking_the_prefix_refuses_it_and_keeps_nothing_of_it(tiny):
    chain = shards("torch", tiny, split=2)
    run(chain, "a", SYSTEM + TAIL_A, 1)
    assert chain[1].prefix is not None
    chain[1].prefix.store.shrink(0)  # stage 1 evicted everything
    why = chain[1].prefix_missing(SYSTEM + TAIL_A, 3 * BLOCK)
    assert why and MISS in why and "0 of its 3 blocks" in why
    with pytest.raises(PrefixMiss, match=MISS):
        chain[1].add_sequence("b", SamplingParams(), SYSTEM + TAIL_A, prefix=3 * BLOCK)
    assert not chain[1].has_sequence("b")
    with pytest.raises(RequestError, match="multiple of"):
        chain[0].add_sequence("b", SamplingParams(), SYSTEM + TAIL_A, prefix=BLOCK + 1)
    with pytest.raises(RequestError, match="below the prompt"):
        chain[0].add_sequence("b", SamplingParams(), SYSTEM[:2 * BLOCK], prefix=2 * BLOCK)
    off = load_shard("torch", tiny, 0, 1, dtype="float32", threads=1)
    off.enable_prefix_cache(0, "tiny")  # 0: off
    assert off.prefix is None and MISS in (off.prefix_missing(SYSTEM, BLOCK) or "")


def test_an_adapter_never_reuses_base_blocks(tiny, tmp_path):
    (sh,) = shards("torch", tiny)
    sh.load_adapter(open_adapter(f"x={q_adapter(tmp_path / 'ad', tiny.config.hidden_size)}"))
    run([sh], "base", SYSTEM + TAIL_A, 1)
    assert MISS in (sh.prefix_missing(SYSTEM + TAIL_A, 3 * BLOCK, "x") or "")
    tuned, _ = run([sh], "x1", SYSTEM + TAIL_A, 4, adapter="x")
    assert run([sh], "x2", SYSTEM + TAIL_A, 4, prefix=3 * BLOCK, adapter="x")[0] == tuned
    assert sh.prefix_stats()["blocks"] == 6  # the base model's 3 and the adapter's 3, apart


def q_adapter(path, h: int, r: int = 4):
    """A LoRA adapter of q_proj on the tiny model's 3 layers, big enough to change its answers."""
    import json

    from safetensors.numpy import save_file

    rng = np.random.default_rng(5)
    save_file({f"model.layers.{n}.self_attn.q_proj.{ab}": rng.standard_normal(shape).astype(np.float32)
               for n in range(3) for ab, shape in (("lora_a", (h, r)), ("lora_b", (r, h)))},
              str(path.mkdir(parents=True) or path / "adapters.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 3, "lora_parameters": {"rank": r, "scale": 2.0}}))
    return path


def test_the_store_yields_to_live_sequences(tiny):
    sh = load_shard("torch", tiny, 0, tiny.config.num_hidden_layers, dtype="float32", threads=1)
    # offered memory: the weights, one sequence's pool row (393 kB here) and ~100 kB more
    sh.enable_prefix_cache(64 << 20, "tiny", memory=sh.weight_nbytes() + 500_000)
    run([sh], "a", SYSTEM + TAIL_A, 1)
    assert 0 < sh.prefix_stats()["bytes"] <= 500_000 - sh.cache_nbytes()
    run([sh], "b", SYSTEM + TAIL_B, 1)  # a second live sequence takes the room: the store gives it back
    assert sh.cache_nbytes() > 500_000 and sh.prefix_stats()["bytes"] == 0


def test_join_takes_a_prefix_cache_size_and_refuses_a_bad_one(embedded_path):
    from apps.cli import build_parser
    from apps.join import _node_config
    from backends.errors import TogetherError

    def cfg(*extra: str):
        return _node_config(build_parser().parse_args(["join", "--model", str(embedded_path), "--backend", "torch",
                                                       *extra]))

    assert cfg().prefix_cache_memory is None  # the default: 1/8 of the offer, at most 1 GiB (mesh/node.py)
    assert cfg("--prefix-cache-memory", "512MB").prefix_cache_memory == 512_000_000
    assert cfg("--prefix-cache-memory", "0").prefix_cache_memory == 0
    with pytest.raises(TogetherError, match="--prefix-cache-memory.*0 turns"):
        cfg("--prefix-cache-memory", "lots")
