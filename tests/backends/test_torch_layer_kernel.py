"""The fused layer path of the torch backend (backends/torch/kernels/layer.cpp, SliceModel._fused_forward)
against the torch ops it replaces: each op within float32 rounding, rows independent of their batch and
a drafted chunk's positions bit for bit its decode steps', the same greedy tokens on the embedded model,
adapters applied after the first step, and the torch ops where the kernel cannot build."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from backends.shard import SeqChunk  # noqa: E402
from backends.torch.model import KVPool, StepKV, apply_rope  # noqa: E402
from backends.torch.shard import TorchShard  # noqa: E402
# the embedded prompt and the one-compute-thread fixture (autouse once imported) of the packed tests
from tests.backends.test_torch_packed import PROMPT, one_thread, quantized_dir  # noqa: E402,F401
from tests.helpers import greedy  # noqa: E402


@pytest.fixture(scope="session")
def layer():
    """kernels/layer.cpp, built on first use once per machine (~40 s of CPU)."""
    from backends.torch import kernels

    mod = kernels.layer()
    if mod is None:
        pytest.skip("the layer kernel cannot build here (needs g++ and ninja)")
    return mod


def shard(ck, dtype: str, fused: bool, monkeypatch, start: int = 0, end: int | None = None) -> TorchShard:
    monkeypatch.setenv("TOGETHER_FUSED", "1" if fused else "0")
    sh = TorchShard(ck, start, ck.config.num_hidden_layers if end is None else end, dtype)
    assert (sh.model.fused is not None) == fused
    return sh


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_match_torch(layer, dtype):
    g = torch.Generator().manual_seed(0)
    x, a = (torch.randn(5, 576, generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(576, generator=g)).to(dtype)
    ref = lambda v: w * F.rms_norm(v.float(), (576,), eps=1e-5).to(dtype)  # noqa: E731  RMSNorm.forward
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.02, rtol=0.02)
    torch.testing.assert_close(layer.rmsnorm(x, w, 1e-5), ref(x), **tol)
    h, n = layer.add_rmsnorm(x, a, w, 1e-5)
    assert torch.equal(h, x + a)  # the residual rounds as torch's add
    torch.testing.assert_close(n, ref(x + a), **tol)
    if dtype == torch.bfloat16:  # off by at most one rounding step where the sums' order flips it
        assert (layer.rmsnorm(x, w, 1e-5) == ref(x)).float().mean() > 0.97


def rope_tables(pos, d: int):
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    f = pos.float()[..., None] * inv
    return f.cos()[:, :, None], f.sin()[:, :, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_matches_rope_and_sdpa_over_the_pool(layer, dtype):
    """RoPE, the KV append and attention over each row's own slot, as the torch path computes them."""
    H, Hkv, D, layers = 6, 2, 16, 2
    pool = KVPool(layers, Hkv, D, torch.float32, torch.device("cpu"))
    slots = [pool.alloc() for _ in range(4)]
    g = torch.Generator().manual_seed(1)
    assert pool.k is not None and pool.v is not None
    pool.k.normal_(generator=g), pool.v.normal_(generator=g)
    rows, pos = [3, 0, 2], torch.tensor([[9], [4], [30]])  # not a run of slots, out of order, ragged
    qkv = torch.randn(3, 1, (H + 2 * Hkv) * D, generator=g).to(dtype)
    cos, sin = rope_tables(pos, D)
    kv = StepKV(pool, rows, pos, kernel=layer.attend)
    assert kv.kernel is not None
    k0, v0 = pool.k.clone(), pool.v.clone()
    got = layer.attend(qkv, cos, sin, pool.k, pool.v, 1, kv.slot_rows, kv.starts, H, Hkv)
    assert got.shape == (3, 1, H * D) and got.dtype == dtype
    x = qkv.float()
    qk = apply_rope(x[..., :(H + Hkv) * D].view(3, 1, H + Hkv, D), cos, sin).transpose(1, 2)
    v = x[..., (H + Hkv) * D:].view(3, 1, Hkv, D).transpose(1, 2)
    for i, (s, p) in enumerate(zip(rows, pos[:, 0].tolist())):
        assert torch.equal(pool.k[1, s, :, p], qk[i, H:, 0]) and torch.equal(pool.v[1, s, :, p], v[i, :, 0])
        assert torch.equal(pool.k[0], k0[0]) and torch.equal(pool.v[0], v0[0])  # other layers untouched
        want = F.scaled_dot_product_attention(qk[i:i + 1, :H], pool.k[1, s:s + 1, :, :p + 1],
                                              pool.v[1, s:s + 1, :, :p + 1], enable_gqa=True)
        ref = want.transpose(1, 2).reshape(1, H * D)
        torch.testing.assert_close(got[i].float(), ref.to(dtype).float(), atol=1e-5 if dtype == torch.float32 else 0.02,
                                   rtol=1e-5 if dtype == torch.float32 else 0.02)


def test_attend_rows_do_not_depend_on_their_batch_and_a_chunk_is_its_steps(layer):
    """Bit for bit: a row attends alone as inside any batch, and a chunk's positions (a drafted chunk,
    rowwise) as its decode steps one at a time."""
    H, Hkv, D = 9, 3, 64
    g = torch.Generator().manual_seed(2)

    def fresh() -> KVPool:
        pool = KVPool(1, Hkv, D, torch.float32, torch.device("cpu"))
        for _ in range(5):
            pool.alloc()
        assert pool.k is not None and pool.v is not None
        torch.manual_seed(3)
        pool.k.normal_(), pool.v.normal_()
        return pool

    qkv = torch.randn(5, 1, (H + 2 * Hkv) * D, generator=g).bfloat16()
    pos = torch.tensor([[40], [7], [100], [3], [64]])
    cos, sin = rope_tables(pos, D)

    def run(rows: list[int]):
        pool = fresh()
        kv = StepKV(pool, rows, pos[rows], kernel=layer.attend)
        return layer.attend(qkv[rows], cos[rows], sin[rows], pool.k, pool.v, 0, kv.slot_rows, kv.starts, H, Hkv)

    alone = torch.cat([run([i]) for i in range(5)])
    for rows in ([0, 1], [4, 2, 0], [0, 1, 2, 3, 4]):
        assert torch.equal(run(rows), alone[rows]), rows
    chunk = torch.randn(1, 6, (H + 2 * Hkv) * D, generator=g).bfloat16()
    cpos = torch.arange(20, 26)[None]
    c, s = rope_tables(cpos, D)
    pool = fresh()
    kv = StepKV(pool, [1], cpos, rowwise=True, kernel=layer.attend)
    assert kv.kernel is not None
    whole = layer.attend(chunk, c, s, pool.k, pool.v, 0, kv.slot_rows, kv.starts, H, Hkv)
    pool = fresh()
    steps = []
    for j in range(6):
        kv = StepKV(pool, [1], cpos[:, j:j + 1], kernel=layer.attend)
        steps.append(layer.attend(chunk[:, j:j + 1], c[:, j:j + 1], s[:, j:j + 1], pool.k, pool.v, 0,
                                  kv.slot_rows, kv.starts, H, Hkv))
    assert torch.equal(whole, torch.cat(steps, dim=1))


def test_a_prefill_chunk_keeps_torchs_attention(layer):
    pool = KVPool(1, 2, 16, torch.float32, torch.device("cpu"))
    slot = pool.alloc()
    assert StepKV(pool, [slot], torch.arange(5)[None], kernel=layer.attend).kernel is None
    assert StepKV(pool, [slot], torch.arange(5, 9)[None], rowwise=True, kernel=layer.attend).kernel is not None


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_embedded_fused_greedy_equals_torch_ops(layer, embedded, dtype, monkeypatch):
    """The embedded model's greedy tokens (prefill, then single and batched decode steps) are those of
    the torch ops' path (float32: the reference checked against transformers in test_torch_backend.py)."""
    fused, plain = shard(embedded, dtype, True, monkeypatch), shard(embedded, dtype, False, monkeypatch)
    want = greedy([plain], PROMPT, 16)
    assert greedy([fused], PROMPT, 16) == want
    # two sequences in one batched decode step each get their own tokens
    fused.add_sequence("a", prompt=list(PROMPT))
    fused.add_sequence("b", prompt=list(PROMPT[:5]))
    out = fused.forward([SeqChunk("a", 0, 12), SeqChunk("b", 0, 5)], np.concatenate([PROMPT, PROMPT[:5]]))
    got = {o.seq_id: [o.token] for o in out}
    for _ in range(5):
        chunks = [SeqChunk(k, fused.seqs[k].length, 1) for k in ("b", "a")]
        for o in fused.forward(chunks, np.array([got["b"][-1], got["a"][-1]], np.int32)):
            got[o.seq_id].append(o.token)
    fused.free_sequence("a"), fused.free_sequence("b")
    assert got["a"] == want[:6]
    assert got["b"] == greedy([plain], PROMPT[:5], 6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_decode_step_in_one_blocks_call_is_the_op_by_op_loop_bit_for_bit(layer, embedded, dtype, monkeypatch):
    """Blocks (the decode step as one call without the GIL) runs the fused ops of the Python loop in its order:
    the same bits, for batched decode rows at ragged positions and for a drafted (row-wise) chunk; packed
    4- and 8-bit projections (bfloat16) and dense ones (float32) alike."""
    from backends.torch.model import _generation

    m = shard(embedded, dtype, True, monkeypatch, 0, 6).model
    with torch.inference_mode():
        plan, norm, blocks = m._make_plan()
    assert blocks is not None  # every projection of the embedded model is one Blocks runs

    calls = []

    class Counted:  # Blocks, its calls counted (a decode step must take it)
        def forward(self, *a):
            calls.append(1)
            return blocks.forward(*a)

    def run(use: bool) -> list[torch.Tensor]:
        m._plan = (_generation[0], plan, norm, Counted() if use else None)
        out = []
        with torch.inference_mode():
            pool = m.new_pool()
            slots = [pool.alloc() for _ in range(3)]
            for step in range(4):  # rows joining at different steps: ragged positions in one batch
                rows = [r for r in range(3) if r <= step]
                ids = torch.tensor([[(7 * step + 13 * r) % 1000 + 1] for r in rows])
                pos = torch.tensor([[step - r] for r in rows])
                out.append(m(ids, pos, pool, [slots[r] for r in rows]))
            ids, pos = torch.tensor([[5, 9, 11, 2]]), torch.arange(4, 8)[None]
            out.append(m(ids, pos, pool, [slots[0]], rowwise=True))  # a drafted chunk after row 0's steps
        return out

    fast, loop = run(True), run(False)
    assert len(calls) == 5
    assert all(torch.equal(a, b) for a, b in zip(fast, loop))
    assert not torch.equal(fast[0][0], fast[1][0])


def test_split_fused_slices_give_the_whole_slices_tokens(layer, tmp_path, monkeypatch):
    ck = quantized_dir(tmp_path / "q", "Q4_1", np.random.default_rng(8))
    whole = shard(ck, "bfloat16", True, monkeypatch)
    parts = [shard(ck, "bfloat16", True, monkeypatch, 0, 1), shard(ck, "bfloat16", True, monkeypatch, 1, 3)]
    prompt = [5, 77, 200, 3, 9, 141, 60, 18]
    assert greedy(parts, prompt, 10) == greedy([whole], prompt, 10)


def test_an_adapter_applied_after_a_step_changes_the_fused_forward(layer, tmp_path, monkeypatch):
    """The fused forward's plan holds the projections it was made from: replacing one (an adapter's
    wrapper) makes it anew."""
    from backends.torch.lora import apply_adapter

    ck = quantized_dir(tmp_path / "q", "Q4_1", np.random.default_rng(4))
    sh = shard(ck, "bfloat16", True, monkeypatch)
    rng = np.random.default_rng(5)
    weights = {1: {"mlp.down_proj": ((0.5 * rng.standard_normal((256, 4))).astype(np.float32),
                                     (0.5 * rng.standard_normal((4, 128))).astype(np.float32))}}
    ids, pos = torch.tensor([[3], [1]]), torch.tensor([[0], [0]])

    def step():
        with torch.inference_mode():
            pool = sh.model.new_pool()
            return sh.model(ids, pos, pool, [pool.alloc(), pool.alloc()]).float()

    sh.route.rows = ("x", "")
    before = step()
    apply_adapter(sh.model, 0, "x", weights, 2.0, sh.route)
    after = step()
    assert not torch.equal(after[0], before[0])  # row 0 runs the adapter now
    assert torch.equal(after[1], before[1])  # row 1 does not
    assert sh.model._plan[3] is None  # an adapter's wrapper is no projection Blocks runs: the step goes op by op


def test_torch_ops_where_the_kernel_cannot_build(tmp_path, monkeypatch, caplog, embedded):
    """No compiler (a fresh cache, CXX pointing nowhere): one warning, and the torch ops' path."""
    import logging

    from backends.torch import kernels

    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.delenv("TOGETHER_FUSED", raising=False)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        sh = TorchShard(embedded, 0, 2, "float32")
    assert sh.model.fused is None and kernels.layer() is None
    assert [r.getMessage() for r in caplog.records if "layer CPU kernel unavailable" in r.getMessage()]
    sh.add_sequence("s", prompt=list(PROMPT))
    assert sh.forward([SeqChunk("s", 0, 12)], PROMPT) is not None
