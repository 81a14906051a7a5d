"""Ring overhead: one peer vs a two- and a three-peer ring on 127.0.0.1, in one run.

Each configuration runs real `together join` processes (same backend, same dtype, one compute
thread each) and is driven through the OpenAI API after a warm-up: prefill tokens/s from the time
to first token of a prompt of ~160 tokens, the time to first token of a ~2,000-token prompt (which
goes in chunks that follow each other through the stages), decode tokens/s from a greedy stream of
fixed length, and the added time per network hop of a one-token frame (step wall time minus every
stage's compute time, divided by the hops), as the API peer's scheduler measures it. Every peer runs
with `--prefix-cache-memory 0` (a prompt timed again would be found in the cache of an earlier round)
and `--draft off` unless told otherwise.

    .venv/bin/python perf/bench_ring.py [--backend torch] [--dtype auto] [--tokens 64] [--rounds 3]
                                        [--stages 1,2,3] [--prefill-chunk 512] [--draft off]
                                        [--prefix-cache-memory 0]
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

from mesh.local import LocalMesh, http_json, own_cpu  # noqa: E402
from perf.bench_batching import peer_args  # noqa: E402

PROMPT = ("Write a detailed story about a lighthouse keeper who finds a message in a bottle, "
          "with the sea, the storm, the town and the letter described at length. ") * 4
LONG_PROMPT = PROMPT * 15 + PROMPT[:len(PROMPT) // 2]  # ~2,000 tokens with the chat template


class Config:
    """One ring of `stages` real peers, kept up for the whole run so the rounds of every
    configuration interleave (a shared machine's load then falls on all of them alike)."""

    def __init__(self, model: str, backend: str, dtype: str, stages: int, chunk: int,
                 extra: tuple[str, ...] = (), pin: bool = True) -> None:
        from openai import OpenAI

        self.stages, self.cuts = stages, [round(i * 30 / stages) for i in range(stages + 1)]
        self.mesh = LocalMesh(model)
        api = None
        try:
            for i in range(stages):
                p = self.mesh.add(f"s{i}", "--backend", backend, "--dtype", dtype, "--no-mdns", "--settle", "0.5",
                                  "--layers", f"{self.cuts[i]}-{self.cuts[i + 1]}", "--prefill-chunk", str(chunk),
                                  *(["--peer", api.address] if api else []), *extra, api=i == 0,
                                  cpus=own_cpu(i) if pin else None)
                api = api or p
            assert api is not None
            self.mesh.wait_ready(api, stages=stages)
        except BaseException:
            self.mesh.stop()
            raise
        self.api = api
        self.client = OpenAI(base_url=f"{api.api}/v1", api_key="x", max_retries=0, timeout=300)
        self.stream("warm up", 8)
        self.prompt_tokens, self.long_tokens = self.prompt_len(PROMPT), self.prompt_len(LONG_PROMPT)
        self.prefill: list[float] = []
        self.decode: list[float] = []
        self.ttft: list[float] = []

    def prompt_len(self, p: str) -> int:
        return self.client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": p}], max_tokens=1,
            temperature=0).usage.prompt_tokens

    def stream(self, prompt: str, max_tokens: int) -> tuple[float, list[float], int]:
        """(start, arrival of each text chunk, tokens generated per the answer's usage)."""
        t0 = time.perf_counter()
        times, n = [], 0
        s = self.client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": prompt}], temperature=0,
            max_tokens=max_tokens, stream=True, extra_body={"ignore_eos": True},
            stream_options={"include_usage": True})
        for ch in s:
            if ch.choices and ch.choices[0].delta.content:
                times.append(time.perf_counter())
            if ch.usage:
                n = ch.usage.completion_tokens
        return t0, times, n

    def round(self, tokens: int) -> None:
        t0, times, _ = self.stream(PROMPT, 1)
        self.prefill.append(self.prompt_tokens / (times[0] - t0))
        t0, times, _ = self.stream(LONG_PROMPT, 1)
        self.ttft.append((times[0] - t0) * 1000)
        t0, times, n = self.stream("Count from one to one hundred.", tokens)
        self.decode.append((n - 1) / (times[-1] - times[0]))  # tokens, not text chunks (a chunk may hold several)

    def result(self) -> dict:
        _, mesh_view = http_json(f"{self.api.api}/v1/mesh")
        sched = mesh_view.get("scheduler", {})
        return {"stages": self.stages, "split": self.cuts, "prompt_tokens": self.prompt_tokens,
                "long_tokens": self.long_tokens, "prefill_tps": statistics.median(self.prefill),
                "decode_tps": statistics.median(self.decode), "ttft_long_ms": statistics.median(self.ttft),
                "hop_p50_ms": sched.get("hop_overhead_ms_p50"), "hop_p90_ms": sched.get("hop_overhead_ms_p90"),
                "hop_samples": sched.get("hop_samples"), "bytes_per_token_hop": mesh_view.get("bytes_per_token_hop")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--stages", default="1,2,3", help="ring sizes to run (the first is the baseline)")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--draft", default="off", help="every peer's --draft (off, lookup)")
    ap.add_argument("--prefix-cache-memory", default="0",
                    help="every peer's --prefix-cache-memory (0, the default: every prompt is computed, not "
                         "found in a prefix cache from an earlier round; 'default': the peers' own default)")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="stage i's compute thread on core i (--cpus; default), or wherever the OS puts it")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from backends.models import resolve_model

    model = a.model or str(resolve_model("smollm2-135m"))
    load0 = os.getloadavg()[0]
    configs: list[Config] = []
    try:
        for k in a.stages.split(","):
            configs.append(Config(model, a.backend, a.dtype, int(k), a.prefill_chunk,
                                  peer_args(a.draft, a.prefix_cache_memory), a.pin))
        for _ in range(a.rounds):  # interleaved: each round measures every configuration in turn
            for c in configs:
                c.round(a.tokens)
        rows = [c.result() for c in configs]
    finally:
        for c in configs:
            c.mesh.stop()
    base = rows[0]
    print(f"\nring overhead on 127.0.0.1: smollm2-135m, {a.backend} {a.dtype}, 1 compute thread per peer, "
          f"{os.cpu_count()} cores, load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}; draft {a.draft}, prefix cache "
          f"{a.prefix_cache_memory} on every peer; {'stage i computing on core i mod cores (--cpus)' if a.pin else 'not pinned'}")
    print(f"{'config':<30}{'prefill tok/s':>14}{'decode tok/s':>14}{'decode vs 1':>13}{'TTFT 2k ms':>12}"
          f"{'TTFT vs 1':>11}{'hop p50 ms':>12}{'hop p90 ms':>12}{'bytes/tok/hop':>15}")
    for r in rows:
        name = "single peer" if r["stages"] == 1 else f"{r['stages']}-peer ring"
        split = ",".join(f"{x}-{y}" for x, y in zip(r["split"], r["split"][1:]))
        hp50 = f"{r['hop_p50_ms']:.3f}" if r["hop_p50_ms"] is not None else "-"
        hp90 = f"{r['hop_p90_ms']:.3f}" if r["hop_p90_ms"] is not None else "-"
        print(f"{name + ' ' + split:<30}{r['prefill_tps']:>14.1f}{r['decode_tps']:>14.2f}"
              f"{r['decode_tps'] / base['decode_tps']:>12.2f}x{r['ttft_long_ms']:>12.0f}"
              f"{r['ttft_long_ms'] / base['ttft_long_ms']:>10.2f}x{hp50:>12}{hp90:>12}"
              f"{r['bytes_per_token_hop'] or '-':>15}")
    print(f"prompt {base['prompt_tokens']} tokens, long prompt {base['long_tokens']} tokens in chunks of "
          f"{a.prefill_chunk}; decode {a.tokens} tokens, median of {a.rounds} interleaved rounds; "
          f"targets: 2-peer decode >= 0.90x single, 2-peer TTFT 2k <= 1.20x single, hop p50 < 0.3 ms")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
