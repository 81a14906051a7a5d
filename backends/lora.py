"""LoRA adapters as `together lora` (and `mlx_lm.lora`) write them, read one layer slice at a time.

An adapter directory holds `adapters.safetensors` (tensors named
`model.layers.{i}.{module}.lora_a` of shape (in, r) and `...lora_b` of shape (r, out)) and
`adapter_config.json` (mlx-lm's keys: fine_tune_type, num_layers, lora_parameters {rank, scale,
dropout, keys}; ours besides: name, base_model, step, target_layers). A linear layer with an
adapter computes y = W x + scale * ((x @ a) @ b), exactly as mlx-lm's LoRALinear does.

Several adapters can be served at once: every shard keeps a `Route` saying which adapter each row
of the batch being computed uses, and the backends' LoRA layers add each adapter's update to its
own rows only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backends.config import ModelConfig
from backends.errors import ModelError
from backends.weights import _SafetensorsFile

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
# the linear modules of a Llama-family block, in mlx-lm's (= Hugging Face's) names
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(lora_a|lora_b)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class Adapter:
    """An adapter on disk: its settings and where each layer's tensors are (read lazily)."""

    name: str
    path: Path
    rank: int
    scale: float
    base_model: str
    step: int
    config: dict
    tensors: dict[int, dict[str, tuple[str, str]]] = field(default_factory=dict)  # layer -> module -> (a, b)
    shapes: dict[str, list[int]] = field(default_factory=dict)  # tensor name -> shape (file header)

    @property
    def layers(self) -> list[int]:
        return sorted(self.tensors)

    @property
    def modules(self) -> list[str]:
        return sorted({m for mods in self.tensors.values() for m in mods})

    def weights(self, start: int, end: int) -> dict[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """(a, b) per module for the adapted layers in [start, end) only, in their saved dtype
        (bfloat16 read as float32); nothing else is read from the file."""
        f = _SafetensorsFile(self.path / ADAPTER_FILE)
        out: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for layer in range(start, end):
            for mod, (ka, kb) in self.tensors.get(layer, {}).items():
                a, b = f.read(ka), f.read(kb)
                if a.dtype not in (np.float16, np.float32) or b.dtype != a.dtype:
                    raise ModelError(f"{self.path}: {ka} / {kb} must be float tensors of one dtype")
                if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                    raise ModelError(f"{self.path}: {ka} {a.shape} and {kb} {b.shape} are not a "
                                     f"LoRA pair (expected (in, r) and (r, out))")
                out.setdefault(layer, {})[mod] = (a, b)
        return out

    def check_fits(self, num_layers: int, dims: dict[str, tuple[int, int]]) -> None:
        """Refuse an adapter made for another model: layers out of range or wrong (in, out) shapes.
        `dims` maps each module name to its (in, out) features."""
        for layer, mods in self.tensors.items():
            if layer >= num_layers:
                raise ModelError(f"adapter {self.name!r} ({self.path}) adapts layer {layer}, but the "
                                 f"model has {num_layers} layers: it was trained for another model "
                                 f"({self.base_model or 'unknown base'})")
            for mod, (ka, kb) in mods.items():
                if mod not in dims:
                    raise ModelError(f"adapter {self.name!r}: module {mod!r} is not a linear layer of "
                                     f"this model (supported: {', '.join(MODULES)})")
                shape_a, shape_b = self.shapes[ka], self.shapes[kb]
                d_in, d_out = dims[mod]
                if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[0] != d_in or shape_b[1] != d_out \
                        or shape_a[1] != shape_b[0]:
                    raise ModelError(
                        f"adapter {self.name!r}: {ka} {tuple(shape_a)} / {kb} {tuple(shape_b)} do not fit "
                        f"{mod} ({d_in} -> {d_out}) of this model: it was trained for another model "
                        f"({self.base_model or 'unknown base'})")


def module_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear module of a block of `cfg`'s model."""
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, kv),
            "self_attn.v_proj": (hidden, kv), "self_attn.o_proj": (q, hidden),
            "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
            "mlp.down_proj": (inter, hidden)}


def open_adapter(spec: str) -> Adapter:
    """Open `PATH` or `NAME=PATH` (a directory with adapters.safetensors + adapter_config.json)."""
    name, _, path_s = spec.rpartition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
    path = Path(path_s).expanduser()
    if path.is_file() and path.name in (ADAPTER_FILE, CONFIG_FILE):
        path = path.parent
    if not path.is_dir():
        raise ModelError(f"adapter {spec!r}: no such directory (train one with `together lora`, "
                         f"or pass the directory holding {ADAPTER_FILE} and {CONFIG_FILE})")
    for f in (ADAPTER_FILE, CONFIG_FILE):
        if not (path / f).is_file():
            raise ModelError(f"adapter {path}: {f} is missing (is training still running, or was "
                             f"it saved elsewhere with --adapter-path?)")
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ModelError(f"adapter {path}: {CONFIG_FILE} is not valid JSON ({e})") from None
    kind = cfg.get("fine_tune_type", "lora")
    if kind != "lora":
        raise ModelError(f"adapter {path}: fine_tune_type {kind!r} is not served (only 'lora'; "
                         f"fuse a {kind} adapter into the model with mlx_lm.fuse instead)")
    lp = cfg.get("lora_parameters") or {}
    try:
        rank, scale = int(lp["rank"]), float(lp["scale"])
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"adapter {path}: {CONFIG_FILE} lacks lora_parameters.rank/scale") from None
    name = name or str(cfg.get("name") or path.name)
    if not _NAME.match(name):
        raise ModelError(f"adapter name {name!r}: use letters, digits, '.', '_' or '-' (up to 64), "
                         f"e.g. --adapter myname={path}")
    ad = Adapter(name, path, rank, scale, str(cfg.get("base_model", "")), int(cfg.get("step", 0)), cfg)
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key, shape in _SafetensorsFile(path / ADAPTER_FILE).shapes.items():
        ad.shapes[key] = list(shape)
        m = _KEY.match(key)
        if not m:
            raise ModelError(f"adapter {path}: unexpected tensor {key!r} (expected "
                             f"model.layers.N.<module>.lora_a / lora_b)")
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = key
    if not pairs:
        raise ModelError(f"adapter {path}: {ADAPTER_FILE} holds no LoRA tensors")
    for (layer, mod), ab in sorted(pairs.items()):
        if set(ab) != {"lora_a", "lora_b"}:
            raise ModelError(f"adapter {path}: layer {layer} {mod} has only {', '.join(ab)}")
        ad.tensors.setdefault(layer, {})[mod] = (ab["lora_a"], ab["lora_b"])
    return ad


class Route:
    """Which adapter each row of the batch under computation uses ('' = the base model)."""

    def __init__(self) -> None:
        self.rows: tuple[str, ...] = ()

    def groups(self) -> list[tuple[str, list[int] | None]]:
        """(adapter, rows) for each adapter present; rows None when it covers the whole batch."""
        names = [n for n in dict.fromkeys(self.rows) if n]
        if len(names) == 1 and all(self.rows):
            return [(names[0], None)]
        return [(n, [i for i, r in enumerate(self.rows) if r == n]) for n in names]
