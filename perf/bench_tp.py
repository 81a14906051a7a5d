"""Tensor parallelism inside one stage: the embedded model (layers 0-30) at TP=1 (one process) and
TP=2 (rank 0 plus a spawned worker on 127.0.0.1), torch and MLX, float32, one compute thread per
rank, in one run. Each configuration runs in a fresh child process (MLX forms one ring per
process) after a warm-up: prefill tokens/s of a 64-token prompt, greedy decode tokens/s, and the
all-reduce itself timed on rank 0 (two per layer, hidden-size vectors while decoding; time from
the partial output being ready to the sum being ready, so it includes waiting for the other rank).

    .venv/bin/python perf/bench_tp.py [--backends torch,mlx] [--tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle. " * 4


class Timer:
    """Accumulates the wall time of the collectives while `on`."""

    def __init__(self):
        self.on, self.total, self.n = False, 0.0, 0

    def add(self, dt: float) -> None:
        if self.on:
            self.total += dt
            self.n += 1


def time_collectives(shard, backend: str, timer: Timer) -> None:
    if backend == "torch":
        import torch

        def timed(t: torch.Tensor, reduce=shard.comm.all_sum) -> torch.Tensor:
            t0 = time.perf_counter()
            out = reduce(t)
            timer.add(time.perf_counter() - t0)
            return out

        for blk in shard.model.layers:
            blk.attention.reduce = blk.feed_forward.reduce = timed
    else:
        import mlx.core as mx

        orig = mx.distributed.all_sum

        def all_sum(x, *args, **kw):
            mx.eval(x)  # the partial product first: time the sum alone
            t0 = time.perf_counter()
            y = orig(x, *args, **kw)
            mx.eval(y)
            timer.add(time.perf_counter() - t0)
            return y

        mx.distributed.all_sum = all_sum


def child(backend: str, tp: int, tokens: int, rounds: int) -> dict:
    import numpy as np

    from backends.models import resolve_model
    from backends.shard import SeqChunk, load_shard
    from backends.tokenizer import Tokenizer
    from backends.weights import open_checkpoint

    if backend == "torch":
        import torch

        torch.set_num_threads(1)
    ck = open_checkpoint(resolve_model("smollm2-135m", quiet=True))
    ids = Tokenizer.from_checkpoint(ck).encode(PROMPT)[:64]
    t = time.perf_counter()
    if tp > 1:
        from backends.tp import load_tp_shard

        shard = load_tp_shard(backend, ck, 0, 30, tp, dtype="float32", threads=1)
    else:
        shard = load_shard(backend, ck, 0, 30, dtype="float32", threads=1)
    load_s = time.perf_counter() - t
    timer = Timer()
    if tp > 1:
        time_collectives(shard, backend, timer)

    def run(n: int, seq: str) -> tuple[float, float, list[int]]:
        shard.add_sequence(seq)
        t0 = time.perf_counter()
        s = shard.forward([SeqChunk(seq, 0, len(ids))], np.array(ids, np.int32))[0]
        t1 = time.perf_counter()
        out, timer.on = [s.token], True
        for i in range(n - 1):
            s = shard.forward([SeqChunk(seq, len(ids) + i, 1)], np.array([s.token], np.int32))[0]
            out.append(s.token)
        timer.on = False
        t2 = time.perf_counter()
        shard.free_sequence(seq)
        return len(ids) / (t1 - t0), (n - 1) / (t2 - t1), out

    run(4, "warm")
    res = [run(tokens, f"r{i}") for i in range(rounds)]
    stats = shard.rank_stats() if tp > 1 else [{"weight_nbytes": shard.weight_nbytes()}]
    if hasattr(shard, "close"):
        shard.close()
    return {"backend": backend, "tp": tp, "load_s": load_s, "prefill_tps": statistics.median(r[0] for r in res),
            "decode_tps": statistics.median(r[1] for r in res), "tokens": res[0][2],
            "reduce_us": timer.total / timer.n * 1e6 if timer.n else None, "reduces": timer.n,
            "decode_s": sum((tokens - 1) / r[1] for r in res), "reduce_s": timer.total,
            "weights_mb": [s["weight_nbytes"] / 1e6 for s in stats]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="torch,mlx")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=2, metavar=("BACKEND", "TP"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.tokens, a.rounds)))
        return 0
    load0 = os.getloadavg()[0]
    rows = []
    for backend in a.backends.split(","):
        for tp in (1, 2):
            p = subprocess.run([sys.executable, __file__, "--child", backend, str(tp), "--tokens", str(a.tokens),
                                "--rounds", str(a.rounds)], cwd=ROOT, capture_output=True, text=True)
            if p.returncode:
                sys.stderr.write(p.stderr[-3000:])
                return 1
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    import mlx.core as mx
    import torch

    print(f"\ntensor parallelism in one stage on 127.0.0.1: smollm2-135m Q4_1 layers 0-30, float32, greedy, "
          f"1 compute thread per rank; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}; torch {torch.__version__} (gloo), "
          f"mlx {mx.__version__} (ring)")
    print(f"{'config':<12}{'prefill tok/s':>14}{'decode tok/s':>14}{'decode vs TP=1':>16}"
          f"{'all-reduce us':>15}{'reduce share':>14}{'weights MB/rank':>17}{'same tokens':>13}")
    base = {}
    for r in rows:
        base.setdefault(r["backend"], r)
        b = base[r["backend"]]
        red = f"{r['reduce_us']:.0f}" if r["reduce_us"] else "-"
        share = f"{r['reduce_s'] / r['decode_s']:.0%}" if r["reduce_us"] else "-"
        print(f"{r['backend'] + ' TP=' + str(r['tp']):<12}{r['prefill_tps']:>14.1f}{r['decode_tps']:>14.2f}"
              f"{r['decode_tps'] / b['decode_tps']:>15.2f}x{red:>15}{share:>14}"
              f"{'/'.join(f'{w:.0f}' for w in r['weights_mb']):>17}{str(r['tokens'] == b['tokens']):>13}")
    print(f"decode {a.tokens} tokens after a 64-token prompt, median of {a.rounds} rounds; all-reduce: mean of "
          f"the {rows[-1]['reduces']} timed on rank 0 (2 per layer per token); TP=2 ranks share this "
          f"machine's cores, so it measures overhead, not speed-up")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
