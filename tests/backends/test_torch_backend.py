"""The torch backend against transformers, against itself (cache, batching, splits), and its sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from backends.errors import ModelError  # noqa: E402
from backends.models import EMBEDDED, cache_dir  # noqa: E402
from backends.sampling import SamplingParams  # noqa: E402
from backends.shard import SeqChunk, SeqState  # noqa: E402
from backends.torch.model import rope_inv_freq, ModelArgs  # noqa: E402
from backends.torch.sampling import make_generator, make_sampler  # noqa: E402
from backends.torch.shard import TorchShard  # noqa: E402
from backends.weights import open_checkpoint  # noqa: E402
from backends.wire import Hidden  # noqa: E402
from tests.helpers import full_logits, greedy  # noqa: E402

GGUF = cache_dir() / "models" / EMBEDDED["smollm2-135m"]["file"]
PROMPT = np.array([1, 9690, 28, 1178, 314, 253, 1345, 282, 1148, 30, 198, 2], np.int32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the test machines are small and shared: OpenMP threads spinning against other processes
    # make every op many times slower, so this module computes on one thread
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gguf_ck():
    if not GGUF.exists():
        pytest.skip(f"embedded model not in the cache ({GGUF})")
    return open_checkpoint(GGUF)


@pytest.fixture(scope="module")
def full(gguf_ck):
    return TorchShard(gguf_ck, 0, 30, "float32")


# ---------------------------------------------------------------- reference equivalence


def test_gguf_matches_transformers(gguf_ck, full, monkeypatch):
    # transformers' own GGUF reader (its own dequantization and Q/K un-permutation); from_pretrained
    # with gguf_file would need `accelerate`, so load the state dict into a model built here
    import functools

    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # it asks gguf for the same (pure) name map once per submodule, ~400 times: seconds of this test
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))

    with torch.device("meta"):
        ref = LlamaForCausalLM(LlamaConfig(**gguf_ck.config.to_hf_dict()))
    sd = load_gguf_checkpoint(str(GGUF), return_tensors=True, model_to_load=ref)["tensors"]
    ref.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()}, strict=False, assign=True)
    ref.tie_weights()
    ref.model.rotary_emb = type(ref.model.rotary_emb)(ref.config)  # its buffer was built on meta
    ref.float().eval()
    with torch.inference_mode():
        want = ref(torch.tensor(PROMPT[None], dtype=torch.long)).logits[0].numpy()
    got = full_logits(full, PROMPT)
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)
    assert (got.argmax(-1) == want.argmax(-1)).all()


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def tiny_model(kind, path, dtype=torch.float32, **extra):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**TINY, rope_theta=10000.0, attention_bias=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}, **extra)
        m = transformers.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**TINY, rope_theta=1e6, **extra)
        m = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**TINY, tie_word_embeddings=True, **extra)
        m = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # random biases / norms, so that wiring mistakes show
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(0, 0.5 if n.endswith("bias") else 0.1).add_(1.0 if "norm" in n else 0.0)
    m.to(dtype).save_pretrained(path, safe_serialization=True)
    return m.float().eval()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_tiny_configs_match_transformers(kind, tmp_path):
    ref = tiny_model(kind, tmp_path)
    ck = open_checkpoint(tmp_path)
    tokens = np.random.default_rng(1).integers(0, 128, 40).astype(np.int32)
    with torch.inference_mode():
        want = ref(torch.tensor(tokens[None], dtype=torch.long)).logits[0].numpy()
    got = full_logits(TorchShard(ck, 0, 3, "float32"), tokens)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_llama3_rope_is_scaled(tmp_path):
    tiny_model("llama", tmp_path)
    cfg = open_checkpoint(tmp_path).config
    scaled = rope_inv_freq(ModelArgs.from_config(cfg, 0, 1))
    cfg.rope_scaling = None
    plain = rope_inv_freq(ModelArgs.from_config(cfg, 0, 1))
    assert scaled[0] == plain[0] and scaled[-1] == pytest.approx(plain[-1] / 8)


def test_bf16_safetensors(tmp_path):
    ref = tiny_model("qwen2", tmp_path, dtype=torch.bfloat16)  # ref holds the bf16-rounded weights
    ck = open_checkpoint(tmp_path)
    tokens = np.arange(1, 20, dtype=np.int32)
    with torch.inference_mode():
        want = ref(torch.tensor(tokens[None], dtype=torch.long)).logits[0].numpy()
    np.testing.assert_allclose(full_logits(TorchShard(ck, 0, 3, "float32"), tokens), want, atol=1e-4, rtol=1e-4)
    half = full_logits(TorchShard(ck, 0, 3, "bfloat16"), tokens)
    assert half.dtype == np.float32 and np.abs(half - want).max() < 0.1


# ---------------------------------------------------------------- cache, batching, splits


def test_incremental_equals_full(full):
    want = full_logits(full, PROMPT)
    full.add_sequence("inc")
    parts, off = [], 0
    for n in (4, 3, 1, 1, 2, 1):  # prefill, a chunk after a prefix, single decode steps
        parts.append(full.logits([SeqChunk("inc", off, n)], PROMPT[off:off + n]))
        off += n
    full.free_sequence("inc")
    got = np.concatenate(parts)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_batch_matches_alone(full):
    prompts = {"a": PROMPT[:3], "b": PROMPT, "c": PROMPT[2:9]}
    alone = {k: greedy([full], p, 6, seq="alone") for k, p in prompts.items()}
    for k, p in prompts.items():
        full.add_sequence(k, prompt=list(p))
    # a and b prefill together; then c joins while a and b decode (a mixed batch)
    out = full.forward([SeqChunk("a", 0, 3), SeqChunk("b", 0, 12)], np.concatenate([prompts["a"], prompts["b"]]))
    got = {s.seq_id: [s.token] for s in out}
    chunks = [SeqChunk("a", 3, 1), SeqChunk("b", 12, 1), SeqChunk("c", 0, 7)]
    out = full.forward(chunks, np.concatenate([[got["a"][-1]], [got["b"][-1]], prompts["c"]]).astype(np.int32))
    got["c"] = []
    for s in out:
        got[s.seq_id].append(s.token)
    for _ in range(5):  # batched decode of three sequences at different offsets
        ids = sorted(got, key=lambda k: -len(got[k]))
        ids = [k for k in ids if len(got[k]) < 6]
        chunks = [SeqChunk(k, full.seqs[k].length, 1) for k in ids]
        out = full.forward(chunks, np.array([got[k][-1] for k in ids], np.int32))
        for s in out:
            got[s.seq_id].append(s.token)
    assert full.cache_nbytes() > 0
    for k in prompts:
        assert got[k] == alone[k], k
        full.free_sequence(k)
    assert full.cache_nbytes() == 0 and full.num_sequences == 0


def decode_alone(shard, prompt, n, seq="alone"):
    """Greedy tokens and each step's logits of one sequence decoded by itself."""
    shard.add_sequence(seq)
    x, off, toks, rows = np.asarray(prompt, np.int32), 0, [], []
    for _ in range(n):
        rows.append(shard.logits([SeqChunk(seq, off, len(x))], x)[-1])
        off += len(x)
        toks.append(int(rows[-1].argmax()))
        x = np.array([toks[-1]], np.int32)
    shard.free_sequence(seq)
    return toks, np.stack(rows)


def test_batched_decode_joins_and_leaves(tmp_path):
    # sequences of different lengths join (prefilling beside a decode step) and leave mid-way; every
    # step is one batch; each sequence's tokens and logits must be those it gets decoded alone. A
    # small pool step makes the rows grow, get reused by a newcomer (a batch of non-adjacent slots)
    # and shrink while the batch runs
    tiny_model("llama", tmp_path)
    shard = TorchShard(open_checkpoint(tmp_path), 0, 3, "float32")
    shard.pool.step = 4
    rng = np.random.default_rng(7)
    prompts = {k: rng.integers(0, 128, n).astype(np.int32) for k, n in zip("abcde", (5, 11, 3, 8, 2))}
    steps = {"a": 14, "b": 4, "c": 9, "d": 6, "e": 5}
    alone = {k: decode_alone(shard, p, steps[k]) for k, p in prompts.items()}
    joins = {0: "ab", 2: "c", 5: "d", 6: "e"}  # step -> sequences that start then
    toks: dict[str, list[int]] = {}
    rows: dict[str, list[np.ndarray]] = {}
    sizes = []
    for t in range(14):
        chunks, xs = [], []
        for k in joins.get(t, ""):
            shard.add_sequence(k)
            toks[k], rows[k] = [], []
            chunks.append(SeqChunk(k, 0, len(prompts[k])))
            xs.append(prompts[k])
        for k in [k for k in toks if 0 < len(toks[k]) < steps[k]]:
            chunks.append(SeqChunk(k, shard.seqs[k].length, 1))
            xs.append(np.array([toks[k][-1]], np.int32))
        chunks.sort(key=lambda c: c.seq_id, reverse=t % 2 == 1)  # the batch's order is the caller's
        xs = [prompts[c.seq_id] if c.offset == 0 else np.array([toks[c.seq_id][-1]], np.int32) for c in chunks]
        out = shard.logits(chunks, np.concatenate(xs))
        ends = np.cumsum([c.length for c in chunks]) - 1
        for c, e in zip(chunks, ends):
            rows[c.seq_id].append(out[e])
            toks[c.seq_id].append(int(out[e].argmax()))
            if len(toks[c.seq_id]) == steps[c.seq_id]:
                shard.free_sequence(c.seq_id)  # it leaves; its slot goes to the next newcomer
        sizes.append(shard.cache_nbytes())
    for k in prompts:
        assert toks[k] == alone[k][0], k
        np.testing.assert_allclose(np.stack(rows[k]), alone[k][1], atol=1e-5, rtol=1e-5)
    assert max(sizes) > sizes[-2] > 0 and sizes[-1] == 0  # grown with the batch, shrunk, then gone
    assert shard.num_sequences == 0 and shard.pool.lens == []


def test_batched_attention_over_the_pool(tmp_path):
    # rows of adjacent slots, in any order, attend over a view of the pool; others gather; each row
    # sees exactly its own sequence's keys and values, as attention over that sequence alone
    import torch.nn.functional as F

    from backends.torch.model import StepKV

    tiny_model("mistral", tmp_path)
    pool = TorchShard(open_checkpoint(tmp_path), 0, 1, "float32").pool
    assert [pool.alloc() for _ in range(3)] == [0, 1, 2] and pool.capacity == pool.step
    torch.manual_seed(0)
    for slots, pos, gather, perm in (([0, 1, 2], [4, 0, 9], False, False), ([2, 0, 1], [11, 5, 2], False, True),
                                      ([2, 0], [12, 6], True, False)):
        assert pool.k is not None and pool.v is not None
        pool.k.normal_(), pool.v.normal_()
        B = len(slots)
        q, k, v = torch.randn(B, 4, 1, 16), torch.randn(B, 2, 1, 16), torch.randn(B, 2, 1, 16)
        kv = StepKV(pool, slots, torch.tensor(pos)[:, None])
        assert kv.gather == gather and (kv.perm is not None) == perm
        got = kv.attend(0, q, k, v, gqa=True)
        for i, (s, p) in enumerate(zip(slots, pos)):
            assert torch.equal(pool.k[0, s, :, p], k[i, :, 0]) and pool.lens[s] == p + 1
            want = F.scaled_dot_product_attention(q[i:i + 1], pool.k[0, s:s + 1, :, :p + 1], pool.v[0, s:s + 1, :, :p + 1],
                                                  enable_gqa=True)
            torch.testing.assert_close(got[i:i + 1], want)
    pool.free(1)
    assert pool.alloc() == 1  # the lowest free slot: live rows stay adjacent


def test_split_matches_single(gguf_ck, full):
    want = greedy([full], PROMPT, 5)
    for cuts in [(1, 29), (10, 20)]:
        bounds = [0, *cuts, 30]
        shards = [TorchShard(gguf_ck, a, b, "float32", wire_dtype="float32") for a, b in zip(bounds, bounds[1:])]
        assert greedy(shards, PROMPT, 5) == want, cuts
        assert shards[1].weight_nbytes() < full.weight_nbytes() * (cuts[1] - cuts[0] + 1) / 30


def test_bf16_wire_runs(gguf_ck):
    a, b = TorchShard(gguf_ck, 0, 2, "float32", wire_dtype="bfloat16"), TorchShard(gguf_ck, 2, 30, "float32")
    a.add_sequence("s")
    h = a.forward([SeqChunk("s", 0, 4)], PROMPT[:4])
    assert h.dtype == "bfloat16" and h.shape == (4, 576) and h.nbytes == 4 * 576 * 2
    b.add_sequence("s")
    assert len(b.forward([SeqChunk("s", 0, 4)], Hidden(bytes(h.data), h.dtype, h.shape))) == 1


def test_shape_mismatch_names_tensor(tmp_path):
    tiny_model("mistral", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"model\.safetensors.*mlp\.(gate|up|down)_proj\.weight"):
        TorchShard(open_checkpoint(tmp_path), 1, 3, "float32")


# ---------------------------------------------------------------- sampling


def sample_run(full, params, n=4, seq="p"):
    full.add_sequence(seq, params, prompt=list(PROMPT))
    out, x = [], PROMPT
    for _ in range(n):
        s = full.forward([SeqChunk(seq, full.seqs[seq].length, len(x))], x)[0]
        out.append(s)
        x = np.array([s.token], np.int32)
    full.free_sequence(seq)
    return out


def test_sampling_on_model(full):
    hot = SamplingParams(temperature=1.5, seed=7, logprobs=5)
    a, b = [s.token for s in sample_run(full, hot)], [s.token for s in sample_run(full, hot)]
    assert a == b
    g = sample_run(full, SamplingParams(logprobs=3))
    assert [s.token for s in sample_run(full, SamplingParams(temperature=1.0, top_k=1, seed=3))] == \
        [s.token for s in g]
    for s in g:
        assert s.top_logprobs[0][0] == s.token and s.top_logprobs[0][1] == pytest.approx(s.logprob)
        lps = [lp for _, lp in s.top_logprobs]
        assert lps == sorted(lps, reverse=True) and 0 < sum(np.exp(lps)) <= 1 + 1e-5


def test_sampler_filters_and_penalties():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    st = SeqState(SamplingParams(), history=[0, 3, 3])

    def draws(p, n=200):
        st.params, st.rng = p, make_generator(p)
        f = make_sampler(p)
        return {f(logits, st)[0] for _ in range(n)}

    assert draws(SamplingParams(temperature=1.0, seed=1, top_k=2)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0, seed=1, top_p=0.5)) == {0}
    assert draws(SamplingParams(temperature=1.0, seed=1, min_p=0.3)) == {0, 1}
    assert len(draws(SamplingParams(temperature=5.0, seed=1))) == 5
    # repetition penalty: positive logits divided, negative multiplied (HF)
    tok, lp, _ = make_sampler(SamplingParams(repetition_penalty=10.0))(logits, st)
    assert tok == 1 and lp == pytest.approx(float(logits.log_softmax(-1)[1]))
    # frequency penalty counts repeats; presence counts once (OpenAI)
    bump = torch.tensor([0.0, 0.0, 0.0, 1.9, -9.0])
    assert make_sampler(SamplingParams(presence_penalty=1.0))(bump, st)[0] == 3
    assert make_sampler(SamplingParams(frequency_penalty=1.0))(bump, st)[0] == 1
    # only the last penalty_context tokens count
    assert make_sampler(SamplingParams(frequency_penalty=2.0, penalty_context=1))(bump, SeqState(
        SamplingParams(), history=[3, 0]))[0] == 3


def test_resolve_device_and_its_dtype() -> None:
    from backends.errors import RequestError
    from backends.shard import cpu_has_bf16, default_dtype, resolve_device

    auto = resolve_device("torch", None)
    assert auto == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("torch", "cpu") == "cpu" and resolve_device("mlx", "auto") is None
    assert default_dtype("torch", None, "cuda:1") == "bfloat16"  # type: ignore[arg-type]
    # a CPU computes in bfloat16 where it does so natively (AVX512-BF16, AMX), else float32
    want = "bfloat16" if cpu_has_bf16() else "float32"
    assert default_dtype("torch", None, "cpu") == want  # type: ignore[arg-type]
    assert default_dtype("torch", None, "mps") == "float32"  # type: ignore[arg-type]
    for backend, dev in (("torch", "tpu"), ("mlx", "cuda"), ("mlx", "mps")):
        with pytest.raises(RequestError):
            resolve_device(backend, dev)
    if not torch.cuda.is_available():
        with pytest.raises(RequestError, match="no CUDA GPU"):
            resolve_device("torch", "cuda:0")
