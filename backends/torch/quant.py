"""Packed weights for the torch backend: affine group-quantized tensors (GGUF Q4_0/Q4_1/Q8_0, MLX 4-
and 8-bit) kept packed in the layout of torch's int4 weight-only CPU kernel, never dequantized at load.

The kernel computes w = (q - 8) * scale + zero per group of the input (q in [0, 15]), so an affine
group w = scale * q + bias maps onto it exactly with zero = bias + 8 * scale. An 8-bit group has no
exact home in torch's int8 kernel (one scale per output row, not per group), so it is split into two
4-bit planes, q = 16 * hi + lo: w = (16 * scale) * hi + (scale * lo + bias), two int4 matmuls summed.
The kernel is fast with bfloat16 activations only (float32 ones are ~20x slower), so packed weights
go with bfloat16 compute on a CPU; everything else takes the dense path.

Where the CPU has AVX512-BF16 our own kernels (kernels/q4.cpp, compiled once per machine) replace it (the
default; TOGETHER_KERNEL=torch keeps torch's): scales and biases as stored (float16, not rounded to
bfloat16), weights read once per tile of 4 rows, no dequantized copy for a prefill chunk, and a row's
output independent of how many rows share the call (tokens do not depend on the batch or the drafts);
8-bit groups keep one byte plane (q8_mm), not two nibble planes.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from backends.errors import ModelError
from backends.torch import kernels
from backends.weights import Affine, Checkpoint

GROUP_SIZES = (32, 64, 128, 256)  # what the kernel takes
BLOCK_N = 64  # the kernel's packed layout interleaves blocks of 64 output rows (see `_unpack`)
# from this many rows up (a prefill chunk) dequantizing a layer's weight and one dense bfloat16 matmul
# beats the int4 kernel, whose large-M path is ~2x slower than the dense one (perf/bench_torch.py)
DENSE_ROWS = 64
# ours (q4) where it builds: faster than torch's at every row count (perf/bench_torch*.py, issue 13) and
# row-invariant (tests/backends/test_torch_packed.py checks both kernels are); torch's where it cannot
DEFAULT_KERNEL = "q4"


def packable(a: Affine | None, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `a` can stay packed for compute in `dtype` on `device`."""
    return (a is not None and dtype == torch.bfloat16 and device.type == "cpu" and a.bits in (4, 8)
            and a.group_size in GROUP_SIZES and a.packed.shape[0] % BLOCK_N == 0)


def unpack(a: Affine) -> np.ndarray:
    """The unsigned integers of `a`, (out, in) uint8."""
    return a.ints()


def concat(parts: list[Affine]) -> Affine | None:
    """Affine tensors stacked along the output (a fused projection), or None if their groups differ."""
    a0 = parts[0]
    if any(p.bits != a0.bits or p.group_size != a0.group_size for p in parts):
        return None
    return Affine(np.concatenate([p.packed for p in parts]), np.concatenate([p.scales for p in parts]),
                  np.concatenate([p.biases for p in parts]), a0.bits, a0.group_size)


def _plane(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """One 4-bit plane in the kernel's layout: packed (N, K/2) uint8, scales-and-zeros (K/g, N, 2)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q.astype(np.int32)), 1)
    sz = torch.from_numpy(np.stack([scale.T, zero.T], axis=-1)).to(torch.bfloat16).contiguous()
    return packed, sz


def _q4_layout(a: Affine) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit `a` for our q4 kernel (kernels/q4.cpp), output rows in blocks of 16 (the vector lanes): one nibble
    plane (N/16, P=1, K/4, 32) uint8 (byte j of step t: row j/2, low nibble k = 4t + j%2, high 4t + 2 + j%2);
    scales (N/16, P, K/g, 16) and biases (N/16, K/g, 16), in float16 where that holds them exactly (GGUF's
    and MLX's own: 4 bytes a group, as torch's kernel), else float32."""
    q = unpack(a)
    n, k = q.shape
    nb = n // 16
    h = q.reshape(nb, 16, k // 4, 2, 2).transpose(0, 2, 1, 4, 3)  # (block, t, row, e, half)
    packed = (h[..., 0] | (h[..., 1] << 4)).reshape(nb, 1, k // 4, 32)
    s, c = _group_constants(a)
    return torch.from_numpy(np.ascontiguousarray(packed)), s[:, None].contiguous(), c


def _q8_layout(a: Affine) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit `a` for our q8 kernel (kernels/q4.cpp's q8_mm), output rows in blocks of 16: bytes (N/16, K/2, 32)
    (step t: k = 2t, 2t + 1; byte j: row j/2, input 2t + j%2; rows 8-15 in bytes 16-31); scales and biases
    (N/16, K/g, 16), float16 where that holds them exactly, else float32."""
    q = unpack(a)
    n, k = q.shape
    nb = n // 16
    packed = q.reshape(nb, 16, k // 2, 2).transpose(0, 2, 1, 3).reshape(nb, k // 2, 32)  # (block, t, row, e)
    return (torch.from_numpy(np.ascontiguousarray(packed)), *_group_constants(a))


def _group_constants(a: Affine) -> tuple[torch.Tensor, torch.Tensor]:
    """`a`'s scales and biases as our kernels read them, (N/16, K/g, 16) each (block, group, row): float16
    where that holds them exactly (GGUF's and MLX's own: 4 bytes a group), else float32."""
    n, groups = a.scales.shape
    meta = [x.astype(np.float32).reshape(n // 16, 16, groups).transpose(0, 2, 1) for x in (a.scales, a.biases)]
    exact = all(np.array_equal(x.astype(np.float16).astype(np.float32), x) for x in meta)
    s, c = (torch.from_numpy(np.ascontiguousarray(x.astype(np.float16 if exact else np.float32))) for x in meta)
    return s, c


def q4_fits(a: Affine) -> bool:
    """Whether our q4 kernel takes `a`'s shape (blocks of 16 output rows)."""
    return a.packed.shape[0] % 16 == 0 and a.group_size % 4 == 0


def default_kernel() -> str:
    """'q4' (kernels/q4.cpp) or 'torch' (torch's int4 kernel) for packed weights. TOGETHER_KERNEL=q4|torch
    picks one for a whole process (benchmarks compare them); q4 falls back to torch where it cannot build."""
    want = os.environ.get("TOGETHER_KERNEL", DEFAULT_KERNEL)
    if want not in ("q4", "torch"):
        raise ModelError(f"TOGETHER_KERNEL={want!r}: use q4 or torch")
    return "q4" if want == "q4" and kernels.q4() is not None else "torch"


class PackedLinear(nn.Module):
    """y = x W^T + b with W in affine groups, packed as one (4-bit) or two (8-bit) int4 planes, for torch's
    int4 kernel (`kernel="torch"`) or ours (`kernel="q4"`: scales and biases as stored, weights read once
    per tile of 4 rows)."""

    packed0: torch.Tensor
    sz0: torch.Tensor
    q4q: torch.Tensor
    q4s: torch.Tensor
    q4c: torch.Tensor

    def __init__(self, a: Affine, bias: torch.Tensor | None = None, kernel: str | None = None):
        super().__init__()
        self.out_features, self.in_features = a.packed.shape[0], a.packed.shape[1] * 32 // a.bits
        self.group_size, self.bits = a.group_size, a.bits
        self.dtype, self.device = torch.bfloat16, torch.device("cpu")
        kernel = kernel or default_kernel()
        mod = kernels.q4() if kernel == "q4" and q4_fits(a) else None
        # q4_mm, or q8_mm for 8-bit groups (one byte plane, half the vdpbf16ps of two nibble planes); a builtin
        # function: deepcopy takes it as it is
        self.q4 = None if mod is None else mod.q4_mm if a.bits == 4 else mod.q8_mm
        self.kernel = "q4" if self.q4 is not None else "torch"
        self.planes = 1 if a.bits == 4 else 2
        if self.q4 is not None:
            for name, t in zip(("q4q", "q4s", "q4c"), _q4_layout(a) if a.bits == 4 else _q8_layout(a)):
                self.register_buffer(name, t)
        else:
            q, s, b = unpack(a), a.scales.astype(np.float32), a.biases.astype(np.float32)
            if a.bits == 4:
                planes = [_plane(q, s, b + 8 * s)]
            else:  # w = 16 s hi + s lo + b: the bias rides on the high plane
                planes = [_plane(q >> 4, 16 * s, b + 128 * s), _plane(q & 15, s, 8 * s)]
            for i, (packed, sz) in enumerate(planes):
                self.register_buffer(f"packed{i}", packed)
                self.register_buffer(f"sz{i}", sz)
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)

    def _plane(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"packed{i}"), getattr(self, f"sz{i}")

    def dense(self) -> torch.Tensor:
        """W^T (in, out) in bfloat16, dequantized from the packed planes (a prefill chunk's weight)."""
        if self.q4 is not None:
            return self._q4_dense()
        n, k, g, nb = self.out_features, self.in_features, self.group_size, self.out_features // BLOCK_N
        w = None
        for i in range(self.planes):
            packed, sz = self._plane(i)
            p = packed.view(nb, k, BLOCK_N // 2)  # byte [b, k, j]: rows 64b+j (low nibble), 64b+32+j (high)
            q = torch.cat([p & 15, p >> 4], dim=-1).view(nb, k // g, g, BLOCK_N)
            f = sz.float().view(k // g, nb, BLOCK_N, 2).transpose(0, 1)[:, :, None]  # (nb, k/g, 1, 64, 2)
            scale, zero = f[..., 0].contiguous(), (f[..., 1] - 8 * f[..., 0]).contiguous()
            wi = torch.addcmul(zero, q.float(), scale)  # (q - 8) * scale + zero, in one pass
            w = wi if w is None else w + wi
        assert w is not None
        return w.to(torch.bfloat16).view(nb, k, BLOCK_N).transpose(0, 1).reshape(k, n)

    def _q4_dense(self) -> torch.Tensor:
        n, k, g, nb = self.out_features, self.in_features, self.group_size, self.out_features // 16
        if self.bits == 8:  # q8 layout: (block, t, row, e) bytes, w = s u + c
            q = self.q4q.view(nb, k // 2, 16, 2).transpose(1, 2).reshape(nb, 16, k // g, g)
            s8, c8 = (x.float().transpose(1, 2)[..., None] for x in (self.q4s, self.q4c))  # (block, row, G, 1)
            return torch.addcmul(c8, q, s8).reshape(n, k).to(torch.bfloat16).T
        s = self.q4s[:, 0].float().transpose(1, 2)[..., None]  # the one plane's scales (block, row, G, 1)
        c = self.q4c.float().transpose(1, 2)[..., None]  # the bias (block, row, G, 1)
        p = self.q4q[:, 0].view(nb, k // 4, 16, 2, 1)  # (block, t, row, e, half)
        q = torch.cat([p & 15, p >> 4], dim=-1).transpose(-1, -2).reshape(nb, k // 4, 16, 4)
        q = q.transpose(1, 2).reshape(nb, 16, k // g, g)
        return torch.addcmul(c, q, s).reshape(n, k).to(torch.bfloat16).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.q4 is not None:  # ours beats dequantize-and-matmul at every row count (perf/bench_torch.py)
            y = self.q4(x2.to(torch.bfloat16), self.q4q, self.q4s, self.q4c, self.group_size)
        elif x2.shape[0] >= DENSE_ROWS:
            y = x2 @ self.dense()
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed0, self.group_size, self.sz0)
            if self.planes == 2:
                y = y + torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed1, self.group_size, self.sz1)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    @property
    def format(self) -> str:
        return f"int{self.bits}/g{self.group_size}"


class PackedEmbedding(nn.Module):
    """Token embedding kept as its affine groups (one byte per weight), rows dequantized on lookup."""

    q: torch.Tensor
    scales: torch.Tensor
    biases: torch.Tensor

    def __init__(self, a: Affine, dtype: torch.dtype):
        super().__init__()
        self.group_size, self.dtype = a.group_size, dtype
        self.register_buffer("q", torch.from_numpy(unpack(a)))
        self.register_buffer("scales", torch.from_numpy(a.scales.astype(np.float32)))
        self.register_buffer("biases", torch.from_numpy(a.biases.astype(np.float32)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.q[ids].float()  # (..., C)
        g = q.view(*q.shape[:-1], -1, self.group_size)
        w = g * self.scales[ids][..., None] + self.biases[ids][..., None]
        return w.view(q.shape).to(self.dtype)


class Loader:
    """Builds a slice's modules from a checkpoint: packed where `packable`, else dense in `dtype`."""

    def __init__(self, ck: Checkpoint, dtype: torch.dtype, device: torch.device, packed: bool):
        self.ck, self.dtype, self.device = ck, dtype, device
        self.packed = packed and dtype == torch.bfloat16 and device.type == "cpu"

    def dense(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.ck.get(name).numpy()).to(self.device, self.dtype)

    def _affine(self, names: list[str]) -> Affine | None:
        if not self.packed or not all(self.ck.get(n).quantized for n in names):
            return None
        try:  # a tensor-parallel part cut off its groups has no affine form: dense then
            parts = [self.ck.get(n).affine() for n in names]
        except ModelError:
            return None
        a = concat([p for p in parts if p is not None])
        return a if a is not None and packable(a, self.dtype, self.device) else None

    def linear(self, names: list[str], biases: list[str] | None = None) -> nn.Module:
        """The (fused, along the output) projection of tensors `names`, with `biases` if any."""
        bias = torch.cat([self.dense(n) for n in biases]) if biases else None
        a = self._affine(names)
        if a is not None:
            return PackedLinear(a, bias)
        w = torch.cat([self.dense(n) for n in names]) if len(names) > 1 else self.dense(names[0])
        return dense_linear(w, bias)

    def head(self, name: str, embed: nn.Module | None) -> nn.Module:
        """The output projection; a tied one shares a dense embedding's tensor."""
        if isinstance(embed, nn.Embedding) and name == "model.embed_tokens.weight":
            return dense_linear(embed.weight)
        return self.linear([name])

    def embedding(self, name: str) -> nn.Module:
        a = self._affine([name])
        if a is not None:
            return PackedEmbedding(a, self.dtype)
        return nn.Embedding.from_pretrained(self.dense(name), freeze=True)


def dense_linear(w: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    with torch.device("meta"):
        m = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    m.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        m.bias = nn.Parameter(bias, requires_grad=False)
    return m


def weight_format(m: nn.Module) -> str:
    """What a projection holds: 'int4/g32' and the like when packed, else its dtype ('bfloat16')."""
    if isinstance(m, PackedLinear):
        return m.format
    base = getattr(m, "base", m)  # a LoRA wrapper around its base linear
    return weight_format(base) if base is not m else str(getattr(m, "weight").dtype).removeprefix("torch.")
