"""Serving LoRA adapters on MLX: mlx-lm's LoRALinear arithmetic, several adapters per layer,
each applied to the rows of the batch that asked for it."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from backends.lora import Route


class MultiLoRALinear(nn.Module):
    """y = base(x) + scale * ((x @ a) @ b) for the rows routed to each adapter (as LoRALinear)."""

    def __init__(self, base: nn.Module, route: Route):
        super().__init__()
        self.base = base
        self.lora: dict[str, dict[str, mx.array]] = {}
        self._route = route
        self._scales: dict[str, float] = {}  # '_' keeps it out of the parameter tree

    def add(self, name: str, a: np.ndarray, b: np.ndarray, scale: float) -> None:
        self.lora[name] = {"a": mx.array(a), "b": mx.array(b)}
        self._scales[name] = scale

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        for name, rows in self._route.groups():
            w = self.lora.get(name)
            if w is None:
                continue
            d = (self._scales[name] * ((x @ w["a"]) @ w["b"])).astype(x.dtype)
            if rows is not None:  # only some rows of the batch (B, L, out) use this adapter
                m = np.zeros((x.shape[0], 1, 1), np.float32)
                m[rows] = 1
                d = d * mx.array(m).astype(d.dtype)
            y = y + d
        return y


def apply_adapter(layers: list, start: int, name: str, weights: dict, scale: float, route: Route) -> None:
    """Add adapter `name` to the blocks `layers` (model layer `start` first); `weights` maps a layer
    to {module path: (a, b)} with mlx-lm's module paths (self_attn.q_proj, mlp.down_proj, ...)."""
    for layer, mods in weights.items():
        block = layers[layer - start]
        for path, (a, b) in mods.items():
            parent_name, attr = path.rsplit(".", 1)
            parent = block
            for part in parent_name.split("."):
                parent = getattr(parent, part)
            mod = getattr(parent, attr)
            if not isinstance(mod, MultiLoRALinear):
                mod = MultiLoRALinear(mod, route)
                setattr(parent, attr, mod)
            mod.add(name, a, b, scale)
