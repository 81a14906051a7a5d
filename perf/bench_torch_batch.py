"""Batched decode on one torch shard, in process, one compute thread: B streams' aggregate decode tok/s
against one stream's, and (with --profile) where a batched step's time goes.

Every round decodes each batch size once (B sequences, prompts of different lengths prefilled one by
one, then `--steps` decode steps of all B together through `TorchShard.forward`, as a peer's decode
step runs them); medians over the rounds. No HTTP, no ring: the model's own cost of a batched step,
timed by this thread's CPU time (the machines we measure on are shared: other processes' load
would swamp wall time; `--wall` for wall time).

    .venv/bin/python perf/bench_torch_batch.py [--batches 1,4,8,16] [--steps 32] [--prompt 64]
        [--rounds 3] [--dtype auto] [--profile 8] [--kernels torch,q4] [--fused 1,0]

`--kernels` compares the packed-weight kernels (torch's int4 kernel, our kernels/q4.cpp) in one run:
one shard each, rounds interleaved; `--fused 1,0` likewise the layers' fused path (kernels/layer.cpp)
against torch ops (TOGETHER_FUSED=0), and `--fused 1,ops` a decode step as one call of its Blocks against the
same fused ops called one by one from Python (TOGETHER_FUSED=ops).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backends.models import EMBEDDED, cache_dir  # noqa: E402
from backends.shard import SeqChunk, default_dtype  # noqa: E402
from backends.torch.shard import TorchShard  # noqa: E402
from backends.weights import open_checkpoint  # noqa: E402


def decode(shard: TorchShard, b: int, steps: int, prompt: int, prof: object = None,
           clock: Callable[[], float] = time.thread_time) -> float:
    """Aggregate decode tok/s of `b` sequences decoded together for `steps` steps, by `clock`
    (under the profiler `prof`, if given: the decode steps only)."""
    rng = np.random.default_rng(b)
    ids = [f"s{i}" for i in range(b)]
    last = {}
    for i, s in enumerate(ids):  # prompts of different lengths: the batch's caches are ragged
        p = rng.integers(100, 40000, prompt + 3 * i).astype(np.int32)
        shard.add_sequence(s, prompt=list(p))
        last[s] = shard.forward([SeqChunk(s, 0, len(p))], p)[0].token
    if prof is not None:
        prof.start()  # type: ignore[attr-defined]
    t0 = clock()
    for _ in range(steps):
        chunks = [SeqChunk(s, shard.seqs[s].length, 1) for s in ids]
        out = shard.forward(chunks, np.array([last[s] for s in ids], np.int32))
        last = {o.seq_id: o.token for o in out}
    dt = clock() - t0
    if prof is not None:
        prof.stop()  # type: ignore[attr-defined]
    for s in ids:
        shard.free_sequence(s)
    return b * steps / dt


def profile(shard: TorchShard, b: int, steps: int, prompt: int) -> None:
    from torch.profiler import ProfilerActivity, profile as prof

    decode(shard, b, 2, prompt)
    p = prof(activities=[ProfilerActivity.CPU])
    rate = decode(shard, b, steps, prompt, p)
    print(f"{b} streams: {rate:.1f} tok/s under the profiler; the decode steps' ops:")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def python_bursts(share: float, stop: threading.Event, burst_s: float = 200e-6) -> None:
    """Run Python (holding the GIL) `share` of the time in bursts of `burst_s`, sleeping between them."""
    while not stop.is_set():
        t = time.perf_counter()
        while time.perf_counter() - t < burst_s:
            pass
        time.sleep(burst_s * (1 - share) / share)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens of the first stream (others +3 each)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--profile", type=int, default=0, help="profile a batch of this size instead")
    ap.add_argument("--wall", action="store_true", help="time by the wall clock, not this thread's CPU time")
    ap.add_argument("--beside-python", type=float, default=0.0, metavar="SHARE",
                    help="run the steps beside a thread that runs Python this share of the time (200 us "
                         "bursts, as a peer's event loop does; implies --wall): what the GIL costs a step")
    ap.add_argument("--kernels", default="", help="packed-weight kernels to compare, e.g. torch,q4 (default: "
                    "the process default, TOGETHER_KERNEL)")
    ap.add_argument("--fused", default="", help="the layers' fused path (kernels/layer.cpp) on and off to "
                    "compare, e.g. 1,0 (default: the process default, TOGETHER_FUSED)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ck = open_checkpoint(cache_dir() / "models" / EMBEDDED["smollm2-135m"]["file"])
    dtype = default_dtype("torch", ck, "cpu") if args.dtype == "auto" else args.dtype
    kernels = [k for k in args.kernels.split(",") if k] or [os.environ.get("TOGETHER_KERNEL", "")]
    fused = [f for f in args.fused.split(",") if f] or [os.environ.get("TOGETHER_FUSED", "")]
    shards: dict[str, TorchShard] = {}
    for k in kernels:
        for f in fused:
            if k:
                os.environ["TOGETHER_KERNEL"] = k  # read when the packed projections are built
            if f:
                os.environ["TOGETHER_FUSED"] = f  # read when the slice is loaded
            shards[(k or "default") + {"0": " unfused", "ops": " fused ops one by one"}.get(f, "")] = TorchShard(
                ck, 0, ck.config.num_hidden_layers, dtype)
    if args.profile:
        for k, shard in shards.items():
            print(f"kernel {k}:")
            profile(shard, args.profile, args.steps, args.prompt)
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    for shard in shards.values():
        decode(shard, max(batches), 2, args.prompt)  # warm up
    clock = time.perf_counter if args.wall or args.beside_python else time.thread_time
    stop = threading.Event()
    if args.beside_python:
        threading.Thread(target=python_bursts, args=(args.beside_python, stop), daemon=True).start()
    runs: dict[tuple[str, int], list[float]] = {(k, b): [] for k in shards for b in batches}
    for _ in range(args.rounds):
        for b in batches:
            for k, shard in shards.items():
                runs[k, b].append(decode(shard, b, args.steps, args.prompt, clock=clock))
    stop.set()
    med = {kb: statistics.median(r) for kb, r in runs.items()}
    first = next(iter(shards.values()))
    print(f"torch shard, {dtype} ({first.weight_format}), 1 thread, prompt {args.prompt}+, "
          f"{args.steps} decode steps, median of {args.rounds}, "
          f"{'wall' if args.wall or args.beside_python else 'CPU'} time, "
          f"{f'beside a thread running Python {args.beside_python:.0%} of the time, ' if args.beside_python else ''}"
          f"load avg {os.getloadavg()[0]:.1f}")
    print("| kernel | streams | aggregate decode tok/s | per stream tok/s | vs 1 stream |")
    print("|---|---|---|---|---|")
    for k in shards:
        base = med.get((k, 1))
        for b in batches:
            ratio = f"{med[k, b] / base:.2f}x" if base else "-"
            print(f"| {k} | {b} | {med[k, b]:.1f} | {med[k, b] / b:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
