"""A trainable torch slice: the gpt-fast blocks of backends/torch/model.py (dense weights in the job's
dtype) with mlx-lm's LoRALinear update on every adapted part of the fused projections, gradients by
autograd, and mlx's Adam by hand (torch's Adam corrects its moments' bias; mlx's, by default, does not)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backends.torch.lora import FUSED, _part_sizes
from backends.torch.model import DTYPES, load_slice
from backends.train import LoraSpec, MicroBatch, TrainSlice
from backends.weights import Checkpoint
from backends.wire import Hidden


class _Causal:
    """Attention of a training forward: the chunk over itself, causal, no cache (StepKV's interface)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)


class LoRAParts(nn.Module):
    """A (fused) projection plus a trainable LoRA pair on each adapted part of its output:
    y = base(x) + concat_i(scale * ((x @ a_i) @ b_i)), zero for a part without one."""

    def __init__(self, base: nn.Module, parts: list[int], pairs: list[tuple[nn.Parameter, nn.Parameter] | None],
                 scale: float):
        super().__init__()
        self.base, self.parts, self.scale = base, parts, scale
        self.pairs = pairs
        for i, p in enumerate(pairs):  # registered, so that autograd's parameters are the module's
            if p is not None:
                self.register_parameter(f"a{i}", p[0])
                self.register_parameter(f"b{i}", p[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        deltas = [self.scale * ((x @ p[0]) @ p[1]) if p is not None else
                  torch.zeros(*x.shape[:-1], n, dtype=y.dtype, device=y.device)
                  for p, n in zip(self.pairs, self.parts)]
        return y + (torch.cat(deltas, dim=-1) if len(deltas) > 1 else deltas[0])


class TorchTrainSlice(TrainSlice):
    backend = "torch"

    def __init__(self, ck: Checkpoint, start: int, end: int, spec: LoraSpec, dtype: str = "float32",
                 device: str | None = None):
        super().__init__(ck, start, end, spec, dtype)
        self.device = torch.device(device or "cpu")
        self.dt = DTYPES[dtype]
        # dense weights of its own: the served shard (perhaps packed int4) is left as it is
        self.model = load_slice(ck, start, end, dtype, self.device, packed=False)
        self.params: dict[str, nn.Parameter] = {}
        for i in self.adapted():
            self._adapt(i)
        self._import(self.initial())
        self.m = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.attn = _Causal()

    def _adapt(self, layer: int) -> None:
        block = self.model.block(layer - self.start)
        for path, names in FUSED.items():
            parent_name, attr = path.split(".")
            parent = getattr(block, parent_name)
            base = getattr(parent, attr)
            parts = _part_sizes(block, path)
            d_in = int(getattr(base, "in_features"))
            pairs: list[tuple[nn.Parameter, nn.Parameter] | None] = []
            for name, d_out in zip(names, parts):
                if name not in self.spec.keys:
                    pairs.append(None)
                    continue
                full = f"model.layers.{layer}.{name}"
                a = nn.Parameter(torch.zeros(d_in, self.spec.rank, dtype=self.dt, device=self.device))
                b = nn.Parameter(torch.zeros(self.spec.rank, d_out, dtype=self.dt, device=self.device))
                self.params[full + ".lora_a"], self.params[full + ".lora_b"] = a, b
                pairs.append((a, b))
            if any(p is not None for p in pairs):
                setattr(parent, attr, LoRAParts(base, parts, pairs, self.spec.scale))

    # ---- compute

    def _tensor(self, x: Hidden) -> torch.Tensor:
        with warnings.catch_warnings():  # read-only wire buffers: never written to
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(x.data, dtype=DTYPES[x.dtype])
        return t.view(x.shape).to(self.device, self.dt, copy=True)

    def _input(self, mb: MicroBatch, x: Hidden | None) -> torch.Tensor:
        if x is None:
            return torch.from_numpy(np.ascontiguousarray(mb.tokens[:, :-1])).to(self.device, torch.long)
        return self._tensor(x)

    def _hidden(self, y: torch.Tensor) -> Hidden:
        y = y.detach().to(self.dt).contiguous().cpu()
        return Hidden(y.view(torch.uint8).numpy().tobytes(), self.dtype, tuple(y.shape))

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """The slice's blocks over (B, L) ids or (B, L, C) hidden states; final-normed on the last."""
        m = self.model
        if m.embed is not None and not x.is_floating_point():
            x = m.embed(x)
        x = x.to(m.compute_dtype)
        pos = torch.arange(x.shape[1], device=m.inv_freq.device, dtype=torch.float32)[None]
        freqs = pos[..., None] * m.inv_freq  # (1, L, D/2)
        cos, sin = freqs.cos().to(m.kv_dtype)[:, :, None], freqs.sin().to(m.kv_dtype)[:, :, None]
        for i, layer in enumerate(m.layers):
            x = layer(x, cos, sin, self.attn, i)
        return m.norm(x) if m.norm is not None else x

    def _keep(self, mb: MicroBatch, x: Hidden | None) -> object:
        return self._input(mb, x)

    def _forward(self, mb: MicroBatch, x: Hidden | None) -> Hidden:
        with torch.no_grad():
            return self._hidden(self._run(self._input(mb, x)))

    def _backward(self, kept: object, grad: Hidden, want_grad: bool) -> Hidden | None:
        assert isinstance(kept, torch.Tensor)
        x = kept.detach().requires_grad_(want_grad and kept.is_floating_point())
        with torch.enable_grad():
            self._run(x).backward(self._tensor(grad))  # parameters' .grad accumulate across micro-batches
        return self._hidden(x.grad) if want_grad and x.grad is not None else None

    def _loss_value(self, mb: MicroBatch, h: torch.Tensor) -> torch.Tensor:
        logits = self.model.head(self._run(h)).float()  # (B, L, V)
        targets = torch.from_numpy(np.ascontiguousarray(mb.tokens[:, 1:])).to(self.device, torch.long)
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        return (ce * torch.from_numpy(mb.mask()).to(self.device)).sum() / mb.norm

    def _loss(self, mb: MicroBatch, x: Hidden | None) -> float:
        with torch.no_grad():
            return float(self._loss_value(mb, self._input(mb, x)))

    def _loss_backward(self, mb: MicroBatch, x: Hidden | None, want_grad: bool) -> tuple[float, Hidden | None]:
        h = self._input(mb, x)
        h = h.requires_grad_(want_grad and h.is_floating_point())
        with torch.enable_grad():
            loss = self._loss_value(mb, h)
            loss.backward()
        return float(loss.detach()), self._hidden(h.grad) if want_grad and h.grad is not None else None

    def _apply(self) -> None:
        lr, (b1, b2), eps = self.adam.learning_rate, self.adam.betas, self.adam.eps
        with torch.no_grad():
            for n, p in self.params.items():
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                self.m[n] = b1 * self.m[n] + (1 - b1) * g
                self.v[n] = b2 * self.v[n] + (1 - b2) * g.square()
                p.copy_(p - lr * self.m[n] / (self.v[n].sqrt() + eps))
                p.grad = None

    # ---- state

    def _export(self) -> dict[str, np.ndarray]:
        out = {}
        for n, p in self.params.items():
            out[n] = p.detach().float().cpu().numpy()
            out[n + ".m"] = self.m[n].float().cpu().numpy()
            out[n + ".v"] = self.v[n].float().cpu().numpy()
        return out

    def _import(self, tensors: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for n, v in tensors.items():
                t = torch.from_numpy(np.ascontiguousarray(v, np.float32)).to(self.device, self.dt)
                if n in self.params:
                    self.params[n].copy_(t)
                elif n.endswith((".m", ".v")) and hasattr(self, "m") and n[:-2] in self.params:
                    (self.m if n.endswith(".m") else self.v)[n[:-2]] = t.clone()

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":  # the GPU's memory is what a CUDA peer runs short of
            return int(torch.cuda.max_memory_allocated(self.device))
        return super().peak_bytes()

    def trainable(self) -> int:
        return sum(p.numel() for p in self.params.values())
