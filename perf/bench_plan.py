"""The planner's predictions against the rings it builds, in one run: for each ring (torch peers on
127.0.0.1, one compute thread each; the API peer first, the others as it listens, so the coordinator
places them all at once),
the predicted decode tokens/s of one stream (the plan's `predicted_tokens_per_s`: stage compute from
each peer's measured layer_ms plus hops from its measured links) next to the measured one (a greedy
streamed request: tokens after the first per the usage, over the wall time from the first text to
the end; median of --runs), and their ratio (target: within 25 %). The rings: two peers, three
peers, and three peers of which one sends every message --delay-ms late (the test-only
--link-delay-ms), placed by the planner (`measured`) and by memory alone (`memory`).

    .venv/bin/python perf/bench_plan.py [--tokens 48] [--runs 3] [--delay-ms 40] [--rings 2,3,3d,3dm]
                                        [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.models import resolve_model  # noqa: E402
from mesh.local import LocalMesh, wait_port  # noqa: E402

QUESTION = "Tell me a long story about a dragon who learns to bake bread."
RINGS = {  # name -> (peers, delayed peer or None, placement)
    "2": (2, None, "measured"),
    "3": (3, None, "measured"),
    "3d": (3, "c", "measured"),
    "3dm": (3, "c", "memory"),
}


def decode_tps(api: str, tokens: int) -> float:
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
            "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    req = urllib.request.Request(f"{api}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    first, n = None, 0
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if first is None and ev.get("choices") and ev["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if ev.get("usage"):
                n = ev["usage"]["completion_tokens"]
    end = time.perf_counter()
    return (n - 1) / (end - first) if first and n > 1 else 0.0


def run_ring(model: str, peers: int, delayed: str | None, placement: str, delay_ms: float, tokens: int,
             runs: int, dtype: str) -> dict:
    mesh = LocalMesh(model)
    try:
        for i, name in enumerate("abc"[:peers]):
            extra = ["--link-delay-ms", str(delay_ms)] if name == delayed else []
            # the API peer (its tokenizer takes seconds) first; the others once it listens, settling
            # less: every peer knows the others before any claims, so they are placed all at once
            p = mesh.add(name, "--backend", "torch", "--dtype", dtype, "--placement", placement,
                         "--settle", "5" if i == 0 else "3", *extra, api=i == 0)
            if i == 0:
                wait_port(p.host, p.port)
        api = mesh.peers["a"].api
        body = mesh.wait_complete(mesh.peers["a"], timeout=300)
        decode_tps(api, 4)  # warm the path
        measured = statistics.median(decode_tps(api, tokens) for _ in range(runs))
        with urllib.request.urlopen(f"{api}/v1/mesh", timeout=10) as r:
            view = json.loads(r.read())
        layers = " ".join(f"{s['name']}[{s['start']},{s['end']})" for s in body["ring"])
        return {"layers": layers, "measured": measured, "predicted": view["speed"]["predicted_tokens_per_s"] or 0.0,
                "limit": view["speed"]["limit"]}
    finally:
        mesh.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--delay-ms", type=float, default=40.0)
    ap.add_argument("--rings", default=",".join(RINGS))
    ap.add_argument("--dtype", default="float32", help="the peers' --dtype (float32: as the tests' rings)")
    a = ap.parse_args()
    model = str(resolve_model("smollm2-135m"))
    rows = []
    for name in a.rings.split(","):
        peers, delayed, placement = RINGS[name]
        r = run_ring(model, peers, delayed, placement, a.delay_ms, a.tokens, a.runs, a.dtype)
        label = f"{peers} peers" + (f", c +{a.delay_ms:g} ms" if delayed else "") + f", {placement}"
        rows.append((label, r))
        print(f"done: {label}: {r}", file=sys.stderr)
    print(f"\n{'ring':<28} {'layers':<28} {'predicted':>10} {'measured':>9} {'meas/pred':>9}  limit")
    for label, r in rows:
        ratio = r["measured"] / r["predicted"] if r["predicted"] else float("nan")
        print(f"{label:<28} {r['layers']:<28} {r['predicted']:>10.2f} {r['measured']:>9.2f} {ratio:>9.2f}  "
              f"{r['limit']}")
    print("(decode tokens/s of one stream; predicted: the plan's, from measured layer times and links)")


if __name__ == "__main__":
    main()
