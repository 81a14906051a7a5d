"""Serving LoRA adapters on torch: the same update as mlx-lm's LoRALinear, on the fused QKV and
gate/up projections too (each part's a/b placed in a block of one wide pair)."""

from __future__ import annotations

import torch
from torch import nn

from backends.lora import Route
from backends.torch.model import Block, SliceModel
from backends.torch.quant import PackedLinear

# torch module -> the mlx-lm / HF modules fused in it, in output order
FUSED = {"attention.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "attention.wo": ("self_attn.o_proj",),
         "feed_forward.w13": ("mlp.gate_proj", "mlp.up_proj"),
         "feed_forward.w2": ("mlp.down_proj",)}


class MultiLoRALinear(nn.Module):
    """A (fused) linear layer plus LoRA adapters, each added to the rows routed to it."""

    def __init__(self, base: nn.Module, route: Route, parts: list[int]):
        super().__init__()
        self.base, self.route, self.parts = base, route, parts  # parts: output sizes of the fused modules
        self.loras: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def add(self, name: str, pairs: list[tuple | None], scale: float) -> None:
        """pairs[i] = (a (in, r), b (r, out_i)) numpy arrays for part i, or None."""
        dtype, device = _dtype_device(self.base)
        ranks = [p[0].shape[1] if p is not None else 0 for p in pairs]
        A = torch.zeros(int(getattr(self.base, "in_features")), sum(ranks), dtype=dtype, device=device)
        B = torch.zeros(sum(ranks), sum(self.parts), dtype=dtype, device=device)
        r0 = c0 = 0
        for p, r, out in zip(pairs, ranks, self.parts):
            if p is not None:
                A[:, r0:r0 + r] = torch.from_numpy(p[0])
                B[r0:r0 + r, c0:c0 + out] = torch.from_numpy(p[1])
            r0, c0 = r0 + r, c0 + out
        self.loras[name] = (A, B, scale)

    @property
    def lora_nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b, _ in self.loras.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for name, rows in self.route.groups():
            lora = self.loras.get(name)
            if lora is None:
                continue
            a, b, scale = lora
            d = scale * ((x @ a) @ b)  # (B, L, out)
            if rows is not None:
                m = torch.zeros(x.shape[0], 1, 1, dtype=d.dtype, device=d.device)
                m[rows] = 1
                d = d * m
            y = y + d
        return y


def apply_adapter(model: SliceModel, start: int, name: str, weights: dict, scale: float, route: Route) -> None:
    """Add adapter `name` to the slice's blocks; `weights` maps a model layer to {mlx-lm module
    path: (a, b)}; fused projections get one wide pair with each part in its own block."""
    for layer, mods in weights.items():
        block = model.block(layer - start)
        for path, names in FUSED.items():
            if not any(n in mods for n in names):
                continue
            parent_name, attr = path.split(".")
            parent = getattr(block, parent_name)
            mod = getattr(parent, attr)
            if not isinstance(mod, MultiLoRALinear):
                mod = MultiLoRALinear(mod, route, _part_sizes(block, path))
                setattr(parent, attr, mod)
            mod.add(name, [mods.get(n) for n in names], scale)


def _dtype_device(base: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The compute dtype and device of a dense (nn.Linear) or packed (PackedLinear) projection."""
    if isinstance(base, PackedLinear):
        return base.dtype, base.device
    w = base.weight
    assert isinstance(w, torch.Tensor)
    return w.dtype, w.device


def _part_sizes(block: Block, path: str) -> list[int]:
    if path == "attention.wqkv":
        return list(block.attention.sizes)
    if path == "feed_forward.w13":
        half = int(getattr(block.feed_forward.w13, "out_features")) // 2
        return [half, half]
    parent, attr = path.split(".")
    return [int(getattr(getattr(block, parent), attr).out_features)]
