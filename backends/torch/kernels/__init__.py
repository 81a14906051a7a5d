"""Our own CPU kernels for the torch backend, compiled from C++ on first use into
~/.cache/together/kernels/<hash of source, flags and torch version>, once per machine.

`q4` (q4.cpp) is a group-quantized matmul over 4-bit planes with bfloat16 activations on AVX512-BF16.
When the CPU lacks AVX512-BF16, the compiler or ninja is missing, or the build fails, `q4()` answers None
after one warning line and the torch backend keeps torch's own int4 kernel.

`layer` (layer.cpp) is a decoder layer's non-matmul work (RMSNorm with the residual add, RoPE with the KV
append and decode attention) in a few calls, float32 or bfloat16, any CPU; where it cannot build `layer()` answers
None after one warning line and the model runs those steps as torch ops (backends/torch/model.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("q4.cpp")
LAYER_SOURCE = Path(__file__).with_name("layer.cpp")
# -fopenmp: at::parallel_for splits rows over torch's own threads (torch.get_num_threads(); its libgomp,
# already loaded, serves the module's libgomp.so.1), one thread on a peer run with --threads 1
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp"]
# -ffp-contract=off: RoPE's products and sums round one by one, as torch's ops do (no fused multiply-add)
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def cpu_supported() -> bool:
    """AVX512-BF16 (vdpbf16ps) is what the kernel is built on."""
    from backends.shard import cpu_flags

    return {"avx512_bf16", "avx512bw"} <= cpu_flags()


def layer_flags() -> list[str]:
    """layer.cpp's flags: its loops vectorize for the widest vectors this CPU has (part of the cache key)."""
    from backends.shard import cpu_flags

    flags = cpu_flags()
    isa = ["-mavx512f"] if "avx512f" in flags else ["-mavx2"] if "avx2" in flags else []
    return ["-O3", "-fopenmp", "-ffp-contract=off", *isa]


def cache_dir(source: Path = SOURCE, flags: list[str] | None = None) -> Path:
    import torch

    flags = FLAGS if flags is None else flags
    key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + torch.__version__.encode())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "together" / "kernels" / key.hexdigest()[:16]


def q4() -> ModuleType | None:
    """The compiled q4 module (built on the first call on this machine), or None where it cannot be."""
    with _lock:
        if "q4" not in _state:
            _state["q4"] = _build("q4", SOURCE, FLAGS, "using torch's int4 kernel") if cpu_supported() else None
        return _state["q4"]


def layer() -> ModuleType | None:
    """The compiled layer module (built on the first call on this machine), or None where it cannot be."""
    with _lock:
        if "layer" not in _state:
            _state["layer"] = _build("layer", LAYER_SOURCE, layer_flags(), "the layers run as torch ops")
        return _state["layer"]


def _import(name: str, path: Path) -> ModuleType:
    import importlib.util

    import torch  # noqa: F401  (the module links against torch's libraries)

    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build(name: str, source: Path, flags: list[str], instead: str) -> ModuleType | None:
    module = f"together_{name}"
    try:
        out = cache_dir(source, flags)
        built = out / f"{module}.so"
        if built.exists():  # built before on this machine: import it without a ninja run
            try:
                return _import(module, built)
            except ImportError:  # another peer still linking it: build (waits on ninja's lock) below
                pass
        from torch.utils.cpp_extension import load  # only to build: it is slow to import

        out.mkdir(parents=True, exist_ok=True)
        print(f"together: compiling the {name} CPU kernel into {out} (once per machine, ~1 min)",
              file=sys.stderr, flush=True)
        t = time.perf_counter()
        mod = load(name=module, sources=[str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                   build_directory=str(out), verbose=False)  # ninja, with a lock file: peers starting together build it once
        print(f"together: {name} kernel built in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        return mod
    except Exception as e:  # no compiler, no ninja, a failed build: torch's own ops then
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        log.warning("%s CPU kernel unavailable (%s); %s", name, first[:200], instead)
        return None
