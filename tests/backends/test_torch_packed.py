"""Packed int4 weights in the torch backend (backends/torch/quant.py) against the dequantized path:
the same projections within bfloat16 rounding, the same greedy tokens on the embedded model, and
splits, batches and LoRA adapters on top of packed layers."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends.shard import SeqChunk, estimate_layer_bytes  # noqa: E402
from backends.torch.lora import apply_adapter  # noqa: E402
from backends.torch.quant import DENSE_ROWS, PackedEmbedding, PackedLinear  # noqa: E402
from backends.torch.shard import TorchShard  # noqa: E402
from backends.weights import Affine, _gguf_affine, _pack, open_checkpoint  # noqa: E402
from tests.helpers import full_logits, greedy  # noqa: E402

PROMPT = np.array([1, 9690, 28, 1178, 314, 253, 1345, 282, 1148, 30, 198, 2], np.int32)
BF16_EPS = 2.0 ** -8  # bfloat16 keeps 8 significant bits


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small shared machines: see test_torch_backend.py
    yield
    torch.set_num_threads(n)


def gguf_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> Affine:
    """Random GGUF blocks of `kind` (fp16 scales, random quants), read as the loader reads them."""
    nb = cols // 32
    d = (0.01 + 0.02 * rng.random((rows, nb, 1))).astype(np.float16).view(np.uint8)
    m = (-0.1 * rng.random((rows, nb, 1))).astype(np.float16).view(np.uint8)
    if kind == "Q8_0":
        qs = rng.integers(0, 256, (rows, nb, 32), dtype=np.uint8)
        return _gguf_affine(kind, np.concatenate([d, qs], axis=2).reshape(rows, -1))
    qs = rng.integers(0, 256, (rows, nb, 16), dtype=np.uint8)
    parts = [d, qs] if kind == "Q4_0" else [d, m, qs]
    return _gguf_affine(kind, np.concatenate(parts, axis=2).reshape(rows, -1))


def mlx_groups(bits: int, group: int, rows: int, cols: int, rng: np.random.Generator) -> Affine:
    """Random MLX affine groups: w = scale * q + bias, q in [0, 2**bits)."""
    q = rng.integers(0, 2 ** bits, (rows, cols))
    s = (0.3 / 2 ** bits * (0.5 + rng.random((rows, cols // group)))).astype(np.float16)
    b = (-s.astype(np.float32) * (2 ** bits - 1) / 2 + 0.02 * rng.standard_normal(s.shape)).astype(np.float16)
    return Affine(_pack(q, bits), s, b, bits, group)


KINDS = {"Q4_0": lambda r, c, g: gguf_blocks("Q4_0", r, c, g), "Q4_1": lambda r, c, g: gguf_blocks("Q4_1", r, c, g),
         "Q8_0": lambda r, c, g: gguf_blocks("Q8_0", r, c, g), "mlx4/g64": lambda r, c, g: mlx_groups(4, 64, r, c, g),
         "mlx8/g64": lambda r, c, g: mlx_groups(8, 64, r, c, g), "mlx4/g128": lambda r, c, g: mlx_groups(4, 128, r, c, g)}


@pytest.fixture(scope="session")
def q4_kernel():
    """Our q4 kernel (backends/torch/kernels/q4.cpp), built on first use once per machine (~30 s of CPU,
    about a minute on a loaded 2-core machine); skipped on a CPU without AVX512-BF16 or a compiler."""
    from backends.torch import kernels

    if kernels.q4() is None:
        pytest.skip("the q4 kernel cannot build or run here (needs AVX512-BF16, g++ and ninja)")
    return "q4"


@pytest.fixture(params=["torch", "q4"])
def kernel(request):
    return request.getfixturevalue("q4_kernel") if request.param == "q4" else "torch"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_packed_linear_matches_dequantized(kind, kernel):
    rng = np.random.default_rng(0)
    a = KINDS[kind](192, 256, rng)
    w = torch.from_numpy(a.dequantize())  # the float32 reference weight
    bias = torch.randn(192)
    lin = PackedLinear(a, bias, kernel=kernel)
    assert lin.format == f"int{a.bits}/g{a.group_size}" and lin.kernel == kernel
    for rows in (1, 5, 11, DENSE_ROWS, 130):  # the kernel for decode (q4: tiles of 8 rows, every chunk)
        x = torch.randn(rows, 256).bfloat16()
        want = x.float() @ w.T + bias.bfloat16().float()
        bound = 2 * BF16_EPS * (x.float().abs() @ w.abs().T + bias.abs()) + 1e-3  # bf16 rounding's scale
        got = lin(x[None]).float()[0]
        assert got.shape == want.shape and bool(((got - want).abs() <= bound).all()), (rows, (got - want).abs().max())
    if kernel == "q4":  # exact scales and float32 sums: the exact product rounded once to bfloat16
        x = torch.randn(130, 256).bfloat16()
        want = x.float() @ w.T
        got = PackedLinear(a, kernel="q4")(x).float()
        assert (got == want.bfloat16().float()).float().mean() >= 0.99  # torch's kernel: ~0.5
        # the rest one ulp off (near ties), up to float32 sums (torch's kernel strays ~1e-3 |x||w| beyond that)
        assert ((got - want).abs() <= 2 ** -7 * want.abs() + 1e-5 * (x.float().abs() @ w.abs().T)).all()
    # the dequantized weight of a long chunk: the reference up to the kernel's bfloat16 scales and zeros
    assert ((lin.dense().float().T - w).abs() <= BF16_EPS * (w.abs() + w.abs().max())).all()


def test_packed_embedding_is_exact():
    a = gguf_blocks("Q8_0", 128, 64, np.random.default_rng(1))
    ids = torch.tensor([[5, 0, 127, 5]])
    got = PackedEmbedding(a, torch.bfloat16)(ids)
    assert torch.equal(got, torch.from_numpy(a.dequantize())[ids].bfloat16())


# ---------------------------------------------------------------- a tiny quantized checkpoint


def quantized_dir(path, kind: str, rng: np.random.Generator):
    """A random Qwen2-shaped model (q/k/v biases, tied embedding) stored MLX-quantized: layers in 4-bit
    groups like GGUF Q4_0 / Q4_1 (groups of 32) or MLX (64), the embedding in 8-bit groups."""
    from safetensors.numpy import save_file

    h, inter, heads, kv, hd, layers, vocab = 128, 256, 8, 4, 16, 3, 256
    g4 = 64 if kind == "mlx4" else 32
    cfg = {"model_type": "qwen2", "hidden_size": h, "intermediate_size": inter, "num_attention_heads": heads,
           "num_key_value_heads": kv, "head_dim": hd, "num_hidden_layers": layers, "vocab_size": vocab,
           "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": True,
           "quantization": {"group_size": g4, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}}
    arrays: dict[str, np.ndarray] = {"model.norm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)}

    def put(name: str, a: Affine) -> None:
        arrays[name + ".weight"], arrays[name + ".scales"], arrays[name + ".biases"] = a.packed, a.scales, a.biases

    put("model.embed_tokens", gguf_blocks("Q8_0", vocab, h, rng))
    for n in range(layers):
        p = f"model.layers.{n}."
        for m, (o, i) in {"self_attn.q_proj": (heads * hd, h), "self_attn.k_proj": (kv * hd, h),
                          "self_attn.v_proj": (kv * hd, h), "self_attn.o_proj": (h, heads * hd),
                          "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}.items():
            put(p + m, gguf_blocks(kind, o, i, rng) if kind != "mlx4" else mlx_groups(4, 64, o, i, rng))
        for m in ("q", "k", "v"):
            arrays[p + f"self_attn.{m}_proj.bias"] = (0.3 * rng.standard_normal(arrays[p + f"self_attn.{m}_proj.scales"]
                                                                                .shape[0])).astype(np.float32)
        for m in ("input_layernorm", "post_attention_layernorm"):
            arrays[p + m + ".weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    return open_checkpoint(path)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "mlx4"])
def test_tiny_quantized_model(kind, kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("TOGETHER_KERNEL", kernel)  # what a peer process picks for every packed projection
    ck = quantized_dir(tmp_path / kind, kind, np.random.default_rng(2))
    packed = TorchShard(ck, 0, 3, "bfloat16")
    dense16 = TorchShard(ck, 0, 3, "bfloat16", packed=False)
    ref = TorchShard(ck, 0, 3, "float32")
    g = 64 if kind == "mlx4" else 32
    assert packed.weight_format == f"int4/g{g}+int8/g32" and dense16.weight_format == "bfloat16"
    assert ref.weight_format == "float32"
    assert packed.weight_nbytes() < 0.4 * dense16.weight_nbytes()
    tokens = np.random.default_rng(3).integers(0, 256, 40)
    want = full_logits(ref, tokens)
    got, base = full_logits(packed, tokens), full_logits(dense16, tokens)
    # packed weights stray from the float32 reference no more than bfloat16 weights do
    err, err16 = np.abs(got - want).max(), np.abs(base - want).max()
    assert err <= 2 * err16 + 1e-3, (err, err16)
    assert (got.argmax(-1) == base.argmax(-1)).mean() >= 0.9
    # a split of packed slices gives the whole packed slice's tokens; so does a batch of sequences
    parts = [TorchShard(ck, 0, 1, "bfloat16"), TorchShard(ck, 1, 3, "bfloat16")]
    prompt = tokens[:9].astype(np.int32)
    alone = greedy([packed], prompt, 12)
    assert greedy(parts, prompt, 12) == alone
    packed.add_sequence("a", prompt=list(prompt))
    packed.add_sequence("b", prompt=list(prompt[:4]))
    out = packed.forward([SeqChunk("a", 0, 9), SeqChunk("b", 0, 4)], np.concatenate([prompt, prompt[:4]]))
    got_a, got_b = [out[0].token], [out[1].token]
    for _ in range(4):  # batched decode at two offsets
        out = packed.forward([SeqChunk("a", packed.seqs["a"].length, 1), SeqChunk("b", packed.seqs["b"].length, 1)],
                             np.array([got_a[-1], got_b[-1]], np.int32))
        got_a.append(out[0].token), got_b.append(out[1].token)
    assert got_a == alone[:5] and got_b == greedy([packed], prompt[:4], 5, seq="alone")


def test_lora_on_packed_layers(tmp_path):
    ck = quantized_dir(tmp_path / "q", "Q4_1", np.random.default_rng(4))
    rng = np.random.default_rng(5)
    pair = lambda i, o: ((0.5 * rng.standard_normal((i, 4))).astype(np.float32),  # noqa: E731
                         (0.5 * rng.standard_normal((4, o))).astype(np.float32))
    weights = {1: {"self_attn.q_proj": pair(128, 128), "mlp.down_proj": pair(256, 128)}}
    ids, pos = torch.tensor([[3, 1, 4, 1, 5]]), torch.arange(5)[None]
    outs = []
    for shard in (TorchShard(ck, 0, 3, "bfloat16"), TorchShard(ck, 0, 3, "bfloat16", packed=False)):
        apply_adapter(shard.model, 0, "x", weights, 2.0, shard.route)
        with torch.inference_mode():
            shard.route.rows = ("",)
            pool = shard.model.new_pool()
            plain = shard.model(ids, pos, pool, [pool.alloc()])
            shard.route.rows = ("x",)
            pool = shard.model.new_pool()
            outs.append(shard.model(ids, pos, pool, [pool.alloc()]).float())
        assert (outs[-1] - plain.float()).abs().max() > 0.3  # the adapter changes the output
    assert torch.allclose(outs[0], outs[1], atol=0.1, rtol=0.05)


def test_estimate_counts_packed_bytes(tmp_path):
    ck = quantized_dir(tmp_path / "q", "Q4_1", np.random.default_rng(6))
    packed = TorchShard(ck, 1, 2, "bfloat16")
    layer = sum(t.nbytes for t in [*packed.model.layers.parameters(), *packed.model.layers.buffers()])
    assert estimate_layer_bytes(ck, "torch", "bfloat16") == pytest.approx(layer, rel=0.05)
    assert estimate_layer_bytes(ck, "torch", "float32") > 6 * layer  # the float32 path dequantizes


def test_q4_kernel_falls_back_when_it_cannot_build(tmp_path, monkeypatch, caplog):
    """No compiler (a fresh cache, CXX pointing nowhere): one warning, and torch's int4 kernel."""
    import logging

    from backends.torch import kernels

    if not kernels.cpu_supported():
        pytest.skip("no AVX512-BF16: the kernel is never tried here")
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        lin = PackedLinear(KINDS["Q4_1"](64, 128, np.random.default_rng(4)), kernel="q4")
    assert lin.kernel == "torch" and kernels.q4() is None
    assert [r.getMessage() for r in caplog.records if "q4 CPU kernel unavailable" in r.getMessage()]


# ---------------------------------------------------------------- the embedded model


@pytest.fixture(scope="module", params=["torch", "q4"])
def packed_full(embedded, request):
    kernel = request.getfixturevalue("q4_kernel") if request.param == "q4" else "torch"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOGETHER_KERNEL", kernel)
        shard = TorchShard(embedded, 0, 30, "bfloat16")
    assert {m.kernel for m in shard.model.modules() if isinstance(m, PackedLinear)} == {kernel}
    return shard


def test_embedded_packed_matches_dequantized(embedded, packed_full):
    packed, dense = packed_full, TorchShard(embedded, 0, 30, "bfloat16", packed=False)
    assert packed.weight_format == "int4/g32+int8/g32"  # Q4_1 layers, Q8_0 tied embedding / head
    assert packed.weight_nbytes() < 0.55 * dense.weight_nbytes()  # the embedding and the head apart
    # teacher-forced over the prompt and 24 generated tokens (36 positions: the int4 kernel's path)
    seq = np.concatenate([PROMPT, greedy([packed], PROMPT, 24)]).astype(np.int32)
    got, want = full_logits(packed, seq), full_logits(dense, seq)
    diff = np.abs(got - want)
    assert diff.max() < 0.1 * np.abs(want).max() and diff.mean() < 0.3, (diff.max(), diff.mean())
    top2 = np.sort(want, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1.0  # wider than bfloat16 rounding moves these logits
    assert clear.sum() >= 10 and (got.argmax(-1) == want.argmax(-1))[clear].all()
    # a chunk long enough for the dequantize-and-matmul path agrees with the kernel's path
    long = np.concatenate([seq, seq]).astype(np.int32)
    assert len(long) >= DENSE_ROWS
    np.testing.assert_allclose(full_logits(packed, long)[:len(seq)], got, atol=0.1 * np.abs(got).max())


@pytest.mark.slow
def test_embedded_packed_greedy_equals_float32(embedded, packed_full):
    """The packed bfloat16 peer and the float32 dense path (the reference of test_torch_backend.py,
    itself checked against transformers) draw the same 24 greedy tokens."""
    assert greedy([packed_full], PROMPT, 24) == greedy([TorchShard(embedded, 0, 30, "float32")], PROMPT, 24)


@pytest.mark.slow
def test_tensor_parallel_ranks_keep_packed_groups(tmp_path):
    """TP=2 over packed bfloat16 layers (the tiny model's cuts fall on its groups of 32) gives the
    single packed slice's greedy tokens; each rank holds packed halves."""
    from backends.tp import TPGroup

    ck = quantized_dir(tmp_path / "q", "Q4_1", np.random.default_rng(7))
    prompt = [5, 77, 200, 3, 9, 141, 60, 18]
    want = greedy([TorchShard(ck, 0, 3, "bfloat16")], prompt, 12)
    g = TPGroup(ck.path, 0, 3, "torch", 2, dtype="bfloat16", threads=1, timeout=20)
    try:
        sh = g.start()
        assert sh.weight_format == "int4/g32+int8/g32"
        assert greedy([sh], prompt, 12) == want
    finally:
        g.close()


def test_a_rows_output_does_not_depend_on_its_batch(embedded, kernel, monkeypatch):
    """A sequence's tokens must not depend on which sequences share its frame or how many drafts ride
    with it: each row of a packed projection (4-bit layers and the 8-bit head, both kernels) gives the
    same bits alone and inside any batch, across every tile boundary of ours (tiles of 4 rows)."""
    import torch

    from backends.pipeline import Pipeline, SliceSpec
    from backends.torch.quant import PackedLinear

    monkeypatch.setenv("TOGETHER_KERNEL", kernel)
    n = 30  # the embedded model's layers
    mods = []
    for spec in (SliceSpec("torch", 0, 1), SliceSpec("torch", n - 1, n)):  # a first layer; the last and the head
        pipe = Pipeline.load(embedded, [spec], dtype="bfloat16", threads=1)
        mods += [m for obj in vars(pipe.shards[0]).values() if isinstance(obj, torch.nn.Module)
                 for m in obj.modules() if isinstance(m, PackedLinear)]
    assert mods and {m.kernel for m in mods} == {kernel}
    assert {m.bits for m in mods} == {4, 8}
    g = torch.Generator().manual_seed(0)
    for m in mods:
        x = torch.randn(20, m.in_features, generator=g).to(torch.bfloat16)
        alone = torch.cat([m(x[i:i + 1]) for i in range(20)])
        for rows in (2, 3, 4, 5, 8, 9, 20):
            assert torch.equal(m(x[:rows]), alone[:rows]), (m.kernel, m.in_features, m.out_features, rows)
