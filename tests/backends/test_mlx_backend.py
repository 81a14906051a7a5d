"""MLX backend: reference equivalence with mlx_lm, caches, batching, splits, sampling, memory.

On a Linux CPU, MLX's float16/bfloat16 quantized kernels are ~50x slower than float32, so the
fast tests compare float32 runs (ours vs mlx_lm on a float32 conversion); the float16
comparison is marked slow (and short on CPU).
"""

from __future__ import annotations

import contextlib
import copy
import time

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from backends.errors import ModelError  # noqa: E402
from backends.sampling import SamplingParams  # noqa: E402
from backends.shard import Sample, SeqChunk  # noqa: E402
from backends.wire import Hidden  # noqa: E402

N = 64  # greedy tokens compared against mlx_lm
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Count from 1 to 20.",
    "Explain in two sentences why the sky is blue.",
]
SHORT = ["The capital of France is", "Hello", "def fibonacci(n):"]
S0, S1, S2 = 4, 5, 6  # their indices in `prompts`


@pytest.fixture(scope="session")
def mlx_dir(embedded_path, tmp_path_factory):
    from backends.convert import gguf_to_mlx

    return gguf_to_mlx(embedded_path, tmp_path_factory.mktemp("mlx") / "smollm2-f32", dtype="float32")


@pytest.fixture(scope="session")
def reference(mlx_dir):
    import mlx_lm

    model, tok = mlx_lm.load(str(mlx_dir))
    return model, tok


@pytest.fixture(scope="session")
def prompts(reference):
    _, tok = reference
    ids = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)
           for c in CHATS]
    # short raw prompts (MLX prefill on a CPU costs about as much per token as decoding)
    return ids + [tok.encode(t) for t in SHORT]


def mlx_lm_greedy(model, ids, n):
    from mlx_lm.generate import generate_step

    return [t for t, _ in zip((y for y, _ in generate_step(mx.array(ids), model, max_tokens=n)), range(n))]


@pytest.fixture(scope="session")
def ref_tokens(reference, prompts):
    model, _ = reference
    out = {0: mlx_lm_greedy(model, prompts[0], N // 2)}  # N in the slow tests
    out.update({i: mlx_lm_greedy(model, prompts[i], 10) for i in (S0, S1, S2)})
    return out


@pytest.fixture(scope="session")
def full(embedded):
    from backends.mlx.shard import MLXShard

    return MLXShard(embedded, 0, 30, "float32")


def generate(stages, ids, n, seq="s", params=None):
    """Greedy (or `params`) decoding through a chain of shards: prompt chunk, then a token per step."""
    for s in stages:
        s.add_sequence(seq, params, prompt=ids)
    out, x, pos = [], np.array(ids, np.int32), 0
    try:
        for _ in range(n):
            chunk = [SeqChunk(seq, pos, len(x))]
            h = x
            for s in stages:
                h = s.forward(chunk, h)
            pos += len(x)
            out.append(h[0].token)
            x = np.array([h[0].token], np.int32)
    finally:
        for s in stages:
            s.free_sequence(seq)
    return out


# ---------------------------------------------------------------- reference equivalence


@pytest.mark.parametrize("i", [0, S0])
def test_matches_mlx_lm_greedy(full, prompts, ref_tokens, i):
    n = len(ref_tokens[i])
    assert generate([full], prompts[i], n) == ref_tokens[i]


@pytest.mark.slow
@pytest.mark.parametrize("i", [1, 3])
def test_matches_mlx_lm_greedy_more_prompts(full, reference, prompts, i):
    assert generate([full], prompts[i], N) == mlx_lm_greedy(reference[0], prompts[i], N)


def _metal() -> bool:
    import mlx.core as mx

    return mx.metal.is_available()


@pytest.mark.slow
@pytest.mark.skipif(not _metal(), reason="float16 needs Metal: MLX's CPU half kernels take ~10 s a token")
def test_matches_mlx_lm_float16(embedded, embedded_path, prompts, tmp_path_factory):
    """Same float16 arithmetic as mlx_lm (fast on Metal; MLX's CPU float16 kernels crawl)."""
    from mlx_lm.utils import load_model

    from backends.convert import gguf_to_mlx
    from backends.mlx.shard import MLXShard

    d = gguf_to_mlx(embedded_path, tmp_path_factory.mktemp("mlx16") / "f16", "float16", tokenizer=False)
    model, _ = load_model(d)
    gpu = mx.metal.is_available()
    ids, n = (prompts[0], N) if gpu else (prompts[S0], 4)
    shard = MLXShard(embedded, 0, 30, "float16")
    assert generate([shard], ids, n) == mlx_lm_greedy(model, ids, n)


def test_converted_dir_loads_in_our_reader(mlx_dir, prompts, ref_tokens):
    from backends.mlx.shard import MLXShard
    from backends.weights import open_checkpoint

    ck = open_checkpoint(mlx_dir)
    assert ck.kind == "mlx"
    emb, q = ck.get("model.embed_tokens.weight").affine(), ck.get("model.layers.0.self_attn.q_proj.weight").affine()
    assert (emb.bits, emb.group_size, q.bits, q.group_size) == (8, 32, 4, 32)
    shard = MLXShard(ck, 0, 30, "float32")
    assert generate([shard], prompts[S0], 10) == ref_tokens[S0]


# ---------------------------------------------------------------- cache, batching, splits


def test_incremental_equals_full_pass(full, prompts):
    ids = prompts[S0]
    gen = generate([full], ids, 6)
    seq = ids + gen
    full.add_sequence("whole")
    whole = full.logits([SeqChunk("whole", 0, len(seq))], np.array(seq, np.int32))
    full.free_sequence("whole")
    full.add_sequence("inc")
    parts = [full.logits([SeqChunk("inc", 0, len(ids))], np.array(ids, np.int32))]
    for j, t in enumerate(gen):
        parts.append(full.logits([SeqChunk("inc", len(ids) + j, 1)], np.array([t], np.int32)))
    full.free_sequence("inc")
    inc = np.concatenate(parts)
    assert whole.dtype == np.float32 and whole.shape == (len(seq), full.config.vocab_size)
    np.testing.assert_allclose(inc, whole, atol=2e-3, rtol=1e-3)
    assert (inc.argmax(-1) == whole.argmax(-1)).all()
    assert whole[len(ids) - 1:-1].argmax(-1).tolist() == gen


def test_batch_of_different_lengths(full, prompts, ref_tokens):
    """Prefill three prompts in one call, decode them together, and add a fourth mid-way."""
    steps = 10
    seqs = {"a": prompts[S0], "b": prompts[S1], "c": prompts[S2]}
    alone = {"a": ref_tokens[S0], "b": ref_tokens[S1], "c": ref_tokens[S2]}
    for s, ids in seqs.items():
        full.add_sequence(s, prompt=ids)
    got = {s: [] for s in seqs}
    pos = {s: 0 for s in seqs}
    nxt = dict(seqs)
    try:
        for step in range(steps):
            if step == 3:  # a late arrival: its prefill shares a call with the others' decode
                full.add_sequence("d", prompt=prompts[S2])
                seqs["d"], got["d"], pos["d"], nxt["d"] = prompts[S2], [], 0, prompts[S2]
                alone["d"] = ref_tokens[S2]
            chunks = [SeqChunk(s, pos[s], len(nxt[s])) for s in seqs]
            x = np.concatenate([np.array(nxt[s], np.int32) for s in seqs])
            out = full.forward(chunks, x)
            assert [o.seq_id for o in out] == list(seqs)
            for o in out:
                pos[o.seq_id] += len(nxt[o.seq_id])
                got[o.seq_id].append(o.token)
                nxt[o.seq_id] = [o.token]
        assert full.cache_nbytes() > 0
    finally:
        for s in seqs:
            full.free_sequence(s)
    for s in seqs:
        assert got[s] == alone[s][: len(got[s])], s
    assert full.num_sequences == 0 and full.cache_nbytes() == 0


# ---------------------------------------------------------------- the step ahead (first-and-last slice)


@contextlib.contextmanager
def synchronous(shard):
    """The shard with the step ahead off: each step evaluated before it returns (the old path)."""
    shard.speculate = False
    try:
        yield shard
    finally:
        shard.speculate = True


def _steps(shard, seq, ids, tokens, params=None):
    """A prompt, then `tokens` one per call, whatever the shard draws: every call's Sample."""
    shard.add_sequence(seq, params, prompt=ids)
    try:
        out = [shard.forward([SeqChunk(seq, 0, len(ids))], np.array(ids, np.int32))[0]]
        for i, t in enumerate(tokens):
            out.append(shard.forward([SeqChunk(seq, len(ids) + i, 1)], np.array([t], np.int32))[0])
        # then logits for one more token (a call that must roll a step ahead back)
        lg = shard.logits([SeqChunk(seq, len(ids) + len(tokens), 1)], np.array([out[-1].token], np.int32))
    finally:
        shard.free_sequence(seq)
    return out, lg


@pytest.mark.slow
def test_step_ahead_equals_synchronous_path_32_tokens(full, prompts, ref_tokens):
    used = full.ahead_used
    ahead = generate([full], prompts[S0], 32)
    assert full.ahead_used - used == 31  # every step after the prompt came from the step ahead
    with synchronous(full):
        assert generate([full], prompts[S0], 32) == ahead
    assert ahead[:10] == ref_tokens[S0]


def test_step_ahead_used_and_a_different_token_stays_exact(full, prompts):
    """A call that brings the drawn token is answered by the step computed ahead; one that brings
    another token (or asks for logits) has that step trimmed from the cache: answers stay exact."""
    ids, p = prompts[S1], SamplingParams(logprobs=3)
    other = [7, 1000, 42, 42, 9]  # tokens the model did not draw
    with synchronous(full):
        ref, lref = _steps(full, "r", ids, other, p)
    used, dropped = full.ahead_used, full.ahead_dropped
    got, lg = _steps(full, "r", ids, other, p)
    assert full.ahead_dropped - dropped == len(other) + 1 and full.ahead_used == used
    assert [(s.token, s.top_logprobs) for s in got] == [(s.token, s.top_logprobs) for s in ref]
    assert [s.logprob for s in got] == pytest.approx([s.logprob for s in ref], abs=1e-6)
    np.testing.assert_array_equal(lg, lref)
    # the drawn tokens after a miss: the steps ahead are used again, with the same answers
    full.add_sequence("r", prompt=ids + other)
    try:
        at = len(ids) + len(other)
        drawn = [full.forward([SeqChunk("r", 0, at)], np.array(ids + other, np.int32))[0].token]
        for i in range(3):
            drawn.append(full.forward([SeqChunk("r", at + i, 1)], np.array([drawn[-1]], np.int32))[0].token)
            assert full.caches["r"][0].offset == full.position("r") + 1  # the next step, ahead
    finally:
        full.free_sequence("r")
    assert full.ahead_used - used == 3 and full.ahead == {}
    with synchronous(full):
        again, _ = _steps(full, "r", ids + other, drawn[:-1])
    assert [s.token for s in again] == drawn


def test_step_ahead_batch_with_joins_leaves_and_frees(full, prompts, ref_tokens):
    """Three sequences decode together; one joins mid-way (its prefill beside their decode), one
    is freed while its step ahead is pending, one sits a call out: every token equals mlx_lm's."""
    seqs = {"a": prompts[S0], "b": prompts[S1], "c": prompts[S2]}
    alone = {"a": ref_tokens[S0], "b": ref_tokens[S1], "c": ref_tokens[S2], "d": ref_tokens[S1]}
    for s, ids in seqs.items():
        full.add_sequence(s, prompt=ids)
    got: dict[str, list[int]] = {s: [] for s in alone}
    pos = {s: 0 for s in alone}
    nxt = dict(seqs)
    used = full.ahead_used
    try:
        for step in range(9):
            if step == 2:  # a late arrival
                full.add_sequence("d", prompt=prompts[S1])
                seqs["d"], nxt["d"] = prompts[S1], prompts[S1]
            if step == 4:  # a sequence that ends while its next step is computed ahead
                assert "b" in full.ahead
                full.free_sequence("b")
                del seqs["b"]
                assert "b" not in full.ahead and "b" not in full.caches
            run = [s for s in seqs if not (step == 6 and s == "c")]
            out = full.forward([SeqChunk(s, pos[s], len(nxt[s])) for s in run],
                               np.concatenate([np.array(nxt[s], np.int32) for s in run]))
            assert [o.seq_id for o in out] == run
            for o in out:
                pos[o.seq_id] += len(nxt[o.seq_id])
                got[o.seq_id].append(o.token)
                nxt[o.seq_id] = [o.token]
        assert full.ahead_used - used == 24  # every decode row, c's after its pause too
    finally:
        for s in list(seqs):
            full.free_sequence(s)
    for s, toks in got.items():
        assert toks == alone[s][: len(toks)], s
    assert full.num_sequences == 0 and full.cache_nbytes() == 0 and full.ahead == {}


def test_penalties_count_the_pending_token():
    """A step ahead samples before its previous token is in history: the sampler takes it apart."""
    from backends.mlx.sampling import make_sampler
    from backends.shard import SeqState

    p = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, penalty_context=3, logprobs=0)
    logits = mx.array([[0.0, 3.0, 2.5, 1.0, 0.5]])
    drawn = make_sampler(p)(logits, SeqState(p, [0, 3, 4, 1]))  # 1 was drawn last: penalised
    ahead = make_sampler(p)(logits, SeqState(p, [0, 3, 4]), mx.array([1], dtype=mx.uint32))
    plain = make_sampler(p)(logits, SeqState(p, [0, 3, 4]))
    assert drawn.token.item() == ahead.token.item() == 2 and plain.token.item() == 1
    assert ahead.logprob.item() == pytest.approx(drawn.logprob.item())  # of the raw distribution


@pytest.mark.slow
def test_step_ahead_seeded_sampling_with_penalties(full, prompts):
    """The step ahead draws with the key of its position and counts the token drawn just before
    in the penalties: the same draws as the synchronous path."""
    p = SamplingParams(temperature=0.8, top_k=20, seed=7, repetition_penalty=1.3,
                       presence_penalty=0.5, frequency_penalty=0.5, penalty_context=4)
    with synchronous(full):
        ref = generate([full], prompts[S2], 8, params=p)
    used = full.ahead_used
    assert generate([full], prompts[S2], 8, params=p) == ref
    assert full.ahead_used - used == 7


@pytest.mark.parametrize("bounds", [(0, 1, 29, 30), (0, 10, 20, 30)])
def test_split_equals_one_slice(embedded, prompts, ref_tokens, bounds):
    from backends.mlx.shard import MLXShard

    stages = [MLXShard(embedded, a, b, "float32") for a, b in zip(bounds, bounds[1:])]
    assert [s.is_first for s in stages] == [True, False, False]
    assert [s.is_last for s in stages] == [False, False, True]
    assert generate(stages, prompts[S0], 8) == ref_tokens[S0][:8]


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_half_precision_wire(embedded, full, prompts, wire):
    from backends.mlx.shard import MLXShard

    a, b = MLXShard(embedded, 0, 15, "float32", wire), MLXShard(embedded, 15, 30, "float32")
    ids = prompts[S0]
    a.add_sequence("w")
    h = a.forward([SeqChunk("w", 0, len(ids))], np.array(ids, np.int32))
    assert isinstance(h, Hidden) and h.dtype == wire and h.shape == (len(ids), 576)
    assert h.nbytes == len(ids) * 576 * 2
    ref = MLXShard(embedded, 0, 15, "float32")
    ref.add_sequence("w")
    h32 = ref.forward([SeqChunk("w", 0, len(ids))], np.array(ids, np.int32))
    np.testing.assert_allclose(h.numpy(), h32.numpy(), rtol=2e-2, atol=2e-2 * np.abs(h32.numpy()).max())
    b.add_sequence("w")
    s = b.forward([SeqChunk("w", 0, len(ids))], h)
    assert isinstance(s[0], Sample) and 0 <= s[0].token < full.config.vocab_size


# ---------------------------------------------------------------- sampling


@pytest.mark.slow  # keeps make test-fast under 3 minutes; CI runs it
def test_seeded_sampling_reproducible_and_independent(full, prompts):
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    ids = prompts[S2]
    alone = generate([full], ids, 6, params=p)
    assert generate([full], ids, 6, params=p) == alone
    # the same seed inside a batch with another seeded sequence: the same draws
    full.add_sequence("x", p, prompt=ids)
    full.add_sequence("y", SamplingParams(temperature=1.0, seed=99), prompt=prompts[S1])
    got, nx, ny, px, py = [], ids, prompts[S1], 0, 0
    try:
        for _ in range(6):
            out = full.forward([SeqChunk("x", px, len(nx)), SeqChunk("y", py, len(ny))],
                               np.array(nx + ny, np.int32))
            px, py = px + len(nx), py + len(ny)
            got.append(out[0].token)
            nx, ny = [out[0].token], [out[1].token]
    finally:
        full.free_sequence("x"), full.free_sequence("y")
    assert got == alone
    other = generate([full], ids, 6, params=SamplingParams(temperature=1.0, top_p=0.95, seed=4321))
    assert other != alone


def test_top_k_one_is_greedy(full, prompts, ref_tokens):
    got = generate([full], prompts[S1], 10, params=SamplingParams(temperature=0.9, top_k=1, seed=3))
    assert got == ref_tokens[S1][:10]


def test_logprobs(full, prompts):
    ids = prompts[S0]
    full.add_sequence("lp", SamplingParams(logprobs=5), prompt=ids)
    s = full.forward([SeqChunk("lp", 0, len(ids))], np.array(ids, np.int32))[0]
    full.free_sequence("lp")
    full.add_sequence("raw")
    logits = full.logits([SeqChunk("raw", 0, len(ids))], np.array(ids, np.int32))[-1].astype(np.float64)
    full.free_sequence("raw")
    lsm = logits - (np.log(np.exp(logits - logits.max()).sum()) + logits.max())
    assert s.token == int(logits.argmax())
    assert s.logprob == pytest.approx(lsm[s.token], abs=1e-3) and s.logprob <= 0
    assert len(s.top_logprobs) == 5
    assert s.top_logprobs[0] == (s.token, pytest.approx(s.logprob, abs=1e-6))
    vals = [v for _, v in s.top_logprobs]
    assert vals == sorted(vals, reverse=True)
    assert [t for t, _ in s.top_logprobs] == np.argsort(-lsm)[:5].tolist()
    # penalties are applied before choosing, but logprobs stay those of the raw distribution
    full.add_sequence("pen", SamplingParams(repetition_penalty=1.3, presence_penalty=1.0,
                                            frequency_penalty=0.5), prompt=ids)
    p = full.forward([SeqChunk("pen", 0, len(ids))], np.array(ids, np.int32))[0]
    full.free_sequence("pen")
    assert p.logprob == pytest.approx(lsm[p.token], abs=1e-3)


# ---------------------------------------------------------------- loading and memory


def _copy(ck):
    from backends.weights import Checkpoint

    return Checkpoint(ck.path, ck.config, {k: copy.copy(v) for k, v in ck.tensors.items()}, ck.kind)


def test_slice_loads_only_its_tensors_and_less_memory(embedded, full):
    from backends.mlx.shard import MLXShard

    ck = _copy(embedded)
    read = []
    real_get = ck.get
    ck.get = lambda name: read.append(name) or real_get(name)
    mid = MLXShard(ck, 10, 20, "float32")
    assert read and all(n.startswith("model.layers.") and 10 <= int(n.split(".")[2]) < 20 for n in read)
    assert mid.weight_nbytes() < 0.45 * full.weight_nbytes()
    assert mid.weight_nbytes() < 0.4 * (full.weight_nbytes() - 49152 * 576 * (1 + 8 / 32))
    # quantized layers stay quantized: ~4.5 bits per weight plus fp32 scales/biases
    assert mid.weight_nbytes() < 10 * full.config.layer_bytes(1.0)


def test_weight_format_says_what_stays_packed(embedded, full, tmp_path):
    """For the peers' table: Q4_1 layers and a Q8_0 tied head stay packed; dense weights say their dtype."""
    from backends.mlx.shard import MLXShard

    assert full.weight_format == "int4/g32+int8/g32"
    assert MLXShard(embedded, 0, 1, "float32").weight_format == "int4/g32"  # no head on a first slice


def test_shape_mismatch_is_a_model_error(embedded):
    from backends.mlx.shard import MLXShard

    ck = _copy(embedded)
    ck.tensors["model.layers.5.mlp.up_proj.weight"].shape = (1000, 576)
    with pytest.raises(ModelError, match=r"model\.layers\.5\.mlp\.up_proj\.weight"):
        MLXShard(ck, 5, 6, "float32")
    MLXShard(ck, 6, 7, "float32")  # other slices do not care


# ---------------------------------------------------------------- other shapes (tiny random weights)


def _tiny_dir(path, model_type: str, tied: bool):
    import json

    h, i, heads, kv, layers, vocab = 64, 128, 4, 2, 3, 256
    hd = h // heads
    cfg = {"model_type": model_type, "hidden_size": h, "intermediate_size": i,
           "num_attention_heads": heads, "num_key_value_heads": kv, "num_hidden_layers": layers,
           "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "max_position_embeddings": 512, "tie_word_embeddings": tied}
    rng = np.random.default_rng(0)
    w = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not tied:
        w["lm_head.weight"] = (vocab, h)
    for n in range(layers):
        p = f"model.layers.{n}."
        w.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                  p + "self_attn.q_proj.weight": (heads * hd, h), p + "self_attn.k_proj.weight": (kv * hd, h),
                  p + "self_attn.v_proj.weight": (kv * hd, h), p + "self_attn.o_proj.weight": (h, heads * hd),
                  p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                  p + "mlp.down_proj.weight": (h, i)})
        if model_type == "qwen2":
            w.update({p + "self_attn.q_proj.bias": (heads * hd,), p + "self_attn.k_proj.bias": (kv * hd,),
                      p + "self_attn.v_proj.bias": (kv * hd,)})
    arrays = {k: mx.array((1.0 + 0.1 * rng.standard_normal(s)) if k.endswith("norm.weight")
                          else 0.08 * rng.standard_normal(s), dtype=mx.float32) for k, s in w.items()}
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), arrays, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("qwen2", True), ("mistral", False)])
def test_tiny_models_bit_identical_to_mlx_lm(tmp_path, model_type, tied):
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    from backends.mlx.shard import MLXShard
    from backends.weights import open_checkpoint

    d = _tiny_dir(tmp_path / model_type, model_type, tied)
    ref, _ = load_model(d)
    ck = open_checkpoint(d)
    ours = MLXShard(ck, 0, 3, "float32")
    assert ours.weight_format == "float32"
    prompts = {"a": [1, 5, 9, 13, 200, 7], "b": [3], "c": [8, 8, 100, 4]}
    # prefill: one chunk per sequence in one call
    for s, ids in prompts.items():
        ours.add_sequence(s)
    x = np.concatenate([np.array(v, np.int32) for v in prompts.values()])
    chunks, pos = [], {}
    for s, ids in prompts.items():
        chunks.append(SeqChunk(s, 0, len(ids)))
        pos[s] = len(ids)
    got = ours.logits(chunks, x)
    caches = {s: make_prompt_cache(ref) for s in prompts}
    want = np.concatenate([np.array(ref(mx.array([ids]), cache=caches[s])[0]) for s, ids in prompts.items()])
    np.testing.assert_array_equal(got, want)
    # batched decode (several length-1 chunks in one forward) against mlx_lm one sequence at a time
    nxt = {s: int(np.argmax(got[sum(map(len, list(prompts.values())[:k + 1])) - 1]))
           for k, s in enumerate(prompts)}
    for _ in range(3):
        got = ours.logits([SeqChunk(s, pos[s], 1) for s in prompts],
                          np.array([nxt[s] for s in prompts], np.int32))
        want = np.concatenate([np.array(ref(mx.array([[nxt[s]]]), cache=caches[s])[0]) for s in prompts])
        np.testing.assert_array_equal(got, want)
        for k, s in enumerate(prompts):
            pos[s] += 1
            nxt[s] = int(np.argmax(got[k]))


# ---------------------------------------------------------------- through a real peer


@pytest.mark.slow
def test_one_mlx_peer_serves_concurrent_streams_with_the_step_ahead(embedded_path, embedded, tokenizer):
    """One `together join --backend mlx` peer (its compute thread, batching, releases): concurrent
    greedy answers of different lengths equal one process's synchronous answers, and every
    sequence and its cache are freed at the end (steps ahead included)."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from backends.pipeline import Pipeline, SliceSpec
    from tests.mesh.cluster import Cluster

    # short raw prompts: MLX's CPU prefill is slow, and the scheduler's deadline counts on it
    jobs = [(t, n) for t, n in zip(SHORT, (12, 5, 8))]
    pipe = Pipeline.load(embedded, [SliceSpec("mlx", 0, 30)], dtype="float32")
    pipe.shards[0].speculate = False
    want = ["".join(d.text for d in pipe.generate(tokenizer.encode(t), SamplingParams(max_tokens=n), tokenizer))
            for t, n in jobs]
    c = Cluster(str(embedded_path))
    try:
        peer = c.add("m", "--backend", "mlx", "--dtype", "float32", "--no-mdns", api=True)
        c.wait_ready(peer, stages=1)
        oa = OpenAI(base_url=f"http://127.0.0.1:{peer.api_port}/v1", api_key="unused", max_retries=0,
                    timeout=120)

        def ask(job):
            r = oa.completions.create(model="smollm2-135m", temperature=0, max_tokens=job[1], prompt=job[0])
            return r.choices[0].text

        with ThreadPoolExecutor(len(jobs)) as ex:
            got = list(ex.map(ask, jobs))
        assert got == want
        time.sleep(0.5)
        st = c.status(peer)
        assert (st.sequences, st.cache_bytes) == (0, 0)
    finally:
        c.stop()
