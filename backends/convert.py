"""Convert a GGUF checkpoint into an mlx-community-style MLX directory.

Q4_0/Q4_1/Q8_0 tensors are re-expressed exactly as MLX affine groups of 32 (no requantization),
so the directory loads with `mlx_lm.load` and with `backends.weights.open_checkpoint`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from backends.errors import ModelError
from backends.shard import missing_backend
from backends.weights import open_checkpoint

_DENSE = {"float16": np.float16, "float32": np.float32}


def gguf_to_mlx(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float16",
                tokenizer: bool = True) -> Path:
    """Write config.json, model.safetensors and the tokenizer of `gguf_path` into `out_dir`."""
    try:
        import mlx.core as mx
    except ImportError as e:
        raise missing_backend("mlx", e) from None

    gguf_path = Path(gguf_path).expanduser()
    ck = open_checkpoint(gguf_path)
    if ck.kind != "gguf":
        raise ModelError(f"{gguf_path}: not a GGUF file")
    if dtype not in _DENSE:
        raise ModelError(f"dense dtype must be float16 or float32, got {dtype!r}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)

    arrays: dict[str, mx.array] = {}
    qmods: dict[str, dict] = {}
    for name, ref in ck.tensors.items():
        a = ref.affine()
        if a is not None:
            base = name[: -len(".weight")]
            qmods[base] = {"group_size": a.group_size, "bits": a.bits}
            arrays[name] = mx.array(a.packed)
            arrays[base + ".scales"] = mx.array(a.scales.astype(_DENSE[dtype]))
            arrays[base + ".biases"] = mx.array(a.biases.astype(_DENSE[dtype]))
        else:
            arrays[name] = mx.array(ref.numpy().astype(_DENSE[dtype]))
    mx.save_safetensors(str(out / "model.safetensors"), arrays, metadata={"format": "mlx"})

    config = ck.config.to_hf_dict()
    config["torch_dtype"] = dtype
    if qmods:
        # the most common setting is the default; the others are per-module overrides
        common = Counter((q["group_size"], q["bits"]) for q in qmods.values()).most_common(1)[0][0]
        quant: dict = {"group_size": common[0], "bits": common[1]}
        for base, q in sorted(qmods.items()):
            if (q["group_size"], q["bits"]) != common:
                quant[base] = dict(q)
        config["quantization"] = quant
        config["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tok.save_pretrained(str(out))
    return out
