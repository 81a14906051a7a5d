"""Lazy checkpoint readers: GGUF, HF safetensors dirs and MLX-quantized dirs.

Every reader exposes tensors under HF names in HF orientation (Q/K in half-split RoPE order),
read only when asked, so a slice loads only its own tensors. Quantized tensors that are affine
per group (GGUF Q4_0/Q4_1/Q8_0, MLX-quantized) can be handed over packed, as MLX wants them;
anything else is dequantized to float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from backends.config import ModelConfig
from backends.errors import ModelError


@dataclass
class Affine:
    """Affine group quantization, MLX layout: w = scales * q + biases per group along the input."""

    packed: np.ndarray  # (out, in * bits / 32) uint32, element j of a word at bits [j*bits, (j+1)*bits)
    scales: np.ndarray  # (out, in / group_size) float16/float32
    biases: np.ndarray  # (out, in / group_size)
    bits: int
    group_size: int

    def ints(self) -> np.ndarray:
        """The unsigned integers, (out, in) uint8 (bits <= 8)."""
        return unpack_ints(self.packed, self.bits)

    def dequantize(self) -> np.ndarray:
        q = self.ints().astype(np.float32)
        g = q.reshape(q.shape[0], -1, self.group_size)
        w = g * self.scales.astype(np.float32)[:, :, None] + self.biases.astype(np.float32)[:, :, None]
        return w.reshape(q.shape)

    def rows(self, perm: np.ndarray) -> "Affine":
        return Affine(self.packed[perm], self.scales[perm], self.biases[perm], self.bits, self.group_size)

    def cols(self, start: int, stop: int) -> "Affine":
        """Input columns [start, stop), both on group boundaries."""
        w, g = 32 // self.bits, self.group_size
        return Affine(self.packed[:, start // w: stop // w], self.scales[:, start // g: stop // g],
                      self.biases[:, start // g: stop // g], self.bits, self.group_size)


def unpack_ints(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ints (out, in) uint8 of words (out, words) packed lowest bits first (bits <= 8)."""
    if bits in (4, 8):  # the words' little-endian bytes hold the values in order: no per-lane shifts
        b = np.ascontiguousarray(packed, dtype="<u4").view(np.uint8)
        return b.copy() if bits == 8 else np.stack([b & 15, b >> 4], axis=-1).reshape(b.shape[0], -1)
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    q = (packed[:, :, None] >> shifts) & ((1 << bits) - 1)  # (out, words, per)
    return q.reshape(packed.shape[0], -1).astype(np.uint8)


class TensorRef:
    """One tensor of a checkpoint, read on demand."""

    def __init__(self, name: str, shape: tuple[int, ...], source: str,
                 read_dense: Callable[[], np.ndarray] | None = None,
                 read_affine: Callable[[], Affine] | None = None,
                 row_perm: np.ndarray | None = None,
                 read_part: Callable[[np.ndarray, tuple[int, int] | None], np.ndarray | Affine] | None = None,
                 block: int = 1):
        self.name, self.shape, self.source = name, tuple(shape), source
        self._dense, self._affine, self._perm = read_dense, read_affine, row_perm
        # read_part(stored rows, columns) reads only those (an Affine when quantized, columns then
        # on `block`-wide group boundaries): what part() builds on
        self._part, self.block = read_part, block

    @property
    def quantized(self) -> bool:
        return self._affine is not None

    def affine(self) -> Affine | None:
        """Packed affine form when stored that way, else None."""
        if self._affine is None:
            return None
        a = self._affine()
        return a.rows(self._perm) if self._perm is not None else a

    def _stored_affine(self) -> Affine:
        if self._affine is None:
            raise ModelError(f"{self.source}: {self.name} is not quantized")
        return self._affine()

    def _stored_dense(self) -> np.ndarray:
        if self._dense is None:
            raise ModelError(f"{self.source}: {self.name} has no dense reader")
        return self._dense()

    def _read_part(self, rows: np.ndarray, cols: tuple[int, int] | None) -> np.ndarray | Affine:
        if self._part is None:
            raise ModelError(f"{self.source}: {self.name} has no partial reader")
        return self._part(rows, cols)

    def _affine_part(self, rows: np.ndarray, cols: tuple[int, int] | None) -> Affine:
        a = self._read_part(rows, cols)
        if not isinstance(a, Affine):
            raise ModelError(f"{self.source}: {self.name}'s partial reader gave no affine form")
        return a

    def _dense_part(self, rows: np.ndarray, cols: tuple[int, int] | None) -> np.ndarray:
        w = self._read_part(rows, cols)
        if isinstance(w, Affine):
            raise ModelError(f"{self.source}: {self.name}'s partial reader gave an affine form")
        return w

    def numpy(self) -> np.ndarray:
        """The tensor as float (float32 unless stored as float16)."""
        w = self._dense() if self._dense is not None else self._stored_affine().dequantize()
        if self._perm is not None:
            w = w[self._perm]
        return np.ascontiguousarray(w)

    def part(self, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> "TensorRef":
        """Rows [a, b) and/or columns [c, d) of this tensor (HF orientation), read lazily and only as
        far as its format allows: what a tensor-parallel rank loads. A quantized tensor stays packed;
        its `affine()` raises ModelError unless the columns fall on its quantization groups."""
        r0, r1 = rows if rows is not None else (0, self.shape[0])
        if not 0 <= r0 < r1 <= self.shape[0]:
            raise ModelError(f"{self.source}: rows [{r0}, {r1}) are outside {self.name} {self.shape}")
        if cols is not None:
            if len(self.shape) != 2 or not 0 <= cols[0] < cols[1] <= self.shape[1]:
                raise ModelError(f"{self.source}: columns [{cols[0]}, {cols[1]}) are outside "
                                 f"{self.name} {self.shape}")
            if cols == (0, self.shape[1]):
                cols = None
        idx = np.arange(r0, r1) if self._perm is None else np.asarray(self._perm[r0:r1])
        shape = (r1 - r0, *((cols[1] - cols[0],) if cols else self.shape[1:]))
        aligned = cols is None or (cols[0] % self.block == 0 and cols[1] % self.block == 0)

        def read_affine() -> Affine:
            if cols is not None and not aligned:
                raise ModelError(f"{self.source}: {self.name} cannot be cut at input columns "
                                 f"{cols[0]}-{cols[1]}: its quantization groups are {self.block} wide")
            if self._part is not None:
                return self._affine_part(idx, cols)
            a = self._stored_affine().rows(idx)
            return a.cols(*cols) if cols else a

        def read_dense() -> np.ndarray:
            if self.quantized:
                if aligned:
                    return read_affine().dequantize()
                a = self._affine_part(idx, None) if self._part is not None else self._stored_affine().rows(idx)
                w = a.dequantize()
            elif self._part is not None:
                return self._dense_part(idx, cols)
            else:
                w = self._stored_dense()[idx]
            return w[:, cols[0]:cols[1]] if cols else w

        return TensorRef(self.name, shape, self.source, read_dense=read_dense,
                         read_affine=read_affine if self.quantized else None, block=self.block)

    def __repr__(self) -> str:
        return f"TensorRef({self.name}, {self.shape}, {'affine' if self.quantized else 'dense'})"


class Checkpoint:
    """A model checkpoint: its config, its tensors by HF name, and where its tokenizer lives."""

    def __init__(self, path: Path, config: ModelConfig, tensors: dict[str, TensorRef], kind: str):
        self.path, self.config, self.tensors, self.kind = path, config, tensors, kind

    def get(self, name: str) -> TensorRef:
        t = self.tensors.get(name)
        if t is None:
            raise ModelError(f"{self.path}: missing tensor {name!r}")
        return t

    def has(self, name: str) -> bool:
        return name in self.tensors

    @property
    def tied_head(self) -> bool:
        """The output projection reuses the token embedding."""
        return self.config.tie_word_embeddings or not self.has("lm_head.weight")

    def slice_names(self, start: int, end: int) -> list[str]:
        """Names of the tensors a slice [start, end) needs."""
        cfg = self.config
        names = [n for n in self.tensors
                 if (m := _LAYER.match(n)) and start <= int(m.group(1)) < end]
        if start == 0:
            names.append("model.embed_tokens.weight")
        if end == cfg.num_hidden_layers:
            names.append("model.norm.weight")
            if self.tied_head:
                names.append("model.embed_tokens.weight")
            else:
                names.append("lm_head.weight")
        return list(dict.fromkeys(names))


_LAYER = re.compile(r"model\.layers\.(\d+)\.")

# ---------------------------------------------------------------- safetensors


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32,
              "I32": np.int32, "I64": np.int64, "U8": np.uint8, "I8": np.int8}


def _bf16_to_f32(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


def _span(rows: np.ndarray | None) -> tuple[slice, np.ndarray | None]:
    """The run of rows to read, and the rows to pick from it where they are not that whole run."""
    if rows is None:
        return slice(None), None
    rows = np.asarray(rows)
    if len(rows) == 0:
        return slice(0, 0), None
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    whole = r1 - r0 == len(rows) and bool(np.all(np.diff(rows) == 1))
    return slice(r0, r1), None if whole else rows - r0


class _SafetensorsFile:
    """One .safetensors file through safetensors' own reader, which checks its header against the
    file (length, JSON, dtypes, offsets within the data): only the tensors, rows and columns asked
    for are read."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            self._f = safe_open(str(path), framework="numpy")
        except (OSError, SafetensorError) as e:
            raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for name in self._f.keys():
            sl = self._f.get_slice(name)
            self.shapes[name], self.dtypes[name] = tuple(sl.get_shape()), sl.get_dtype()
        self._bf16: dict[str, tuple[int, int]] | None = None  # byte ranges of the BF16 tensors
        self._mm: np.memmap | None = None

    def read(self, name: str, rows: np.ndarray | None = None, cols: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor, or its rows (indices) and columns [c0, c1); BF16 comes back as float32."""
        dtype = self.dtypes[name]
        if dtype not in _ST_DTYPES:
            raise ModelError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
        span, pick = _span(rows)
        index = (span,) if cols is None else (span, slice(cols[0], cols[1]))
        if dtype == "BF16":
            arr = self._bf16_view(name)[index]
        elif rows is None and cols is None:
            arr = self._f.get_tensor(name)
        else:
            arr = self._f.get_slice(name)[index]
        if pick is not None:
            arr = arr[pick]
        return _bf16_to_f32(arr) if dtype == "BF16" else np.array(arr)

    def _bf16_view(self, name: str) -> np.ndarray:
        """numpy has no bfloat16, so safetensors' numpy reader refuses these tensors and hands out no
        offsets: view their bytes as uint16 at the offsets of the header, which safe_open checked."""
        if self._bf16 is None:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            self._bf16 = {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
                          for k, v in header.items() if k != "__metadata__" and v["dtype"] == "BF16"}
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        assert self._mm is not None
        a, b = self._bf16[name]
        return self._mm[a:b].view(np.uint16).reshape(self.shapes[name])


def _open_safetensors_dir(path: Path) -> Checkpoint:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ModelError(f"{path}: no config.json (expected an HF or MLX model directory)")
    raw = json.loads(cfg_path.read_text())
    config = ModelConfig.from_dict(raw, str(cfg_path))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no .safetensors files (download the weights, or convert "
                         f".bin checkpoints to safetensors)")
    readers = {f.name: _SafetensorsFile(f) for f in files}
    where: dict[str, _SafetensorsFile] = {}
    for r in readers.values():
        for k in r.shapes:
            where[k] = r
    quant = raw.get("quantization") or raw.get("quantization_config")
    tensors: dict[str, TensorRef] = {}
    for name, r in where.items():
        if name.endswith((".scales", ".biases")) or "rotary_emb" in name:
            continue
        shape = r.shapes[name]
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base and f"{base}.scales" in where and quant:
            q = quant.get(base, quant) if isinstance(quant.get(base), dict) else quant
            bits, gs = int(q.get("bits", 4)), int(q.get("group_size", 64))
            shape = (shape[0], shape[1] * 32 // bits)

            def read_affine(name=name, base=base, r=r, bits=bits, gs=gs) -> Affine:
                biases = where[f"{base}.biases"].read(f"{base}.biases") if f"{base}.biases" in where \
                    else None
                scales = where[f"{base}.scales"].read(f"{base}.scales")
                if biases is None:
                    raise ModelError(f"{r.path}: {base} has scales but no biases "
                                     f"(only affine MLX quantization is supported)")
                return Affine(r.read(name), scales, biases, bits, gs)

            def read_part(rows, cols, name=name, base=base, r=r, bits=bits, gs=gs) -> Affine:
                w = None if cols is None else (cols[0] * bits // 32, cols[1] * bits // 32)
                g = None if cols is None else (cols[0] // gs, cols[1] // gs)
                return Affine(r.read(name, rows, w), where[f"{base}.scales"].read(f"{base}.scales", rows, g),
                              where[f"{base}.biases"].read(f"{base}.biases", rows, g), bits, gs)

            tensors[name] = TensorRef(name, shape, str(r.path), read_affine=read_affine,
                                      read_part=read_part if f"{base}.biases" in where else None, block=gs)
        else:
            tensors[name] = TensorRef(name, shape, str(r.path), read_dense=partial(r.read, name),
                                      read_part=partial(r.read, name))
    kind = "mlx" if quant else "hf"
    return Checkpoint(path, config, tensors, kind)


# ---------------------------------------------------------------- GGUF

_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_hf_name(name: str) -> str | None:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    m = re.match(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)$", name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def _unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's interleaved-RoPE permutation of Q/K (to half-split)."""
    idx = np.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2)
    return idx.swapaxes(1, 2).reshape(-1)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ints (rows, n) into uint32 words, lowest bits first."""
    if bits in (4, 8):  # bytes read as little-endian words: the same layout, without shifting eight lanes
        b = q.astype(np.uint8) if bits == 8 else (q[:, 0::2] & 15 | q[:, 1::2] << 4).astype(np.uint8)
        return np.ascontiguousarray(b).view("<u4").astype(np.uint32, copy=False)
    per = 32 // bits
    q = q.astype(np.uint32).reshape(q.shape[0], -1, per)
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    return np.bitwise_or.reduce(q << shifts, axis=2)


_GGUF_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # bytes per block of 32 weights


def _gguf_affine(kind: str, data: np.ndarray) -> Affine:
    """Re-express GGUF Q4_0/Q4_1/Q8_0 blocks (rows, bytes) exactly as MLX affine groups of 32."""
    rows = data.shape[0]
    if kind == "Q4_1":
        b = data.reshape(rows, -1, 20)
        d = b[:, :, 0:2].copy().view(np.float16)[..., 0]
        m = b[:, :, 2:4].copy().view(np.float16)[..., 0]
        qs = b[:, :, 4:20]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(rows, -1)
        return Affine(_pack(q, 4), d, m, 4, 32)
    if kind == "Q4_0":
        b = data.reshape(rows, -1, 18)
        d = b[:, :, 0:2].copy().view(np.float16)[..., 0]
        qs = b[:, :, 2:18]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(rows, -1)
        return Affine(_pack(q, 4), d, (d * np.float16(-8)), 4, 32)
    if kind == "Q8_0":
        b = data.reshape(rows, -1, 34)
        d = b[:, :, 0:2].copy().view(np.float16)[..., 0]
        q = (b[:, :, 2:34].view(np.int8).astype(np.int16) + 128).reshape(rows, -1)
        return Affine(_pack(q, 8), d, (d * np.float16(-128)), 8, 32)
    raise AssertionError(kind)


def _gguf_config(fields: dict, path: Path) -> dict:
    def get(key, default=None):
        f = fields.get(key)
        if f is None:
            return default
        return f.contents()

    arch = get("general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        raise ModelError(f"{path}: unsupported GGUF architecture {arch!r} (supported: llama, qwen2)")
    p = arch
    heads = int(get(f"{p}.attention.head_count"))
    hidden = int(get(f"{p}.embedding_length"))
    vocab = get(f"{p}.vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in fields:
        vocab = len(fields["tokenizer.ggml.tokens"].data)
    d = {
        "model_type": "mistral" if arch == "mistral" else arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get(f"{p}.feed_forward_length")),
        "num_hidden_layers": int(get(f"{p}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get(f"{p}.attention.head_count_kv", heads)),
        "head_dim": int(get(f"{p}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get(f"{p}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get(f"{p}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get(f"{p}.context_length", 4096)),
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
    }
    scaling = get(f"{p}.rope.scaling.type")
    if scaling == "linear":
        d["rope_scaling"] = {"type": "linear", "factor": float(get(f"{p}.rope.scaling.factor"))}
    return d


def _gguf_index(path: Path) -> dict:
    """Config and tensor layout of a GGUF. The gguf reader parses every field (the whole
    vocabulary) in seconds, so the result is kept in the cache, keyed by the file's identity."""
    import gguf

    from backends.models import cache_dir

    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / "gguf-index" / f"{key}.json"
    try:
        return json.loads(cached.read_text())
    except (OSError, ValueError):
        pass
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the gguf package raises bare ValueErrors/asserts on corrupt files
        raise ModelError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from None
    raw = _gguf_config(reader.fields, path)
    raw["tie_word_embeddings"] = not any(t.name == "output.weight" for t in reader.tensors)
    index = {"config": raw, "tensors": [
        {"name": t.name, "type": t.tensor_type.name, "type_id": int(t.tensor_type),
         "shape": [int(x) for x in reversed(t.shape.tolist())], "offset": int(t.data_offset),
         "data_shape": list(t.data.shape), "data_dtype": t.data.dtype.str} for t in reader.tensors]}
    write_json(cached, index)
    return index


def write_json(path: Path, d: dict) -> None:
    """Write a cache file whole or not at all (readers never see half of one)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(d))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs time


def _open_gguf(path: Path) -> Checkpoint:
    import gguf

    index = _gguf_index(path)
    config = ModelConfig.from_dict(index["config"], str(path))
    permute = config.model_type in ("llama", "mistral")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    tensors: dict[str, TensorRef] = {}
    for t in index["tensors"]:
        hf = _gguf_hf_name(t["name"])
        if hf is None:
            continue  # e.g. rope_freqs: handled through the config
        shape, kind = tuple(t["shape"]), t["type"]
        dt = np.dtype(t["data_dtype"])
        n = int(np.prod(t["data_shape"])) * dt.itemsize

        def data(t=t, dt=dt, n=n) -> np.ndarray:
            if t["offset"] + n > mm.shape[0]:
                raise ModelError(f"{path}: tensor {t['name']} runs past the end of the file (truncated?)")
            return mm[t["offset"]: t["offset"] + n].view(dt).reshape(t["data_shape"])

        perm = None
        if permute and hf.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            heads = config.num_attention_heads if ".q_proj." in hf else config.num_key_value_heads
            perm = _unpermute_rows(shape[0], heads)
        if kind in ("Q4_0", "Q4_1", "Q8_0") and len(shape) == 2:
            def affine_part(rows, cols, d=data, k=kind) -> Affine:
                raw, bb = d(), _GGUF_BLOCK_BYTES[k]  # (rows, blocks of 32 weights)
                if cols is not None:
                    raw = raw[:, cols[0] // 32 * bb: cols[1] // 32 * bb]
                return _gguf_affine(k, raw[rows])

            def affine_all(d: Callable[[], np.ndarray] = data, k: str = kind) -> Affine:
                return _gguf_affine(k, d())

            ref = TensorRef(hf, shape, str(path), read_affine=affine_all, row_perm=perm, read_part=affine_part,
                            block=32)
        elif kind in ("F32", "F16"):
            def dense_part(rows, cols, d=data, s=shape) -> np.ndarray:
                a = d().reshape(s)
                return np.array((a[:, cols[0]:cols[1]] if cols is not None else a)[rows])

            def dense_all(d: Callable[[], np.ndarray] = data, s: tuple[int, ...] = shape) -> np.ndarray:
                return np.array(d()).reshape(s)

            ref = TensorRef(hf, shape, str(path), read_dense=dense_all, row_perm=perm, read_part=dense_part)
        else:
            def deq(d=data, t=t, s=shape):
                try:
                    qt = gguf.GGMLQuantizationType(t["type_id"])
                    return gguf.quants.dequantize(d(), qt).astype(np.float32).reshape(s)
                except NotImplementedError:
                    raise ModelError(f"{path}: tensor {t['name']} uses {t['type']}, "
                                     f"which cannot be dequantized here") from None
            ref = TensorRef(hf, shape, str(path), read_dense=deq, row_perm=perm)
        tensors[hf] = ref
    return Checkpoint(path, config, tensors, "gguf")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a local checkpoint: a .gguf file, or an HF / MLX directory of safetensors."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{path}: a model file must be .gguf (or pass a model directory)")
        return _open_gguf(path)
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").exists() and len(ggufs) == 1:
        return _open_gguf(ggufs[0])
    return _open_safetensors_dir(path)


def validate_slice(ck: Checkpoint, start: int, end: int, expect: dict[str, tuple[int, ...]]) -> None:
    """Check that every expected tensor exists with the expected logical shape."""
    for name, shape in expect.items():
        t = ck.get(name)
        if tuple(t.shape) != tuple(shape):
            raise ModelError(f"{t.source}: tensor {name!r} has shape {t.shape}, expected {tuple(shape)}")


def expected_shapes(cfg: ModelConfig, start: int, end: int, tied_head: bool) -> dict[str, tuple[int, ...]]:
    """Logical shapes of the tensors a slice needs, by HF name."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out: dict[str, tuple[int, ...]] = {}
    for layer in range(start, end):
        p = f"model.layers.{layer}."
        out.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
        if cfg.qkv_bias:
            out.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,)})
        if cfg.o_bias:
            out[p + "self_attn.o_proj.bias"] = (h,)
    if start == 0 or (end == cfg.num_hidden_layers and tied_head):
        out["model.embed_tokens.weight"] = (cfg.vocab_size, h)
    if end == cfg.num_hidden_layers:
        out["model.norm.weight"] = (h,)
        if not tied_head:
            out["lm_head.weight"] = (cfg.vocab_size, h)
    return out
