"""Time to seed a three-peer ring from one copy vs each peer loading from its own disk, in one run.

Three real `together join` processes (torch, float32, one compute thread each, 127.0.0.1, --peer),
each with its own TOGETHER_CACHE, sized by --max-memory so that all three hold layers: "own disk"
gives every cache a link to the embedded GGUF; "one copy" gives it to the first peer only, so the
other two fetch their headers, the layer they time and their slices from it. Timed from the first
process's start to a complete, ready ring (its /health), best and median of --rounds, alternating;
tensor bytes received by the two newcomers from their /metrics (the headers they fetch before
joining, ~1.8 MB each, are not counted there).

    .venv/bin/python perf/bench_seed.py [--rounds 3] [--max-memory 400MB]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh.local import LocalMesh  # noqa: E402

MODEL = "smollm2-135m"


def received(api: str) -> int:
    text = urllib.request.urlopen(f"{api}/metrics", timeout=5).read().decode()
    m = re.search(r"^together_weight_bytes_received_total (\S+)$", text, re.M)
    return int(float(m.group(1))) if m else 0


def one_ring(gguf: Path, seeded: str, max_memory: str) -> tuple[float, int]:
    """Seconds to a complete ready ring, and bytes the peers received from each other."""
    root = Path(tempfile.mkdtemp(prefix="bench-seed-"))
    envs = {}
    for n in "abc":
        d = root / n
        d.mkdir()
        if n in seeded:
            (d / "models").mkdir()
            (d / "models" / gguf.name).symlink_to(gguf)
        envs[n] = {"TOGETHER_CACHE": str(d)}
    mesh = LocalMesh(MODEL)
    args = ("--backend", "torch", "--dtype", "float32", "--no-mdns", "--max-memory", max_memory)
    t0 = time.perf_counter()
    try:
        a = mesh.add("a", *args, api=True, env=envs["a"])
        for n in "bc":
            mesh.add(n, *args, "--peer", a.address, api=True, env=envs[n])
        body = mesh.wait_complete(a, timeout=300)
        if len(body["ring"]) != 3:
            raise RuntimeError(f"expected three stages, got {body['ring']}")
        dt = time.perf_counter() - t0
        return dt, sum(received(p.api) for p in mesh.peers.values())
    finally:
        mesh.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-memory", default="400MB", help="each peer's offer: small enough that all three hold layers")
    a = ap.parse_args()
    from backends.models import resolve_model

    gguf = resolve_model(MODEL, quiet=True)
    modes = {"own disk (each peer has the file)": "abc", "one copy (a seeds b and c)": "a"}
    times: dict[str, list[float]] = {m: [] for m in modes}
    got: dict[str, int] = {}
    for r in range(a.rounds):
        for mode, seeded in (modes.items() if r % 2 == 0 else reversed(list(modes.items()))):
            dt, n = one_ring(gguf, seeded, a.max_memory)
            times[mode].append(dt)
            got[mode] = n
            print(f"  round {r + 1} {mode}: {dt:.2f} s, {n / 1e6:.1f} MB received", file=sys.stderr, flush=True)
    own = times[next(iter(modes))]
    print(f"\nseeding a three-peer ring of {MODEL} ({gguf.stat().st_size / 1e6:.1f} MB GGUF), torch float32, "
          f"127.0.0.1, {a.rounds} rounds")
    # the host is shared: a round's two rings ran back to back, so their ratio is the fair comparison
    print(f"{'mode':<36} {'best s':>8} {'median s':>9} {'tensor MB received':>19} {'vs own disk (paired)':>21}")
    for mode in modes:
        ratio = statistics.median(t / o for t, o in zip(times[mode], own))
        print(f"{mode:<36} {min(times[mode]):>8.2f} {statistics.median(times[mode]):>9.2f} "
              f"{got[mode] / 1e6:>19.1f} {ratio:>20.2f}x")


if __name__ == "__main__":
    main()
