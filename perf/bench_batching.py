"""Continuous batching: aggregate decode tokens/s at 1, 4, 8 and 16 concurrent streams, on one
peer and on a two-peer ring (127.0.0.1), with time to first token p50/p90, in one run.

    .venv/bin/python perf/bench_batching.py [--backend torch] [--tokens 48] [--streams 1,4,8,16]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh.local import LocalMesh  # noqa: E402

TOPICS = ["cats", "the moon", "bread", "rivers", "chess", "winter", "bees", "trains", "paper", "music",
          "glass", "salt", "clouds", "maps", "tea", "bridges"]


def pct(xs: list[float], q: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(q * len(ys)))]


def measure(api: str, streams: int, tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{api}/v1", api_key="x", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        first, n = None, 0
        s = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": f"Tell me about {TOPICS[i % 16]}."}],
            temperature=0, max_tokens=tokens, stream=True, extra_body={"ignore_eos": True},
            stream_options={"include_usage": True})
        for c in s:
            if c.usage:
                n = c.usage.completion_tokens
            elif c.choices and c.choices[0].delta.content and first is None:
                first = time.perf_counter()
        return t0, first or time.perf_counter(), n

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(streams) as ex:
        res = list(ex.map(one, range(streams)))
    wall = time.perf_counter() - t
    ttft = [(f - s) * 1000 for s, f, _ in res]
    return {"streams": streams, "tokens": sum(n for *_, n in res), "wall_s": wall,
            "agg_tps": sum(n for *_, n in res) / wall, "ttft_p50_ms": pct(ttft, 0.5), "ttft_p90_ms": pct(ttft, 0.9)}


def run(model: str, backend: str, stages: int, streams: list[int], tokens: int) -> list[dict]:
    cuts = [round(i * 30 / stages) for i in range(stages + 1)]
    mesh = LocalMesh(model)
    try:
        api = None
        for i in range(stages):
            p = mesh.add(f"s{i}", "--backend", backend, "--dtype", "float32", "--no-mdns", "--settle", "0.5",
                         "--layers", f"{cuts[i]}-{cuts[i + 1]}", *(["--peer", api.address] if api else []),
                         api=i == 0, threads=1)
            api = api or p
        mesh.wait_ready(api, stages=stages)
        measure(api.api, 2, 8)  # warm-up
        return [measure(api.api, k, tokens) for k in streams]
    finally:
        mesh.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--streams", default="1,4,8,16")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from backends.models import resolve_model

    model = str(resolve_model("smollm2-135m"))
    streams = [int(x) for x in a.streams.split(",")]
    load0 = os.getloadavg()[0]
    results = {"one peer": run(model, a.backend, 1, streams, a.tokens),
               "two-peer ring": run(model, a.backend, 2, streams, a.tokens)}
    print(f"\ncontinuous batching: smollm2-135m, {a.backend} float32, {a.tokens} tokens per stream (greedy), "
          f"{os.cpu_count()} cores, load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'config':<15}{'streams':>8}{'agg tok/s':>11}{'vs 1 stream':>13}{'TTFT p50 ms':>13}{'TTFT p90 ms':>13}")
    for name, rows in results.items():
        base = rows[0]["agg_tps"]
        for r in rows:
            print(f"{name:<15}{r['streams']:>8}{r['agg_tps']:>11.1f}{r['agg_tps'] / base:>12.2f}x"
                  f"{r['ttft_p50_ms']:>13.0f}{r['ttft_p90_ms']:>13.0f}")
    print("target: 8 streams >= 4x the tokens/s of one stream on one peer")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
