"""Llama-family decoder slice (Llama, Mistral, Qwen2), gpt-fast style: fused QKV and gate/up
projections, half-split RoPE (HF layout), SDPA with GQA, a preallocated per-sequence KV cache."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, cast

import torch
import torch.nn.functional as F
from torch import nn

from backends.config import ModelConfig
from backends.errors import ModelError
from backends.torch import kernels
from backends.torch.quant import Loader, PackedLinear, weight_format
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
    """Pay torch's first-use costs now (its attention kernel's), not when a standby must load a lost
    stage's layers in a hurry. Loading runs no op on the meta device (that would import torch._dynamo,
    ~1 s at every start, which nothing here uses): a test checks it stays out."""
    q = torch.zeros(1, 1, 2, 8)
    F.scaled_dot_product_attention(q, q, q, is_causal=True)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies exactly as transformers computes them (default, linear, llama3)."""
    dim = args.head_dim
    # on the CPU even under a meta device context (SliceModel's skeleton): a meta pow imports torch._dynamo
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
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


class KVPool:
    """Every sequence's keys and values on a slice: sequence i is row (slot) i of one buffer per layer,
    (layers, slots, Hkv, capacity, D), so a batched decode step attends over the rows in place,
    with no per-step gather. Capacity follows the longest live sequence in steps of `step`; slots
    are reused; the buffer shrinks when sequences leave and goes when the last one does."""

    step = 256

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.dims, self.dtype, self.device = (n_layers, n_kv_heads, head_dim), dtype, device
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.lens: list[int] = []  # tokens held per slot; -1: free

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[3]

    def alloc(self) -> int:
        """A free slot for a new sequence (the lowest, so that live slots stay contiguous)."""
        if -1 not in self.lens:
            n = len(self.lens)
            self.lens += [-1] * max(1, n // 2)  # grow by half: a join copies the pool rarely
            self._resize(len(self.lens), max(self.capacity, self.step))
        slot = self.lens.index(-1)
        self.lens[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        self.lens[slot] = -1
        live = [i for i, n in enumerate(self.lens) if n >= 0]
        if not live:
            self.k = self.v = None
            self.lens = []
            return
        slots, cap = live[-1] + 1, self._round(max(self.lens))
        if slots * cap * 2 <= len(self.lens) * self.capacity:  # half of it idle: give it back
            del self.lens[slots:]
            self._resize(slots, cap)

    def reserve(self, slot: int, end: int) -> None:
        """Room for positions [0, end) of `slot`; the slot then holds `end` tokens."""
        if end > self.capacity:
            self._resize(len(self.lens), self._round(end))
        self.lens[slot] = end

    def trim(self, slot: int, length: int) -> None:
        """Drop positions >= length of `slot` (rejected drafts): past a row's end nothing is read, and
        the next chunk overwrites them."""
        self.lens[slot] = min(self.lens[slot], length)

    def _round(self, n: int) -> int:
        return max(self.step, (n + self.step - 1) // self.step * self.step)

    def _resize(self, slots: int, cap: int) -> None:
        layers, h, d = self.dims
        # zeros, not empty: batched attention reads (masked) positions past a row's end, and 0 * NaN is NaN
        k = torch.zeros(layers, slots, h, cap, d, dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        if self.k is not None and self.v is not None:
            n, c = min(slots, self.k.shape[1]), min(cap, self.capacity)
            k[:, :n, :, :c] = self.k[:, :n, :, :c]
            v[:, :n, :, :c] = self.v[:, :n, :, :c]
        self.k, self.v = k, v

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None or self.v is None else self.k.nbytes + self.v.nbytes


class StepKV:
    """One forward's attention over the pool: one sequence's chunk at `offset` (B == 1), or one token
    per sequence in slots `slots` (a batched decode step, L == 1). Rows stay in the caller's order
    outside attention (TP ranks sum them row by row); inside, a batch whose slots are adjacent is
    permuted into slot order and reads the pool's rows in place, others are gathered (one copy)."""

    def __init__(self, pool: KVPool, slots: list[int], pos: torch.Tensor, rowwise: bool = False,
                 kernel: Callable[..., torch.Tensor] | None = None):
        B, L = pos.shape
        dev = pool.device
        self.pool, self.slots, self.offset = pool, slots, int(pos[0, 0])
        self.rowwise = rowwise and B == 1 and L > 1
        ends = [int(p) + 1 for p in pos[:, -1].tolist()]
        for s, e in zip(slots, ends):
            pool.reserve(s, e)
        self.S = S = max(ends)
        # kernels/layer.cpp's attend: a decode step's or a drafted chunk's RoPE, KV append and attention
        # in one call per layer, each row over its own slot (no mask, no gather, no permutation)
        self.kernel = kernel if kernel is not None and (L == 1 or self.rowwise) else None
        if self.kernel is not None:
            self.slot_rows, self.starts = torch.tensor(slots), pos[:, 0].contiguous()
            return
        self.mask: torch.Tensor | None = None
        self.first, self.gather = slots[0], False
        self.perm: torch.Tensor | None = None
        self.unperm: torch.Tensor | None = None
        if B == 1:
            if L > 1 and self.offset > 0:  # a chunk after a prefix: causal with an offset, (L, S)
                self.mask = torch.arange(S, device=dev)[None, :] <= torch.arange(self.offset, S, device=dev)[:, None]
            return
        self.rows, self.at = torch.tensor(slots, device=dev), pos[:, 0].to(dev)
        order = sorted(range(B), key=slots.__getitem__)
        self.first = slots[order[0]]
        if [slots[i] for i in order] != list(range(self.first, self.first + B)):
            self.gather = True  # not a run of slots: gather the rows (one copy), in the caller's order
        elif order != list(range(B)):  # a run out of order: attend in slot order, over a view
            self.perm = torch.tensor(order, device=dev)
            self.unperm = torch.argsort(self.perm)
            ends = [ends[i] for i in order]
        # key padding: each row attends over its own sequence's length, (B, 1, 1, S); additive, so
        # that SDPA does not convert a boolean mask on every layer
        pad = torch.arange(S, device=dev)[None, :] >= torch.tensor(ends, device=dev)[:, None]
        self.mask = torch.zeros(pad.shape, dtype=pool.dtype, device=dev).masked_fill_(pad, float("-inf"))[:, None, None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
        """Store `layer`'s k, v (B, Hkv, L, D); attention of q (B, H, L, D) over each row's keys so far."""
        assert self.pool.k is not None and self.pool.v is not None
        pk, pv, B, S, s0 = self.pool.k[layer], self.pool.v[layer], q.shape[0], self.S, self.first
        if B == 1:  # one sequence: its chunk lands at [offset, offset + L)
            pk[s0, :, self.offset:S] = k[0]
            pv[s0, :, self.offset:S] = v[0]
            if self.rowwise:  # each position as its own decode step would attend: bit for bit the same
                return torch.cat([F.scaled_dot_product_attention(
                    q[:, :, j:j + 1], pk[s0:s0 + 1, :, :self.offset + j + 1], pv[s0:s0 + 1, :, :self.offset + j + 1],
                    enable_gqa=gqa) for j in range(q.shape[2])], dim=2)
            causal = self.mask is None and q.shape[2] > 1
            return F.scaled_dot_product_attention(q, pk[s0:s0 + 1, :, :S], pv[s0:s0 + 1, :, :S],
                                                  attn_mask=self.mask, is_causal=causal, enable_gqa=gqa)
        pk[self.rows, :, self.at] = k[:, :, 0]  # one token per row, each at its own position
        pv[self.rows, :, self.at] = v[:, :, 0]
        if self.gather:
            keys, values = pk[self.rows, :, :S], pv[self.rows, :, :S]
        else:
            keys, values = pk[s0:s0 + B, :, :S], pv[s0:s0 + B, :, :S]
        if self.perm is not None:
            q = q[self.perm]
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, enable_gqa=gqa)
        return o if self.unperm is None else o[self.unperm]


# bumped whenever a block's module gets an attribute set (an adapter's wrapper replacing a projection, a
# weight loaded): a slice's fused-forward plan (SliceModel._make_plan) holds the modules it was made from
_generation = [0]


class _Watched(nn.Module):
    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        _generation[0] += 1


class RMSNorm(_Watched):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # as HF: normalise in fp32, cast back, then scale (F.rms_norm: one op instead of five)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Attention(_Watched):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = a.n_heads, a.n_kv_heads, a.head_dim
        self.sizes = [a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim]
        self.wqkv: nn.Module = nn.Linear(a.hidden_size, sum(self.sizes), bias=a.qkv_bias)
        self.wo: nn.Module = nn.Linear(self.sizes[0], a.hidden_size, bias=a.o_bias and a.row_bias)
        self.reduce = a.reduce

    def forward(self, x, cos, sin, kv: StepKV, layer: int):
        o = self.wo(self.attend(self.wqkv(x), cos, sin, kv, layer).to(x.dtype))
        return o if self.reduce is None else self.reduce(o)

    def attend(self, qkv: torch.Tensor, cos, sin, kv: StepKV, layer: int) -> torch.Tensor:
        """The attention output (B, L, H D) of the fused projection's output qkv (B, L, (H + 2 Hkv) D)."""
        B, L, _ = qkv.shape
        kernel = getattr(kv, "kernel", None)  # a training forward's attention has none
        if kernel is not None:  # in qkv's dtype
            return kernel(qkv, cos, sin, kv.pool.k, kv.pool.v, layer, kv.slot_rows, kv.starts, self.n_heads, self.n_kv)
        qkv = qkv.to(cos.dtype)  # attention runs in the dtype of the caches (SliceModel.kv_dtype)
        nq = self.n_heads + self.n_kv  # one RoPE call for the heads of q and k together
        qk = apply_rope(qkv[..., :nq * self.hd].view(B, L, nq, self.hd), cos, sin).transpose(1, 2)
        q, k = qk[:, :self.n_heads], qk[:, self.n_heads:]  # (B, H, L, D), (B, Hkv, L, D)
        v = qkv[..., nq * self.hd:].view(B, L, self.n_kv, self.hd).transpose(1, 2)
        o = kv.attend(layer, q, k, v, self.n_kv != self.n_heads)  # (B, H, L, D)
        return o.transpose(1, 2).reshape(B, L, -1)


class MLP(_Watched):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.w13: nn.Module = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=a.mlp_bias)  # gate ; up
        self.w2: nn.Module = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias and a.row_bias)
        self.reduce = a.reduce

    def forward(self, x):
        g, u = self.w13(x).chunk(2, dim=-1)
        o = self.w2(F.silu(g) * u)
        return o if self.reduce is None else self.reduce(o)


class Block(_Watched):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(a.hidden_size, a.norm_eps)
        self.attention = Attention(a)
        self.ffn_norm = RMSNorm(a.hidden_size, a.norm_eps)
        self.feed_forward = MLP(a)

    def forward(self, x, cos, sin, kv, layer):
        h = x + self.attention(self.attention_norm(x), cos, sin, kv, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class SliceModel(nn.Module):
    """Layers [start, end); the first slice embeds, the last applies the final norm (see `head`)."""

    inv_freq: torch.Tensor  # a buffer (not a parameter): RoPE's inverse frequencies
    compute_dtype = torch.float32  # set by load_slice; packed weights have no float dtype to read
    # keys, values and attention: float32 on a CPU, whose bfloat16 SDPA decodes ~8x slower than float32
    kv_dtype = torch.float32
    weight_format = "float32"  # what the layers' projections hold: a dtype, or e.g. "int4/g32"
    # kernels/layer.cpp's (rmsnorm, add_rmsnorm, attend) where load_slice found it usable, else
    # None: every step as torch ops (builtin functions, not the module: a deepcopy takes them as they are)
    fused: tuple[Any, ...] | None = None

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        # no random init (on meta it imports torch._dynamo: a second of every start); load_slice replaces it
        self.embed: nn.Module | None = nn.Embedding.from_pretrained(
            torch.empty(a.vocab_size, a.hidden_size)) if a.first else None
        self.layers = nn.ModuleList(Block(a) for _ in range(a.start, a.end))
        self.norm = RMSNorm(a.hidden_size, a.norm_eps) if a.last else None
        self.lm_head: nn.Module | None = nn.Linear(a.hidden_size, a.vocab_size, bias=False) if a.last else None
        self.register_buffer("inv_freq", rope_inv_freq(a), persistent=False)

    def block(self, i: int) -> Block:
        """Block i of the slice (0 = layer `start`)."""
        return cast(Block, self.layers[i])

    def new_pool(self) -> KVPool:
        a = self.args
        return KVPool(len(self.layers), a.n_kv_heads, a.head_dim, self.kv_dtype, self.inv_freq.device)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, pool: KVPool, slots: list[int],
                rowwise: bool = False) -> torch.Tensor:
        """x: token ids (B, L) or hidden (B, L, C); pos: (B, L) positions; row b's keys and values in
        slot slots[b] of `pool`. B > 1 only for decode (L == 1). rowwise: each position attends as a
        decode step of its own would (a drafted chunk, whose positions must be drawn exactly as
        without drafts). Returns hidden (B, L, C), final-normed on the last slice."""
        if self.embed is not None and not x.is_floating_point():
            x = self.embed(x)
        dtype = self.compute_dtype
        x = x.to(dtype)
        freqs = pos.to(self.inv_freq.device, torch.float32)[..., None] * self.inv_freq  # (B, L, D/2)
        cos, sin = freqs.cos().to(self.kv_dtype)[:, :, None], freqs.sin().to(self.kv_dtype)[:, :, None]
        if self.fused is not None and len(self.layers):
            return self._fused_forward(x, cos, sin, StepKV(pool, slots, pos, rowwise, self.fused[2]))
        kv = StepKV(pool, slots, pos, rowwise)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv, i)
        return self.norm(x) if self.norm is not None else x

    def _fused_forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: StepKV) -> torch.Tensor:
        """The blocks' forward with the norms (each with the residual add before it) and decode attention
        in kernels/layer.cpp, over (B L, C) rows, from a plan of plain tensors and functions
        (`_plan`): at batch 1 torch's dispatch of ~50 small ops a layer and nn.Module's attribute lookups
        and calls cost more than the matmuls' compute did (perf/bench_torch_batch.py --profile 1)."""
        rmsnorm, add_rmsnorm = cast(tuple, self.fused)[:2]
        if self._plan[0] != _generation[0]:
            self._plan = (_generation[0], *self._make_plan())
        _, plan, norm, blocks = self._plan
        shape, eps, kernel = x.shape, self.args.norm_eps, kv.kernel
        rows = (shape[0], shape[1])
        x = x.reshape(-1, shape[-1])
        pk, pv = kv.pool.k, kv.pool.v  # after StepKV reserved this step's room
        slots, starts = (kv.slot_rows, kv.starts) if kernel is not None else (None, None)
        if kernel is not None and blocks is not None:  # a decode step: the loop below in one call, without the GIL
            return blocks.forward(x, cos, sin, pk, pv, slots, starts).view(shape)
        h = y = x
        for i, (an, wqkv, wo, fn, w13, w2, att) in enumerate(plan):
            if i == 0:
                xn = rmsnorm(x, an, eps)
            else:  # the previous block's MLP residual, then this block's norm
                x, xn = add_rmsnorm(h, y, an, eps)
            qkv = wqkv(xn, rows)
            if kernel is not None:
                o = kernel(qkv, cos, sin, pk, pv, i, slots, starts, att.n_heads, att.n_kv)
            else:  # a prefill chunk: torch's attention (one SDPA over the chunk)
                o = att.attend(qkv.view(*rows, -1), cos, sin, kv, i).reshape(x.shape[0], -1).to(x.dtype)
            h, hn = add_rmsnorm(x, wo(o, rows), fn, eps)
            g, u = w13(hn, rows).chunk(2, dim=-1)
            y = w2(F.silu(g) * u, rows)
        out = add_rmsnorm(h, y, norm, eps)[1] if norm is not None else h + y
        return out.view(shape)

    _plan: tuple = (-1, [], None, None)  # (_generation when made, *_make_plan())

    def _make_plan(self) -> tuple[list[tuple], torch.Tensor | None, Any]:
        """Per block: (attention norm weight, wqkv, wo, MLP norm weight, w13, w2, the attention module), each
        projection a function of ((B L, in) rows, (B, L)) with its tensor-parallel reduce; one of our q4
        kernel's packed projections as a direct call of the kernel (the module's forward: ~13 us a call);
        the final norm's weight (None but on the last slice); and the same decode step as one call of
        kernels/layer.cpp's Blocks where every projection is a plain one it runs (else None)."""
        plan, projs = [], []
        for i in range(len(self.layers)):
            blk = self.block(i)
            att, ffn = blk.attention, blk.feed_forward
            plan.append((blk.attention_norm.weight, _rows_fn(att.wqkv, None), _rows_fn(att.wo, att.reduce),
                         blk.ffn_norm.weight, _rows_fn(ffn.w13, None), _rows_fn(ffn.w2, ffn.reduce), att))
            projs += [_proj(att.wqkv, None), _proj(att.wo, att.reduce), _proj(ffn.w13, None), _proj(ffn.w2, ffn.reduce)]
        norm = None if self.norm is None else self.norm.weight
        blocks = None
        if self.fused is not None and len(self.fused) > 3 and plan and all(p is not None for p in projs):
            blocks = self.fused[3]([p[0] for p in plan], [p[3] for p in plan], projs, [p[6].n_heads for p in plan],
                                   [p[6].n_kv for p in plan], norm, self.args.norm_eps)
        return plan, norm, blocks

    def head(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            raise ModelError(f"layers [{self.args.start}, {self.args.end}) are not the last slice: no head")
        return self.lm_head(h)


def _rows_fn(m: nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[..., torch.Tensor]:
    """m as a function of (rows (N, in), (B, L)) -> (N, out), then `reduce` if any (see _make_plan)."""
    if isinstance(m, PackedLinear) and m.q4 is not None and m.bias is None and reduce is None:
        f, q, s, c, g = m.q4, m.q4q, m.q4s, m.q4c, m.group_size
        return lambda x, rows: f(x, q, s, c, g)  # x: bfloat16, as every packed slice computes in
    if reduce is None:
        return lambda x, rows: m(x.view(*rows, -1)).flatten(0, 1)  # a LoRA wrapper reads (B, L, C)
    return lambda x, rows: reduce(m(x.view(*rows, -1))).flatten(0, 1)


def _proj(m: nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[int, list[torch.Tensor], int] | None:
    """m as kernels/layer.cpp's Blocks takes a projection: (0, [W], 0) for a plain nn.Linear without a bias,
    (1, [q, s, c], group) for our q4 kernel's packed weights, (2, ...) for its q8 ones; None for anything else
    (an adapter's wrapper, a bias, torch's int4 kernel, a tensor-parallel reduce): the step then runs op by op."""
    if reduce is not None:
        return None
    if isinstance(m, PackedLinear) and m.q4 is not None and m.bias is None:
        return (1 if m.bits == 4 else 2), [m.q4q, m.q4s, m.q4c], m.group_size
    if type(m) is nn.Linear and m.bias is None:
        return 0, [m.weight], 0
    return None


def fused_ops(device: torch.device, dtype: torch.dtype) -> tuple[Any, ...] | None:
    """kernels/layer.cpp's ops (rmsnorm, add_rmsnorm, attend, Blocks) where they serve a slice: on a CPU
    (float32 caches), float32 or bfloat16 activations, the kernel built, and not turned off
    (TOGETHER_FUSED=0: benchmarks compare the two)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or os.environ.get("TOGETHER_FUSED") == "0":
        return None
    mod = kernels.layer()
    if mod is None:
        return None
    # TOGETHER_FUSED=ops: the fused ops called one by one from Python, no Blocks (benchmarks compare the two)
    return (mod.rmsnorm, mod.add_rmsnorm, mod.attend) + (() if os.environ.get("TOGETHER_FUSED") == "ops" else (mod.Blocks,))


def load_slice(ck: Checkpoint, start: int, end: int, dtype: str = "float32",
               device: str | torch.device = "cpu", *, packed: bool = True, edges: bool = True,
               row_bias: bool = True, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SliceModel:
    """Build layers [start, end) of `ck`, reading only the slice's tensors. Quantized projections stay
    packed for bfloat16 compute on a CPU (backends/torch/quant.py) unless packed=False; all else is
    dequantized to `dtype`. A tensor-parallel rank passes its part of the checkpoint and the TP fields."""
    cfg = ck.config
    if cfg.model_type not in ("llama", "mistral", "qwen2"):
        raise ModelError(f"{ck.path}: the torch backend does not support {cfg.model_type!r}")
    validate_slice(ck, start, end, expected_shapes(cfg, start, end, ck.tied_head))
    a = replace(ModelArgs.from_config(cfg, start, end), edges=edges, row_bias=row_bias, reduce=reduce)
    tdt, dev = DTYPES[dtype], torch.device(device)
    with torch.device("meta"):
        model = SliceModel(a)
    ld = Loader(ck, tdt, dev, packed)
    for j, layer in enumerate(range(start, end)):
        p, blk = f"model.layers.{layer}.", model.block(j)
        blk.attention_norm.weight = nn.Parameter(ld.dense(p + "input_layernorm.weight"), requires_grad=False)
        blk.ffn_norm.weight = nn.Parameter(ld.dense(p + "post_attention_layernorm.weight"), requires_grad=False)
        qkv = [p + f"self_attn.{n}_proj." for n in "qkv"]
        blk.attention.wqkv = ld.linear([n + "weight" for n in qkv], [n + "bias" for n in qkv] if a.qkv_bias else None)
        o = p + "self_attn.o_proj."
        blk.attention.wo = ld.linear([o + "weight"], [o + "bias"] if a.o_bias and a.row_bias else None)
        gu = [p + "mlp.gate_proj.", p + "mlp.up_proj."]
        blk.feed_forward.w13 = ld.linear([n + "weight" for n in gu], [n + "bias" for n in gu] if a.mlp_bias else None)
        d = p + "mlp.down_proj."
        blk.feed_forward.w2 = ld.linear([d + "weight"], [d + "bias"] if a.mlp_bias and a.row_bias else None)
    if a.first:
        model.embed = ld.embedding("model.embed_tokens.weight")
    if a.last and model.norm is not None:
        model.norm.weight = nn.Parameter(ld.dense("model.norm.weight"), requires_grad=False)
        model.lm_head = ld.head("model.embed_tokens.weight" if ck.tied_head else "lm_head.weight", model.embed)
    model.inv_freq = rope_inv_freq(a).to(dev)
    model.compute_dtype = tdt
    model.kv_dtype = torch.float32 if dev.type == "cpu" else tdt
    model.fused = fused_ops(dev, tdt)
    blocks = [model.block(j) for j in range(end - start)]
    projs = [m for b in blocks for m in (b.attention.wqkv, b.attention.wo, b.feed_forward.w13, b.feed_forward.w2)]
    projs += [model.lm_head] if model.lm_head is not None else []
    model.weight_format = "+".join(dict.fromkeys(weight_format(m) for m in projs))
    return model.eval().requires_grad_(False)
