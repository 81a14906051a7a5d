"""Weights from a peer vs from this peer's own disk: the embedded GGUF (or --model) served by a
WeightServer in another process on 127.0.0.1 and fetched into an empty cache (plaintext and with a
mesh key), beside copying the file on the local disk; the whole model and a third of its layers.
Round-robin, medians of --rounds; prints MB/s and each against the local copy.

Run: .venv/bin/python perf/bench_weights.py [--rounds 3] [--model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KEY = "bench-weights-key"


async def serve(path: str, key: str | None, port_file: str) -> None:
    from mesh.auth import add_port, make_server
    from mesh.weights import WeightServer
    from protos import together_pb2_grpc as pbg

    ws = WeightServer({"m": Path(path)})

    class WeightsOnly(pbg.TogetherServicer):  # a peer's two weight entry points, as mesh/servicer.py's
        async def Manifest(self, request, context):  # type: ignore[no-untyped-def]
            return await ws.Manifest(request, context)

        async def FetchWeights(self, request, context):  # type: ignore[no-untyped-def]
            async for c in ws.FetchWeights(request, context):
                yield c

    srv = make_server(key)
    pbg.add_TogetherServicer_to_server(WeightsOnly(), srv)
    port = add_port(srv, "127.0.0.1:0", key)
    await srv.start()
    Path(port_file).write_text(str(port))
    await srv.wait_for_termination()


def start_server(path: Path, key: str | None, tmp: Path) -> tuple[subprocess.Popen, str]:
    pf = tmp / f"port-{bool(key)}"
    env = dict(os.environ, TOGETHER_CACHE=str(tmp / "owner-cache"), PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, __file__, "--serve", str(path), "--key", key or "", "--port-file", str(pf)],
                         env=env)
    for _ in range(600):
        if pf.exists() and pf.read_text():
            return p, f"127.0.0.1:{pf.read_text()}"
        time.sleep(0.05)
    p.kill()
    raise SystemExit("the weight server did not start")


def fetch(addr: str, key: str | None, cache: Path, layers: tuple[int, int] | None) -> tuple[float, int]:
    from backends.manifest import LocalCopy, tensor_names
    from mesh.weights import fetch_manifest, fetch_tensors

    os.environ["TOGETHER_CACHE"] = str(cache)
    shutil.rmtree(cache, ignore_errors=True)

    async def go() -> int:
        copy = LocalCopy.of("m")
        copy.begin(await fetch_manifest([addr], key, "bench", "m"))
        assert copy.manifest is not None
        n = copy.manifest.num_layers
        lo, hi = layers or (0, n)
        return await fetch_tensors([addr], key, "bench", "m", tensor_names(copy.manifest, lo, hi, n), copy)

    t0 = time.perf_counter()
    got = asyncio.run(go())
    return time.perf_counter() - t0, got


def disk_copy(path: Path, dest: Path) -> tuple[float, int]:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    t0 = time.perf_counter()
    shutil.copyfile(path, dest / path.name)  # into the page cache, as the fetched copy is (no fsync)
    return time.perf_counter() - t0, path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="")
    ap.add_argument("--serve", default="")
    ap.add_argument("--key", default="")
    ap.add_argument("--port-file", default="")
    a = ap.parse_args()
    if a.serve:
        asyncio.run(serve(a.serve, a.key or None, a.port_file))
        return
    from backends.models import resolve_model

    path = Path(a.model) if a.model else resolve_model("smollm2-135m", quiet=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-weights-"))
    servers = {k: start_server(path, k, tmp) for k in (None, KEY)}
    try:
        from backends.manifest import build_manifest

        n = build_manifest(path, "m").num_layers
        third = (n // 3, 2 * n // 3)
        rows = {
            "local disk copy (whole file)": lambda: disk_copy(path, tmp / "disk"),
            "peer, plaintext (whole model)": lambda: fetch(servers[None][1], None, tmp / "c1", None),
            "peer, mesh key (whole model)": lambda: fetch(servers[KEY][1], KEY, tmp / "c2", None),
            f"peer, mesh key (layers {third[0]}-{third[1]})": lambda: fetch(servers[KEY][1], KEY, tmp / "c3", third),
        }
        for f in rows.values():  # warm-up: the owners hash their tensors once (cached after)
            f()
        times: dict[str, list[float]] = {k: [] for k in rows}
        sizes: dict[str, int] = {}
        for _ in range(a.rounds):
            for k, f in rows.items():
                dt, nbytes = f()
                times[k].append(dt)
                sizes[k] = nbytes
        base = statistics.median(times["local disk copy (whole file)"])
        print(f"\nmodel {path.name} ({path.stat().st_size / 1e6:.1f} MB), {a.rounds} rounds, medians; "
              f"load {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
        print(f"| {'how':<36} | {'MB':>7} | {'seconds':>8} | {'MB/s':>7} | {'time / local copy':>17} |")
        print(f"|{'-' * 38}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 19}|")
        for k in rows:
            t = statistics.median(times[k])
            print(f"| {k:<36} | {sizes[k] / 1e6:>7.1f} | {t:>8.3f} | {sizes[k] / 1e6 / t:>7.0f} | {t / base:>16.2f}x |")
    finally:
        for p, _ in servers.values():
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
