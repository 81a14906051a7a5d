"""Llama-family decoder slice (Llama, Mistral, Qwen2), gpt-fast style: fused QKV and gate/up
projections, half-split RoPE (HF layout), SDPA with GQA, a preallocated per-sequence KV cache."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, cast

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from torch import nn

from backends.config import ModelConfig
from backends.errors import ModelError
from backends.weights import Checkpoint, expected_shapes, validate_slice

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelArgs:
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    start: int
    end: int
    n_total: int
    # tensor parallelism (backends/tp.py): heads and MLP columns above are this rank's; `reduce`
    # sums the partial outputs of wo and w2 over the group, whose biases one rank adds (row_bias);
    # only the rank with edges holds the embedding and the head
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    row_bias: bool = True
    edges: bool = True

    @classmethod
    def from_config(cls, cfg: ModelConfig, start: int, end: int) -> "ModelArgs":
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                   cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size, cfg.rms_norm_eps,
                   cfg.rope_theta, cfg.rope_scaling, cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias,
                   start, end, cfg.num_hidden_layers)

    @property
    def first(self) -> bool:
        return self.edges and self.start == 0

    @property
    def last(self) -> bool:
        return self.edges and self.end == self.n_total


def warm() -> None:
    """Pay torch's one-time imports now (the first op under a device context pulls in torch._dynamo,
    ~2 s), not when a standby must load a lost stage's layers in a hurry."""
    with torch.device("meta"):
        torch.ones(2) / 2


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies exactly as transformers computes them (default, linear, llama3)."""
    dim = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = args.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(sc["factor"])
    if kind == "llama3":
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old = sc["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        out = torch.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        mid = ~(wl < hi_wl) * ~(wl > lo_wl)
        return torch.where(mid, smoothed, out)
    raise ModelError(f"unsupported rope scaling {kind!r} (supported: linear, llama3)")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, L, H, D); cos, sin: (B, L, 1, D/2) -- same arithmetic as HF's rotate_half form
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache:
    """One layer's keys and values for one sequence, preallocated and grown in steps."""

    step = 256

    def __init__(self, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (1, n_kv_heads, 0, head_dim), dtype, device
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.offset = 0

    def _grow(self, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value buffers, grown to hold at least `need` positions."""
        if self.k is not None and self.v is not None and need <= self.k.shape[2]:
            return self.k, self.v
        b, h, _, d = self.shape
        new = ((need + self.step - 1) // self.step) * self.step
        # zeros, not empty: padded batched attention reads (masked) slots past the offset
        k = torch.zeros(b, h, new, d, dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        if self.k is not None and self.v is not None:
            k[:, :, :self.offset] = self.k[:, :, :self.offset]
            v[:, :, :self.offset] = self.v[:, :, :self.offset]
        self.k, self.v = k, v
        return k, v

    def update_and_fetch(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (1, Hkv, L, D) -> all keys/values so far, (1, Hkv, offset + L, D)
        end = self.offset + k.shape[2]
        keys, values = self._grow(end)
        keys[:, :, self.offset:end] = k
        values[:, :, self.offset:end] = v
        self.offset = end
        return keys[:, :, :end], values[:, :, :end]

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None or self.v is None else self.k.nbytes + self.v.nbytes


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # as HF: normalise in fp32, cast back, then scale
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = a.n_heads, a.n_kv_heads, a.head_dim
        self.sizes = [a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim]
        self.wqkv = nn.Linear(a.hidden_size, sum(self.sizes), bias=a.qkv_bias)
        self.wo = nn.Linear(self.sizes[0], a.hidden_size, bias=a.o_bias and a.row_bias)
        self.reduce = a.reduce

    def forward(self, x, cos, sin, caches: list[KVCache], mask):
        B, L, _ = x.shape  # (B, L, C)
        q, k, v = self.wqkv(x).split(self.sizes, dim=-1)
        q = apply_rope(q.view(B, L, self.n_heads, self.hd), cos, sin).transpose(1, 2)  # (B, H, L, D)
        k = apply_rope(k.view(B, L, self.n_kv, self.hd), cos, sin).transpose(1, 2)  # (B, Hkv, L, D)
        v = v.view(B, L, self.n_kv, self.hd).transpose(1, 2)
        if B == 1:
            k, v = caches[0].update_and_fetch(k, v)  # (1, Hkv, S, D)
        else:  # batched decode: per-sequence caches gathered into one padded (B, Hkv, S, D)
            S = mask.shape[-1]
            ks, vs = [], []
            for i, c in enumerate(caches):
                ki, vi = c.update_and_fetch(k[i:i + 1], v[i:i + 1])
                ks.append(ki[0].transpose(0, 1))  # (S_i, Hkv, D), a view
                vs.append(vi[0].transpose(0, 1))
            # one padding copy per tensor instead of one per sequence: (B, S, Hkv, D) -> (B, Hkv, S, D)
            k = pad_sequence(ks, batch_first=True).transpose(1, 2)[:, :, :S]
            v = pad_sequence(vs, batch_first=True).transpose(1, 2)[:, :, :S]
        causal = mask is None and L > 1
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv != self.n_heads)  # (B, H, L, D)
        o = self.wo(o.transpose(1, 2).reshape(B, L, -1))
        return o if self.reduce is None else self.reduce(o)


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=a.mlp_bias)  # gate ; up
        self.w2 = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias and a.row_bias)
        self.reduce = a.reduce

    def forward(self, x):
        g, u = self.w13(x).chunk(2, dim=-1)
        o = self.w2(F.silu(g) * u)
        return o if self.reduce is None else self.reduce(o)


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(a.hidden_size, a.norm_eps)
        self.attention = Attention(a)
        self.ffn_norm = RMSNorm(a.hidden_size, a.norm_eps)
        self.feed_forward = MLP(a)

    def forward(self, x, cos, sin, caches, mask):
        h = x + self.attention(self.attention_norm(x), cos, sin, caches, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class SliceModel(nn.Module):
    """Layers [start, end); the first slice embeds, the last applies the final norm (see `head`)."""

    inv_freq: torch.Tensor  # a buffer (not a parameter): RoPE's inverse frequencies

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.embed = nn.Embedding(a.vocab_size, a.hidden_size) if a.first else None
        self.layers = nn.ModuleList(Block(a) for _ in range(a.start, a.end))
        self.norm = RMSNorm(a.hidden_size, a.norm_eps) if a.last else None
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False) if a.last else None
        self.register_buffer("inv_freq", rope_inv_freq(a), persistent=False)

    def block(self, i: int) -> Block:
        """Block i of the slice (0 = layer `start`)."""
        return cast(Block, self.layers[i])

    def new_cache(self) -> list[KVCache]:
        p = self.block(0).attention.wqkv.weight
        return [KVCache(self.args.n_kv_heads, self.args.head_dim, p.dtype, p.device) for _ in self.layers]

    def forward(self, x: torch.Tensor, pos: torch.Tensor, caches: list[list[KVCache]]) -> torch.Tensor:
        """x: token ids (B, L) or hidden (B, L, C); pos: (B, L) positions; caches[b] per layer.
        B > 1 only for decode (L == 1). Returns hidden (B, L, C), final-normed on the last slice."""
        if self.embed is not None and not x.is_floating_point():
            x = self.embed(x)
        dtype = self.block(0).attention.wqkv.weight.dtype
        x = x.to(dtype)
        B, L = pos.shape
        freqs = pos.to(self.inv_freq.device, torch.float32)[..., None] * self.inv_freq  # (B, L, D/2)
        cos, sin = freqs.cos().to(dtype)[:, :, None], freqs.sin().to(dtype)[:, :, None]
        mask = None
        if B > 1:  # key-padding mask over the padded caches: (B, 1, 1, S)
            ends = pos[:, -1] + 1
            S = int(ends.max())
            mask = (torch.arange(S, device=pos.device)[None, :] < ends[:, None])[:, None, None, :]
            mask = mask.to(x.device)
        elif L > 1 and int(pos[0, 0]) > 0:  # chunk after a prefix: causal with an offset, (L, S)
            off = int(pos[0, 0])
            mask = (torch.arange(off + L, device=x.device)[None, :]
                    <= torch.arange(off, off + L, device=x.device)[:, None])
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, [c[i] for c in caches], mask)
        return self.norm(x) if self.norm is not None else x

    def head(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            raise ModelError(f"layers [{self.args.start}, {self.args.end}) are not the last slice: no head")
        return self.lm_head(h)


def load_slice(ck: Checkpoint, start: int, end: int, dtype: str = "float32",
               device: str | torch.device = "cpu", *, edges: bool = True, row_bias: bool = True,
               reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SliceModel:
    """Build layers [start, end) of `ck`, reading (and dequantizing) only the slice's tensors.
    A tensor-parallel rank passes its part of the checkpoint and the ModelArgs TP fields."""
    cfg = ck.config
    if cfg.model_type not in ("llama", "mistral", "qwen2"):
        raise ModelError(f"{ck.path}: the torch backend does not support {cfg.model_type!r}")
    expect = expected_shapes(cfg, start, end, ck.tied_head)
    validate_slice(ck, start, end, expect)
    a = replace(ModelArgs.from_config(cfg, start, end), edges=edges, row_bias=row_bias, reduce=reduce)
    tdt, dev = DTYPES[dtype], torch.device(device)
    with torch.device("meta"):
        model = SliceModel(a)

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(ck.get(name).numpy()).to(dev, tdt)

    sd: dict[str, torch.Tensor] = {}
    for j, layer in enumerate(range(start, end)):
        p, o = f"model.layers.{layer}.", f"layers.{j}."
        sd[o + "attention_norm.weight"] = t(p + "input_layernorm.weight")
        sd[o + "ffn_norm.weight"] = t(p + "post_attention_layernorm.weight")
        qkv = [p + f"self_attn.{n}_proj." for n in "qkv"]
        sd[o + "attention.wqkv.weight"] = torch.cat([t(n + "weight") for n in qkv])
        if a.qkv_bias:
            sd[o + "attention.wqkv.bias"] = torch.cat([t(n + "bias") for n in qkv])
        sd[o + "attention.wo.weight"] = t(p + "self_attn.o_proj.weight")
        if a.o_bias and a.row_bias:
            sd[o + "attention.wo.bias"] = t(p + "self_attn.o_proj.bias")
        sd[o + "feed_forward.w13.weight"] = torch.cat([t(p + "mlp.gate_proj.weight"), t(p + "mlp.up_proj.weight")])
        sd[o + "feed_forward.w2.weight"] = t(p + "mlp.down_proj.weight")
        if a.mlp_bias:
            sd[o + "feed_forward.w13.bias"] = torch.cat([t(p + "mlp.gate_proj.bias"), t(p + "mlp.up_proj.bias")])
        if a.mlp_bias and a.row_bias:
            sd[o + "feed_forward.w2.bias"] = t(p + "mlp.down_proj.bias")
    emb = t("model.embed_tokens.weight") if (a.first or (a.last and ck.tied_head)) else None
    if a.first and emb is not None:
        sd["embed.weight"] = emb
    if a.last:
        sd["norm.weight"] = t("model.norm.weight")
        sd["lm_head.weight"] = emb if ck.tied_head and emb is not None else t("lm_head.weight")
    model.load_state_dict(sd, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(a).to(dev)
    return model.eval().requires_grad_(False)
