"""Our own CPU kernels for the torch backend, compiled from C++ on first use into
~/.cache/together/kernels/<hash of source and torch version>, once per machine.

`q4` (q4.cpp) is a group-quantized matmul over 4-bit planes with bfloat16 activations on AVX512-BF16.
When the CPU lacks AVX512-BF16, the compiler or ninja is missing, or the build fails, `q4()` answers None
after one warning line and the torch backend keeps torch's own int4 kernel.
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
# -fopenmp: at::parallel_for splits rows over torch's own threads (torch.get_num_threads(); its libgomp,
# already loaded, serves the module's libgomp.so.1), one thread on a peer run with --threads 1
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp"]
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def cpu_supported() -> bool:
    """AVX512-BF16 (vdpbf16ps) is what the kernel is built on."""
    from backends.shard import cpu_flags

    return {"avx512_bf16", "avx512bw"} <= cpu_flags()


def cache_dir() -> Path:
    import torch

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + torch.__version__.encode())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "together" / "kernels" / key.hexdigest()[:16]


def q4() -> ModuleType | None:
    """The compiled q4 module (built on the first call on this machine), or None where it cannot be."""
    with _lock:
        if "q4" not in _state:
            _state["q4"] = _build() if cpu_supported() else None
        return _state["q4"]


def _import(path: Path) -> ModuleType:
    import importlib.util

    import torch  # noqa: F401  (the module links against torch's libraries)

    spec = importlib.util.spec_from_file_location("together_q4", path)
    if spec is None or spec.loader is None:
        raise ImportError(path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build() -> ModuleType | None:
    try:
        out = cache_dir()
        built = out / "together_q4.so"
        if built.exists():  # built before on this machine: import it without a ninja run
            try:
                return _import(built)
            except ImportError:  # another peer still linking it: build (waits on ninja's lock) below
                pass
        from torch.utils.cpp_extension import load  # only to build: it is slow to import

        out.mkdir(parents=True, exist_ok=True)
        print(f"together: compiling the q4 CPU kernel into {out} (once per machine, ~1 min)",
              file=sys.stderr, flush=True)
        t = time.perf_counter()
        mod = load(name="together_q4", sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], build_directory=str(out),
                   verbose=False)  # ninja, with a lock file: peers starting together build it once
        print(f"together: q4 kernel built in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        return mod
    except Exception as e:  # no compiler, no ninja, a failed build: torch's own kernel then
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        log.warning("q4 CPU kernel unavailable (%s); using torch's int4 kernel", first[:200])
        return None
