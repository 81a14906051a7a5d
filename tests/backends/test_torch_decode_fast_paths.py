"""The batched decode step's fast paths (issue 13): the layer kernel's vectorized attention (exp, dot products
and the weighted sum of values in 16-float registers) against torch's SDPA at the head sizes models use and
one that takes the plain loops, and the sampler's argmax (numpy's on a CPU) against torch's."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from backends.sampling import SamplingParams  # noqa: E402
from backends.shard import SeqState  # noqa: E402
from backends.torch.model import KVPool, StepKV, apply_rope  # noqa: E402
from backends.torch.sampling import argmax, make_sampler  # noqa: E402
from tests.backends.test_torch_layer_kernel import layer, one_thread, rope_tables  # noqa: E402,F401


@pytest.mark.parametrize("D", [64, 128, 24])  # 24: no whole 16-float block, the plain loops
@pytest.mark.parametrize("spread", [1.0, 30.0])  # 30: scores ~100 apart, exp's clamp at -87 is reached
def test_attend_over_long_caches_matches_sdpa(layer, D, spread):
    H, Hkv = 9, 3
    pool = KVPool(1, Hkv, D, torch.float32, torch.device("cpu"))
    slots = [pool.alloc() for _ in range(3)]
    pool.reserve(slots[0], 160)
    g = torch.Generator().manual_seed(D)
    assert pool.k is not None and pool.v is not None
    pool.k.normal_(generator=g), pool.v.normal_(generator=g)
    pos = torch.tensor([[99], [36], [150]])  # 100, 37, 151 keys: whole blocks of 16 and a tail
    qkv = torch.randn(3, 1, (H + 2 * Hkv) * D, generator=g)
    qkv[..., :H * D] *= spread
    cos, sin = rope_tables(pos, D)
    kv = StepKV(pool, slots, pos, kernel=layer.attend)
    got = layer.attend(qkv, cos, sin, pool.k, pool.v, 0, kv.slot_rows, kv.starts, H, Hkv)
    qk = apply_rope(qkv[..., :(H + Hkv) * D].view(3, 1, H + Hkv, D), cos, sin).transpose(1, 2)
    for i, (s, p) in enumerate(zip(slots, pos[:, 0].tolist())):
        want = F.scaled_dot_product_attention(qk[i:i + 1, :H], pool.k[0, s:s + 1, :, :p + 1],
                                              pool.v[0, s:s + 1, :, :p + 1], enable_gqa=True)
        torch.testing.assert_close(got[i, 0], want.transpose(1, 2).reshape(H * D), atol=2e-5, rtol=1e-4)


def test_argmax_is_torchs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(49152, generator=g)
    assert argmax(x) == int(x.argmax())
    x[[7, 300, 4000]] = 50.0  # ties: the first maximal index, as torch's
    assert argmax(x) == int(x.argmax()) == 7
    m = torch.full_like(x, float("-inf"))
    m[12345] = -3.0  # a grammar's mask leaves one token
    assert argmax(m) == 12345
    assert argmax(x[1::2].contiguous()) == int(x[1::2].argmax())


def test_greedy_sampler_draws_the_argmax_with_raw_logprobs():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1000, generator=g).bfloat16()
    tok, lp, top = make_sampler(SamplingParams(temperature=0.0, logprobs=3))(logits, SeqState(SamplingParams(), []))
    ref = logits.float().log_softmax(-1)
    assert tok == int(logits.float().argmax()) and lp == float(ref[tok])
    assert [t for t, _ in top] == ref.topk(3).indices.tolist()
