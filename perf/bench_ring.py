"""Ring overhead: one peer vs a two- and a three-peer ring on 127.0.0.1, in one run.

Each configuration runs real `together join` processes (same backend, same dtype, one compute
thread each) and is driven through the OpenAI API after a warm-up: prefill tokens/s from the time
to first token of a long prompt, decode tokens/s from a greedy stream of fixed length, and the
added time per network hop of a one-token frame (step wall time minus every stage's compute time,
divided by the hops), as the API peer's scheduler measures it.

    .venv/bin/python perf/bench_ring.py [--backend torch] [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh.local import LocalMesh, http_json  # noqa: E402

PROMPT = ("Write a detailed story about a lighthouse keeper who finds a message in a bottle, "
          "with the sea, the storm, the town and the letter described at length. ") * 4


def run_config(model: str, backend: str, dtype: str, stages: int, tokens: int, rounds: int) -> dict:
    from openai import OpenAI

    n = 30
    cuts = [round(i * n / stages) for i in range(stages + 1)]
    mesh = LocalMesh(model)
    try:
        api = None
        for i in range(stages):
            p = mesh.add(f"s{i}", "--backend", backend, "--dtype", dtype, "--no-mdns", "--settle", "0.5",
                         "--layers", f"{cuts[i]}-{cuts[i + 1]}",
                         *(["--peer", api.address] if api else []), api=i == 0)
            api = api or p
        mesh.wait_ready(api, stages=stages)
        client = OpenAI(base_url=f"{api.api}/v1", api_key="x", max_retries=0, timeout=300)

        def stream(prompt: str, max_tokens: int) -> tuple[float, list[float], int]:
            """(start, arrival of each text chunk, tokens generated per the answer's usage)."""
            t0 = time.perf_counter()
            times, n = [], 0
            s = client.chat.completions.create(
                model="smollm2-135m", messages=[{"role": "user", "content": prompt}], temperature=0,
                max_tokens=max_tokens, stream=True, extra_body={"ignore_eos": True},
                stream_options={"include_usage": True})
            for ch in s:
                if ch.choices and ch.choices[0].delta.content:
                    times.append(time.perf_counter())
                if ch.usage:
                    n = ch.usage.completion_tokens
            return t0, times, n

        stream("warm up", 8)
        prefill, decode = [], []
        prompt_tokens = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": PROMPT}], max_tokens=1,
            temperature=0).usage.prompt_tokens
        for _ in range(rounds):
            t0, times, _ = stream(PROMPT, 1)
            prefill.append(prompt_tokens / (times[0] - t0))
            t0, times, n = stream("Count from one to one hundred.", tokens)
            decode.append((n - 1) / (times[-1] - times[0]))  # tokens, not text chunks (a chunk may hold several)
        _, mesh_view = http_json(f"{api.api}/v1/mesh")
        sched = mesh_view.get("scheduler", {})
        return {"stages": stages, "split": cuts, "prompt_tokens": prompt_tokens,
                "prefill_tps": statistics.median(prefill), "decode_tps": statistics.median(decode),
                "hop_p50_ms": sched.get("hop_overhead_ms_p50"), "hop_p90_ms": sched.get("hop_overhead_ms_p90"),
                "hop_samples": sched.get("hop_samples"), "bytes_per_token_hop": mesh_view.get("bytes_per_token_hop")}
    finally:
        mesh.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from backends.models import resolve_model

    model = a.model or str(resolve_model("smollm2-135m"))
    load0 = os.getloadavg()[0]
    rows = [run_config(model, a.backend, a.dtype, k, a.tokens, a.rounds) for k in (1, 2, 3)]
    base = rows[0]
    print(f"\nring overhead on 127.0.0.1: smollm2-135m, {a.backend} {a.dtype}, 1 compute thread per peer, "
          f"{os.cpu_count()} cores, load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'config':<22}{'prefill tok/s':>14}{'decode tok/s':>14}{'decode vs 1':>13}"
          f"{'hop p50 ms':>12}{'hop p90 ms':>12}{'bytes/tok/hop':>15}")
    for r in rows:
        name = "single peer" if r["stages"] == 1 else f"{r['stages']}-peer ring"
        split = ",".join(f"{x}-{y}" for x, y in zip(r["split"], r["split"][1:]))
        hp50 = f"{r['hop_p50_ms']:.3f}" if r["hop_p50_ms"] is not None else "-"
        hp90 = f"{r['hop_p90_ms']:.3f}" if r["hop_p90_ms"] is not None else "-"
        print(f"{name + ' ' + split:<22}{r['prefill_tps']:>14.1f}{r['decode_tps']:>14.2f}"
              f"{r['decode_tps'] / base['decode_tps']:>12.2f}x{hp50:>12}{hp90:>12}"
              f"{r['bytes_per_token_hop'] or '-':>15}")
    print(f"prompt {base['prompt_tokens']} tokens; decode {a.tokens} tokens, median of {a.rounds} rounds; "
          f"targets: 2-peer decode >= 0.90x single, hop p50 < 0.5 ms")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
