"""Trainable slices: the LoRA weights of layers [start, end) of a model, trained with the backend's
autodiff (`mx.grad` on MLX, autograd on torch) so that a ring of stages trains one adapter.

A slice computes exactly what `together lora` (mlx-lm's tuner) computes on its layers: mlx-lm's
LoRALinear update y = W x + scale * ((x @ a) @ b), the masked cross-entropy of mlx-lm's default loss
(prompt masking by per-row offsets and lengths), and mlx's Adam (no bias correction, constant rate).
Initial weights follow `init_lora`, a rule of the weight's name and the seed, which `together lora`
uses too: every backend, every split and the single process start from the same adapter.

Memory: a stage keeps only each micro-batch's input until its backward and recomputes the forward
then (as `--grad-checkpoint` does per layer), so a stage holds one micro-batch's activations at a time.
"""

from __future__ import annotations

import abc
import math
import resource
import sys
import zlib
from dataclasses import dataclass

import numpy as np

from backends.config import ModelConfig
from backends.errors import RequestError
from backends.lora import MODULES, module_dims
from backends.shard import backend_module
from backends.weights import Checkpoint
from backends.wire import Hidden

BETAS = (0.9, 0.999)  # mlx.optimizers.Adam's defaults, which `together lora` uses
EPS = 1e-8


def init_lora(name: str, d_in: int, rank: int, seed: int) -> np.ndarray:
    """The initial `lora_a` (d_in, rank) of the weight named `name` (model.layers.N.<module>.lora_a):
    uniform in +-1/sqrt(d_in) as mlx-lm's LoRALinear, drawn from a generator keyed by the seed and the
    name, so any process holding that layer draws the same values; `lora_b` starts at zero."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])
    bound = 1 / math.sqrt(d_in)
    return rng.uniform(-bound, bound, size=(d_in, rank)).astype(np.float32)


@dataclass
class LoraSpec:
    """What a job trains: rank and scale, layers [lo, hi) and their modules, seed and rate."""

    rank: int
    scale: float
    lo: int
    hi: int
    keys: tuple[str, ...] = MODULES
    seed: int = 0
    learning_rate: float = 1e-5

    def check(self, cfg: ModelConfig) -> None:
        if self.rank < 1 or not 0 <= self.lo < self.hi <= cfg.num_hidden_layers:
            raise RequestError(f"bad LoRA settings: rank {self.rank}, layers [{self.lo}, {self.hi}) of "
                               f"{cfg.num_hidden_layers}")
        bad = [k for k in self.keys if k not in MODULES]
        if bad or not self.keys:
            raise RequestError(f"LoRA modules {bad or '(none)'}: a ring trains {', '.join(MODULES)}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise RequestError("the learning rate must be a positive number")


@dataclass
class MicroBatch:
    """Rows of one micro-batch: tokens (rows, width + 1) int32, inputs [:, :-1] and targets [:, 1:];
    a target at step t (1-based) counts when offsets[r] <= t <= lengths[r] (mlx-lm's mask), and the
    loss is the counted cross-entropy's sum over `norm` (the whole batch's count)."""

    tokens: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    norm: float

    def __post_init__(self) -> None:
        t = self.tokens
        if t.ndim != 2 or t.shape[1] < 2 or t.dtype != np.int32:
            raise RequestError(f"a micro-batch is rows x (width + 1) int32 tokens, got {t.dtype}{t.shape}")
        if self.offsets.shape != (t.shape[0],) or self.lengths.shape != (t.shape[0],):
            raise RequestError("a micro-batch needs one offset and one length per row")
        if not self.norm > 0:
            raise RequestError("a micro-batch's loss normaliser must be positive")

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, width) of the inputs."""
        return self.tokens.shape[0], self.tokens.shape[1] - 1

    def mask(self) -> np.ndarray:
        """(rows, width) float32: which targets count."""
        steps = np.arange(1, self.shape[1] + 1)[None, :]
        return ((steps >= self.offsets[:, None]) & (steps <= self.lengths[:, None])).astype(np.float32)

    @property
    def ntokens(self) -> int:
        return int(self.mask().sum())


@dataclass
class Adam:
    """mlx.optimizers.Adam on numpy-named moments: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
    w -= lr m / (sqrt(v) + eps), no bias correction; `step` counts updates (as mlx's state does)."""

    learning_rate: float
    step: int = 0
    betas: tuple[float, float] = BETAS
    eps: float = EPS


class TrainSlice(abc.ABC):
    """The trainable LoRA weights of layers [start, end) on a backend, with its frozen base.

    Backends implement `_forward` (no gradient), `_backward` (recompute, accumulate the parameters'
    gradients, return the input's) and `_loss_backward` (last slice), `_apply` (Adam) and the
    tensors' import and export by global name."""

    backend = ""

    def __init__(self, ck: Checkpoint, start: int, end: int, spec: LoraSpec, dtype: str):
        cfg = ck.config
        spec.check(cfg)
        if not 0 <= start < end <= cfg.num_hidden_layers:
            raise RequestError(f"bad layer range [{start}, {end})")
        self.config, self.start, self.end, self.spec, self.dtype = cfg, start, end, spec, dtype
        self.adam = Adam(spec.learning_rate)
        self.kept: dict[tuple[int, int], object] = {}  # (step, micro) -> the input kept for its backward
        self.accumulated = 0  # micro-batches whose gradients wait for the next step

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.config.num_hidden_layers

    @property
    def trains(self) -> bool:
        """Whether any of this slice's layers is adapted."""
        return self.start < self.spec.hi and self.spec.lo < self.end

    def adapted(self) -> list[int]:
        return [i for i in range(max(self.start, self.spec.lo), min(self.end, self.spec.hi))]

    def initial(self) -> dict[str, np.ndarray]:
        """The adapter's initial tensors for this slice, by global name (see `init_lora`)."""
        dims, out = module_dims(self.config), {}
        for i in self.adapted():
            for key in self.spec.keys:
                d_in, d_out = dims[key]
                name = f"model.layers.{i}.{key}"
                out[name + ".lora_a"] = init_lora(name + ".lora_a", d_in, self.spec.rank, self.spec.seed)
                out[name + ".lora_b"] = np.zeros((self.spec.rank, d_out), np.float32)
        return out

    # ---- one micro-batch

    def forward(self, key: tuple[int, int], mb: MicroBatch, x: Hidden | None, keep: bool) -> Hidden:
        """A non-last slice's output for a micro-batch; with `keep` its input stays for `backward`."""
        self._check_input(mb, x)
        if keep:
            self.kept[key] = self._keep(mb, x)
        return self._forward(mb, x)

    def backward(self, key: tuple[int, int], grad: Hidden, want_grad: bool) -> Hidden | None:
        """Given the gradient of the output, accumulate the parameters' gradients; the input's gradient
        when `want_grad`. Recomputes the forward from the kept input."""
        kept = self.kept.pop(key, None)
        if kept is None:
            raise RequestError(f"no kept input for micro-batch {key} (its forward did not run here)")
        out = self._backward(kept, grad, want_grad)
        self.accumulated += 1
        return out

    def loss(self, key: tuple[int, int], mb: MicroBatch, x: Hidden | None, train: bool,
             want_grad: bool) -> tuple[float, int, Hidden | None]:
        """Last slice: (the masked cross-entropy sum / norm, targets counted, the input's gradient);
        with `train` the parameters' gradients accumulate."""
        if not self.is_last:
            raise RequestError("the loss needs the last slice")
        self._check_input(mb, x)
        if not train:
            return self._loss(mb, x), mb.ntokens, None
        value, grad = self._loss_backward(mb, x, want_grad)
        self.accumulated += 1
        return value, mb.ntokens, grad

    def step(self) -> None:
        """One Adam update with the gradients summed over the micro-batches since the last step."""
        self.adam.step += 1
        if self.trains:
            self._apply()
        self.accumulated = 0
        self.kept.clear()

    def _check_input(self, mb: MicroBatch, x: Hidden | None) -> None:
        rows, width = mb.shape
        if self.is_first:
            if x is not None:
                raise RequestError("the first slice takes token ids, not hidden states")
            if mb.tokens.min() < 0 or mb.tokens.max() >= self.config.vocab_size:
                raise RequestError("token id out of the vocabulary")
        elif x is None or x.shape != (rows, width, self.config.hidden_size):
            raise RequestError(f"expected hidden states of shape ({rows}, {width}, {self.config.hidden_size}), "
                               f"got {getattr(x, 'shape', None)}")

    # ---- state

    def state(self) -> dict[str, np.ndarray]:
        """The adapter (name.lora_a / .lora_b) and Adam's moments (name.lora_a.m / .v) as float32."""
        return self._export()

    def load_state(self, tensors: dict[str, np.ndarray], step: int) -> None:
        """A resumed job's adapter and moments for this slice's layers (moments optional); every
        adapted weight of the slice must be there."""
        want = set(self.initial())
        have = {n for n in tensors if n in want}
        if have != want:
            missing = sorted(want - have)
            raise RequestError(f"the resumed adapter lacks {len(missing)} tensors of layers "
                               f"[{self.start}, {self.end}) (e.g. {missing[0]}): it was trained with other "
                               f"--layers or --rank")
        shapes = self.initial_shapes()
        for n in want:
            if tensors[n].shape != shapes[n]:
                raise RequestError(f"the resumed {n} has shape {tensors[n].shape}, expected "
                                   f"{shapes[n]} (another --rank?)")
        self._import(tensors)
        self.adam.step = step

    def initial_shapes(self) -> dict[str, tuple[int, ...]]:
        dims = module_dims(self.config)
        out: dict[str, tuple[int, ...]] = {}
        for i in self.adapted():
            for key in self.spec.keys:
                d_in, d_out = dims[key]
                out[f"model.layers.{i}.{key}.lora_a"] = (d_in, self.spec.rank)
                out[f"model.layers.{i}.{key}.lora_b"] = (self.spec.rank, d_out)
        return out

    # ---- backend hooks

    @abc.abstractmethod
    def _keep(self, mb: MicroBatch, x: Hidden | None) -> object: ...

    @abc.abstractmethod
    def _forward(self, mb: MicroBatch, x: Hidden | None) -> Hidden: ...

    @abc.abstractmethod
    def _backward(self, kept: object, grad: Hidden, want_grad: bool) -> Hidden | None: ...

    @abc.abstractmethod
    def _loss(self, mb: MicroBatch, x: Hidden | None) -> float: ...

    @abc.abstractmethod
    def _loss_backward(self, mb: MicroBatch, x: Hidden | None, want_grad: bool) -> tuple[float, Hidden | None]: ...

    @abc.abstractmethod
    def _apply(self) -> None: ...

    @abc.abstractmethod
    def _export(self) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def _import(self, tensors: dict[str, np.ndarray]) -> None: ...

    def peak_bytes(self) -> int:
        """The peak resident memory of this slice's process (on a peer: its served shard and libraries
        too), as the benchmarks compare it with one `together lora` process."""
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB (bytes on macOS)
        return int(rss if sys.platform == "darwin" else rss * 1024)

    @abc.abstractmethod
    def trainable(self) -> int:
        """Trainable parameters of the slice."""


def load_train_slice(backend: str, ck: Checkpoint, start: int, end: int, spec: LoraSpec,
                     dtype: str = "float32", device: str | None = None) -> TrainSlice:
    """A trainable slice of layers [start, end) on `backend`, its adapter at its initial values."""
    mod = backend_module(backend, "train")
    if backend == "mlx":
        sl: TrainSlice = mod.MLXTrainSlice(ck, start, end, spec, dtype)
    else:
        sl = mod.TorchTrainSlice(ck, start, end, spec, dtype, device=device)
    return sl
