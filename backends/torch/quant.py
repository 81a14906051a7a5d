"""Packed weights for the torch backend: affine group-quantized tensors (GGUF Q4_0/Q4_1/Q8_0, MLX 4-
and 8-bit) kept packed in the layout of torch's int4 weight-only CPU kernel, never dequantized at load.

The kernel computes w = (q - 8) * scale + zero per group of the input (q in [0, 15]), so an affine
group w = scale * q + bias maps onto it exactly with zero = bias + 8 * scale. An 8-bit group has no
exact home in torch's int8 kernel (one scale per output row, not per group), so it is split into two
4-bit planes, q = 16 * hi + lo: w = (16 * scale) * hi + (scale * lo + bias), two int4 matmuls summed.
The kernel is fast with bfloat16 activations only (float32 ones are ~20x slower), so packed weights
go with bfloat16 compute on a CPU; everything else takes the dense path.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from backends.errors import ModelError
from backends.weights import Affine, Checkpoint

GROUP_SIZES = (32, 64, 128, 256)  # what the kernel takes
BLOCK_N = 64  # the kernel's packed layout interleaves blocks of 64 output rows (see `_unpack`)
# from this many rows up (a prefill chunk) dequantizing a layer's weight and one dense bfloat16 matmul
# beats the int4 kernel, whose large-M path is ~2x slower than the dense one (perf/bench_torch.py)
DENSE_ROWS = 64


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


class PackedLinear(nn.Module):
    """y = x W^T + b with W in affine groups, packed as one (4-bit) or two (8-bit) int4 planes."""

    packed0: torch.Tensor
    sz0: torch.Tensor

    def __init__(self, a: Affine, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = a.packed.shape[0], a.packed.shape[1] * 32 // a.bits
        self.group_size, self.bits = a.group_size, a.bits
        self.dtype, self.device = torch.bfloat16, torch.device("cpu")
        q, s, b = unpack(a), a.scales.astype(np.float32), a.biases.astype(np.float32)
        if a.bits == 4:
            planes = [_plane(q, s, b + 8 * s)]
        else:  # w = 16 s hi + s lo + b: the bias rides on the high plane
            planes = [_plane(q >> 4, 16 * s, b + 128 * s), _plane(q & 15, s, 8 * s)]
        self.planes = len(planes)
        for i, (packed, sz) in enumerate(planes):
            self.register_buffer(f"packed{i}", packed)
            self.register_buffer(f"sz{i}", sz)
        self.bias = None if bias is None else nn.Parameter(bias.to(torch.bfloat16), requires_grad=False)

    def _plane(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"packed{i}"), getattr(self, f"sz{i}")

    def dense(self) -> torch.Tensor:
        """W^T (in, out) in bfloat16, dequantized from the packed planes (a prefill chunk's weight)."""
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] >= DENSE_ROWS:
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
