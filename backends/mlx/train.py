"""A trainable MLX slice: mlx-lm's own blocks with mlx-lm's LoRALinear on the adapted modules,
gradients by `mx.grad`, mlx's Adam: the arithmetic of `together lora`, on a slice of the layers."""

from __future__ import annotations

from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

from backends.errors import RequestError
from backends.mlx.shard import MX_DTYPES, MLXShard
from backends.train import BETAS, EPS, LoraSpec, MicroBatch, TrainSlice
from backends.weights import Checkpoint
from backends.wire import Hidden

_NP = {"float32": np.float32, "float16": np.float16}


def _flat(tree: Any) -> dict[str, mx.array]:
    return dict(cast("list[tuple[str, mx.array]]", tree_flatten(tree)))


class MLXTrainSlice(TrainSlice):
    backend = "mlx"

    def __init__(self, ck: Checkpoint, start: int, end: int, spec: LoraSpec, dtype: str = "float32"):
        super().__init__(ck, start, end, spec, dtype)
        if dtype not in _NP:
            raise RequestError(f"an MLX trainable slice computes in float32 or float16, not {dtype}")
        self.dt = MX_DTYPES[dtype]
        # a slice of its own (not the served shard's modules): serving never sees the adapter in training
        self.model = MLXShard(ck, start, end, dtype).model
        self.model.freeze()
        for i in self.adapted():
            block = self.model.layers[i - start]
            for key in spec.keys:
                parent_name, attr = key.rsplit(".", 1)
                parent = getattr(block, parent_name)
                lora = LoRALinear.from_base(getattr(parent, attr), r=spec.rank, dropout=0.0, scale=spec.scale)
                setattr(parent, attr, lora)
        self._import(self.initial())
        self.opt = optim.Adam(learning_rate=spec.learning_rate, betas=list(BETAS), eps=EPS)
        self.opt.init(self.model.trainable_parameters())
        self.grads: Any = None

    # ---- names: local "layers.j.<module>.lora_a" <-> global "model.layers.i.<module>.lora_a"

    def _global(self, local: str) -> str:
        _, j, rest = local.split(".", 2)
        return f"model.layers.{self.start + int(j)}.{rest}"

    def _local(self, name: str) -> str:
        _, _, i, rest = name.split(".", 3)
        return f"layers.{int(i) - self.start}.{rest}"

    # ---- compute

    def _embed(self, mb: MicroBatch) -> mx.array:
        return self.model.embed_tokens(mx.array(mb.tokens[:, :-1]))  # (B, L, H)

    def _input(self, mb: MicroBatch, x: Hidden | None) -> mx.array:
        return self._embed(mb) if x is None else self._array(x)

    def _array(self, x: Hidden) -> mx.array:
        if x.dtype not in _NP:
            raise RequestError(f"an MLX trainable slice takes float32 or float16 hidden states, not {x.dtype}")
        return mx.array(np.frombuffer(x.data, _NP[x.dtype]).reshape(x.shape)).astype(self.dt)

    def _hidden(self, y: mx.array) -> Hidden:
        y = y.astype(self.dt)
        mx.eval(y)
        return Hidden(np.array(y).tobytes(), self.dtype, tuple(y.shape))

    def _blocks(self, params: Any, x: mx.array) -> mx.array:
        self.model.update(params)  # as nn.value_and_grad: the traced parameters go into the model
        return self.model.blocks(x, [None] * len(self.model.layers))  # no cache: a causal mask

    def _keep(self, mb: MicroBatch, x: Hidden | None) -> object:
        h = self._input(mb, x)
        mx.eval(h)
        return h

    def _forward(self, mb: MicroBatch, x: Hidden | None) -> Hidden:
        return self._hidden(self._blocks(self.model.trainable_parameters(), self._input(mb, x)))

    def _backward(self, kept: object, grad: Hidden, want_grad: bool) -> Hidden | None:
        x = cast(mx.array, kept)
        cot = self._array(grad)

        def dot(params: Any, h: mx.array) -> mx.array:  # its gradient is the vector-Jacobian product
            return (self._blocks(params, h) * cot).sum()

        params = self.model.trainable_parameters()
        if want_grad:
            pg, xg = mx.grad(dot, argnums=(0, 1))(params, x)
        else:
            pg, xg = mx.grad(dot)(params, x), None
        self._accumulate(pg)
        return None if xg is None else self._hidden(xg)

    def _loss_fn(self, mb: MicroBatch) -> Any:
        targets, mask = mx.array(mb.tokens[:, 1:]), mx.array(mb.mask())

        def loss(params: Any, h: mx.array) -> mx.array:  # mlx-lm's default_loss, over the batch's count
            logits = self.model.head(self._blocks(params, h))
            ce = nn.losses.cross_entropy(logits, targets) * mask
            return ce.astype(mx.float32).sum() / mb.norm

        return loss

    def _loss(self, mb: MicroBatch, x: Hidden | None) -> float:
        v = self._loss_fn(mb)(self.model.trainable_parameters(), self._input(mb, x))
        return float(v.item())

    def _loss_backward(self, mb: MicroBatch, x: Hidden | None, want_grad: bool) -> tuple[float, Hidden | None]:
        h, loss, params = self._input(mb, x), self._loss_fn(mb), self.model.trainable_parameters()
        if want_grad:
            v, (pg, xg) = mx.value_and_grad(loss, argnums=(0, 1))(params, h)
        else:
            (v, pg), xg = mx.value_and_grad(loss)(params, h), None
        self._accumulate(pg)
        return float(v.item()), None if xg is None else self._hidden(xg)

    def _accumulate(self, grads: Any) -> None:
        self.grads = grads if self.grads is None else tree_map(lambda a, b: a + b, self.grads, grads)
        mx.eval(self.grads)

    def _apply(self) -> None:
        if self.grads is not None:
            self.opt.update(self.model, self.grads)
            mx.eval(self.model.trainable_parameters(), self.opt.state)
        self.grads = None

    # ---- state

    def _export(self) -> dict[str, np.ndarray]:
        out = {self._global(k): np.array(v.astype(mx.float32))
               for k, v in _flat(self.model.trainable_parameters()).items()}
        for k, v in _flat(self.opt.state).items():
            if k.startswith("layers."):  # the moments; step and rate are the job's
                out[self._global(k)] = np.array(v.astype(mx.float32))
        return out

    def _import(self, tensors: dict[str, np.ndarray]) -> None:
        params = [(self._local(n), mx.array(v).astype(self.dt)) for n, v in tensors.items()
                  if n.endswith((".lora_a", ".lora_b"))]
        self.model.update(tree_unflatten(params))
        mx.eval(self.model.trainable_parameters())
        moments = {self._local(n): v for n, v in tensors.items() if n.endswith((".m", ".v"))}
        if moments and hasattr(self, "opt"):
            state = _flat(self.opt.state)
            state.update((k, mx.array(v)) for k, v in moments.items())
            self.opt.state = tree_unflatten(list(state.items()))
            mx.eval(self.opt.state)

    def trainable(self) -> int:
        return sum(v.size for v in _flat(self.model.trainable_parameters()).values())
