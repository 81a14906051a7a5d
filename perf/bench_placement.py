"""Placement by measured speed, in one run: (1) how well a peer's start-up measure predicts its
real decode step, per backend and dtype, and what the measure costs; (2) a two-peer ring split by
the measured numbers (the last stage's head counted) against the even split, aggregate decode
tokens/s at 1 and 8 streams (one compute thread per peer, 127.0.0.1), and the two splits' stage
compute times in one process (the ring runs at its slowest stage; on a host whose cores the peers
share with other work, the ring's own numbers show the total work more than the balance).

(1) times `backends.measure.measure_speed` (one middle layer, freed after) and a whole-model slice's
one-token decode step (median of 24 after a 16-token prompt, same backend, dtype, thread), and
compares the step predicted from the measure (layers x layer_ms + head_ms) with it.

    .venv/bin/python perf/bench_placement.py [--dtypes auto,float32] [--mlx] [--streams 1,8]
                                             [--batches 1,4] [--tokens 48] [--rounds 2] [--no-ring]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.bench_batching import measure as drive  # noqa: E402


def decode_step_ms(backend: str, ck, dtype: str) -> float:
    """Median one-token decode step of the whole model in one slice (what one peer pays per token)."""
    import numpy as np

    from backends.shard import SeqChunk, load_shard

    n = ck.config.num_hidden_layers
    sh = load_shard(backend, ck, 0, n, dtype=dtype, threads=1)
    sh.add_sequence("s")
    sh.forward([SeqChunk("s", 0, 16)], np.arange(100, 116, dtype=np.int32))
    steps, tok = [], 7
    for i in range(26):
        t = time.perf_counter()
        tok = sh.forward([SeqChunk("s", 16 + i, 1)], np.array([tok], np.int32))[0].token
        if i >= 2:
            steps.append(time.perf_counter() - t)
    return statistics.median(steps) * 1000


def predictions(ck, configs: list[tuple[str, str]]) -> list[dict]:
    from backends.measure import measure_speed
    from backends.shard import backend_module

    rows = []
    for backend, dtype in configs:
        t = time.perf_counter()
        if backend == "torch":
            from backends.torch.model import warm
            warm()
        else:
            backend_module(backend, "shard")
        imports = time.perf_counter() - t
        sp = measure_speed(backend, ck, dtype, threads=1)
        actual = decode_step_ms(backend, ck, dtype)
        n = ck.config.num_hidden_layers
        rows.append({"config": f"{backend} {sp.dtype} {sp.weight_format}", "imports_s": imports, "measure_s": sp.seconds,
                     "layer_ms": sp.layer_ms, "head_ms": sp.head_ms, "predicted_ms": n * sp.layer_ms + sp.head_ms,
                     "actual_ms": actual, "speed": sp})
    return rows


def stage_times(ck, dtype: str, cuts: list[int], batches: list[int], steps: int = 12) -> dict:
    """Per decode step of `b` sequences, the compute time of each stage [0, cut) and [cut, N) for
    every cut, timed interleaved in one process (median): a ring runs at its slowest stage."""
    import numpy as np

    from backends.shard import SeqChunk, load_shard
    from backends.wire import Hidden

    n, hidden = ck.config.num_hidden_layers, ck.config.hidden_size
    rng = np.random.default_rng(0)
    ranges = [r for c in cuts for r in ((0, c), (c, n))]
    shards = {r: load_shard("torch", ck, *r, dtype=dtype, threads=1) for r in ranges}

    def x(sh, t: int):
        if sh.is_first:
            return (np.arange(t, dtype=np.int32) * 7 + 100) % 1000
        h = rng.standard_normal((t, hidden), dtype=np.float32)
        return Hidden(memoryview(h.tobytes()), "float32", (t, hidden))

    out = {}
    for b in batches:
        times: dict[tuple[int, int], list[float]] = {r: [] for r in ranges}
        for r, sh in shards.items():
            for i in range(b):
                sh.add_sequence(f"{b}.{i}")
                sh.forward([SeqChunk(f"{b}.{i}", 0, 16)], x(sh, 16))
        for step in range(steps + 2):
            for r, sh in shards.items():
                inp = x(sh, b)
                t = time.perf_counter()
                sh.forward([SeqChunk(f"{b}.{i}", 16 + step, 1) for i in range(b)], inp)
                if step >= 2:
                    times[r].append(time.perf_counter() - t)
        for r in ranges:
            out[(b, r)] = statistics.median(times[r]) * 1000
    return out


def ring(model: str, cut: int, streams: list[int], tokens: int) -> list[dict]:
    from mesh.local import LocalMesh

    mesh = LocalMesh(model)
    try:
        a = mesh.add("s0", "--backend", "torch", "--no-mdns", "--settle", "0.5", "--layers", f"0-{cut}", api=True)
        mesh.add("s1", "--backend", "torch", "--no-mdns", "--settle", "0.5", "--layers", f"{cut}-30",
                 "--peer", a.address)
        mesh.wait_ready(a, stages=2)
        drive(a.api, 2, 8)  # warm-up
        return [drive(a.api, k, tokens) for k in streams]
    finally:
        mesh.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="auto,float32", help="torch dtypes to measure")
    ap.add_argument("--mlx", action="store_true", help="also measure MLX (float32 on a CPU)")
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2, help="ring runs per split, alternating")
    ap.add_argument("--batches", default="1,4", help="sequences per decode step for the stage times")
    ap.add_argument("--no-ring", action="store_true")
    a = ap.parse_args()
    from backends.models import resolve_model
    from backends.weights import open_checkpoint
    from mesh.placement import split_proportional

    model = str(resolve_model("smollm2-135m"))
    ck = open_checkpoint(model)
    load0 = os.getloadavg()[0]
    configs = [("torch", d) for d in a.dtypes.split(",")] + ([("mlx", "float32")] if a.mlx else [])
    rows = predictions(ck, configs)
    print(f"\nthe start-up measure against the real decode step: smollm2-135m, 1 thread, {os.cpu_count()} cores, "
          f"load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'peer runs':<32}{'imports s':>10}{'measure s':>10}{'ms/layer':>10}{'head ms':>9}"
          f"{'predicted ms':>13}{'actual ms':>10}{'pred/actual':>12}")
    for r in rows:
        print(f"{r['config']:<32}{r['imports_s']:>10.2f}{r['measure_s']:>10.2f}{r['layer_ms']:>10.3f}{r['head_ms']:>9.2f}"
              f"{r['predicted_ms']:>13.1f}{r['actual_ms']:>10.1f}{r['predicted_ms'] / r['actual_ms']:>11.2f}x")
    sp = rows[0]["speed"]  # both peers run the default torch settings on this one host
    layer_bytes = 1  # memory does not bind here: the split is by speed alone
    placed = split_proportional(30, layer_bytes, 0, [("s0", 1 << 40, sp.layer_ms, sp.head_ms),
                                                     ("s1", 1 << 40, sp.layer_ms, sp.head_ms)])
    cut = placed[0][2]
    batches = [int(x) for x in a.batches.split(",")]
    st = stage_times(ck, sp.dtype, [15, cut], batches)
    print(f"\nstage compute per decode step, two stages (torch {sp.dtype} {sp.weight_format}, 1 thread, one process, "
          f"interleaved medians): the ring runs at its slowest stage")
    print(f"{'split':<24}{'batch':>6}{'first ms':>10}{'last ms':>9}{'slowest':>9}{'vs even':>9}")
    for b in batches:
        even = max(st[(b, (0, 15))], st[(b, (15, 30))])
        for c in (15, cut):
            first, last = st[(b, (0, c))], st[(b, (c, 30))]
            name = "even [0,15) [15,30)" if c == 15 else f"measured [0,{c}) [{c},30)"
            print(f"{name:<24}{b:>6}{first:>10.1f}{last:>9.1f}{max(first, last):>9.1f}{even / max(first, last):>8.2f}x")
    if a.no_ring:
        return 0
    streams = [int(x) for x in a.streams.split(",")]
    runs: dict[int, list[list[dict]]] = {15: [], cut: []}
    for _ in range(a.rounds):
        for c in runs:
            runs[c].append(ring(model, c, streams, a.tokens))
    print(f"\ntwo-peer ring (torch {sp.dtype} {sp.weight_format}, 1 thread per peer), even split vs split by the measure "
          f"({sp.layer_ms:.2f} ms/layer, head {sp.head_ms:.1f} ms), {a.tokens} tokens per stream, best of {a.rounds}, "
          f"load avg now {os.getloadavg()[0]:.1f}")
    print(f"{'split':<22}{'streams':>8}{'agg tok/s':>11}{'vs even':>9}")
    best = {c: [max(r[i]["agg_tps"] for r in runs[c]) for i in range(len(streams))] for c in runs}
    for c in runs:
        name = "even [0,15) [15,30)" if c == 15 else f"measured [0,{c}) [{c},30)"
        for i, k in enumerate(streams):
            print(f"{name:<22}{k:>8}{best[c][i]:>11.1f}{best[c][i] / best[15][i]:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
