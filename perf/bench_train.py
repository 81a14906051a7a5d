"""LoRA training across a ring (`together lora --mesh`): a two-peer ring beside one process.

One run, the same data, seed and settings throughout: a ring of one peer holding every layer (one
process: the same code and backend as the stages, 1 compute thread), then a two-peer ring on this host
(1 compute thread per peer, the layers split in half) driven with `--micro-batches 1` (no pipelining:
the stages take turns) and with 2 and 4 micro-batches per batch (pipelined: both stages busy at once);
with `--single`, `together lora` itself (MLX, one process) too. Tokens/s per step come from the
driver's lines (the first step dropped), the peak memory of each peer process (RSS: its served shard
and libraries too) from the stages' reports. Prints one table of tokens/s, the ratio to the one-peer
ring, and peak memory per process. Runs alternate over `--rounds`, the best of each kept.
Run: `.venv/bin/python perf/bench_train.py [--model smollm2-135m] [--backend torch] [--iters 6] [--rounds 2]
[--single]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = "the quick brown fox jumps over a lazy dog while seven clever owls watch from an old oak".split()


def make_data(d: Path, n: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        words = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(12 + i % 9))
        recs.append(json.dumps({"prompt": f"Q{i}: say something", "completion": " " + words}))
    (d / "train.jsonl").write_text("\n".join(recs) + "\n")
    return d


def rates(log: str) -> list[float]:
    return [float(v.replace(",", "")) for v in re.findall(r"train loss [\d.]+\s+val loss \S+\s+([\d,.]+) tok/s", log)]


def run(args: list[str]) -> str:
    e = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-m", "apps.cli", "lora", *args], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"together lora failed:\n{p.stderr[-3000:]}")
    return p.stderr


def start_ring(model: Path, backend: str, split: list[tuple[int, int]]):
    """A LocalMesh of len(split) peers (1 compute thread each) holding `split`; (mesh, first peer)."""
    from mesh.local import LocalMesh

    m = LocalMesh(str(model))
    names = [f"s{i}" for i in range(len(split))]
    first = m.add(names[0], "--backend", backend, "--dtype", "float32", "--no-mdns", "--layers",
                  f"{split[0][0]}-{split[0][1]}", api=True)
    for name, (lo, hi) in zip(names[1:], split[1:]):
        m.add(name, "--backend", backend, "--dtype", "float32", "--no-mdns", "--layers", f"{lo}-{hi}",
              "--peer", first.address)
    m.wait_ready(first, stages=len(split))
    return m, first


def train(args: list[str], peer: str | None, micro: int) -> tuple[float, str]:
    """One training run: the median tokens/s of its steps (the first dropped) and its stages' peaks."""
    log = run([*args, "--peer", peer, "--micro-batches", str(micro)] if peer else args)
    peaks = re.findall(r"tok/s\s+peak memory (s0 [^\n]*)", log)
    if peer is None:  # the largest child process waited for so far (the peers still run): KiB -> GB
        peaks = [f"<= {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6:.2f} GB"]
    return statistics.median(rates(log)[1:] or rates(log)), peaks[-1] if peaks else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--backend", default="torch", choices=["mlx", "torch"], help="the ring's peers")
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="each run this many times, alternating; the best kept")
    ap.add_argument("--single", action="store_true",
                    help="also time `together lora` (MLX; QLoRA on a CPU is slow: on a Mac the natural baseline)")
    a = ap.parse_args()

    from backends.models import resolve_model
    from backends.weights import open_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = make_data(tmp / "data", 4 * a.batch_size)
    common = ["--model", a.model, "--data", str(data), "--iters", str(a.iters), "--batch-size", str(a.batch_size),
              "--layers", str(a.layers), "--learning-rate", "1e-4", "--report-every", "1", "--save-every",
              str(a.iters), "--max-seq-length", "128", "--mask-prompt", "--adapter-path", str(tmp / "out")]
    path = resolve_model(a.model, quiet=True)
    n = open_checkpoint(path).config.num_hidden_layers
    one, one_peer = start_ring(path, a.backend, [(0, n)])
    two, two_peer = start_ring(path, a.backend, [(0, n // 2), (n // 2, n)])
    runs = [("ring of one peer (all layers)", one_peer.address, 1),
            ("ring of 2 peers, no pipelining", two_peer.address, 1),
            ("ring of 2 peers, 2 micro-batches", two_peer.address, 2),
            ("ring of 2 peers, 4 micro-batches", two_peer.address, 4)]
    if a.single:
        runs.append(("one process: together lora (MLX)", None, 0))
    best: dict[str, tuple[float, str]] = {}
    try:  # rounds alternate the runs, so that a busy moment of a shared host does not favour one
        for _ in range(a.rounds):
            for label, peer, micro in runs:
                r, mem = train(common, peer, micro)
                if r > best.get(label, (0.0, ""))[0]:
                    best[label] = (r, mem)
    finally:
        one.stop()
        two.stop()
    rows = [(label, *best[label]) for label, _, _ in runs]
    base = rows[0][1]
    print(f"\nLoRA training tokens/s: {a.model}, {a.backend} peers, float32, batch {a.batch_size}, LoRA on the "
          f"last {a.layers} of {n} layers, {a.iters} steps (first dropped), {platform.machine()}, "
          f"{os.cpu_count()} cores")
    print(f"{'run':<40} {'tokens/s':>9} {'vs one':>7}  peak memory per process (RSS)")
    for label, r, mem in rows:
        print(f"{label:<40} {r:>9.1f} {r / base:>6.2f}x  {mem}")


if __name__ == "__main__":
    main()
