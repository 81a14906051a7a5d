"""The prefix cache: time to first token of a request whose ~1,500-token system prompt the ring's
stages hold, against one whose prompt they have not seen, on a two-peer ring, in one run; and what a
block costs to keep (export) and to reuse (import) on a stage, by block size.

Ring: two real `together join` processes (torch, one compute thread each, 127.0.0.1, --peer, layers
0-15 and 15-30, the default dtype). Each round sends a new system prompt (random words, ~1,500
tokens) with one question (cold: nothing cached), then the same system prompt with another question
(cached: the stages hold its blocks), timing the first streamed token; median and best of --rounds.

Store: one stage's shard (layers 0-15) in this process, a 1,536-token sequence prefilled, then its
blocks exported (`_export_kv`, what a stage pays to keep them) and imported into a new sequence
(`_import_kv`, what a start with a prefix pays instead of the prefill), per block and per token, for
block sizes 16 to 128, next to the prefill's own cost per token.

    .venv/bin/python perf/bench_prefix.py [--rounds 3] [--words 1500] [--backend torch] [--dtype auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh.local import LocalMesh  # noqa: E402

MODEL = "smollm2-135m"
WORDS = ("river stone lantern orchard copper meadow signal harbor violet engine quiet summit ledger "
         "cobalt pepper window garden falcon marble thunder circuit willow anchor saddle").split()


def system_prompt(seed: int, words: int) -> str:
    rng = np.random.default_rng(seed)
    return "Remember this list. " + " ".join(rng.choice(WORDS, words)) + "."


def ttft(api_port: int, system: str, question: str) -> tuple[float, int]:
    """Seconds to the first streamed token, and the cached tokens the usage reports."""
    from openai import OpenAI

    oa = OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key="unused", max_retries=0, timeout=300)
    t0 = time.perf_counter()
    first = None
    cached = 0
    for chunk in oa.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=8, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}]):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.usage and chunk.usage.prompt_tokens_details:
            cached = chunk.usage.prompt_tokens_details.cached_tokens or 0
    return (first if first is not None else time.perf_counter() - t0), cached


def ring_rows(rounds: int, words: int, dtype: str) -> list[tuple[str, float, float, str]]:
    mesh = LocalMesh(MODEL)
    args = ("--backend", "torch", "--dtype", dtype, "--no-mdns")
    try:
        a = mesh.add("a", *args, "--layers", "0-15", api=True)
        mesh.add("b", *args, "--layers", "15-30", "--peer", a.address)
        mesh.wait_ready(a, stages=2, timeout=300)
        ttft(a.api_port, system_prompt(999, 50), "Hi")  # warm-up: torch's first calls, the links
        cold, warm, cached = [], [], []
        for r in range(rounds):
            system = system_prompt(r, words)
            t, c = ttft(a.api_port, system, "What is the capital of France?")
            assert c == 0, f"round {r}: a new system prompt reported {c} cached tokens"
            cold.append(t)
            t, c = ttft(a.api_port, system, "Name a color.")
            warm.append(t)
            cached.append(c)
    finally:
        mesh.stop()
    med_c, med_w = statistics.median(cold), statistics.median(warm)
    return [("TTFT, new system prompt (cold)", med_c * 1000, min(cold) * 1000, "1.00x"),
            (f"TTFT, cached system prompt ({min(cached)} tokens cached)", med_w * 1000, min(warm) * 1000,
             f"{med_w / med_c:.2f}x")]


def store_rows(backend: str, dtype: str) -> list[tuple[int, float, float, float]]:
    """(block, export ms per block, import ms per block, prefill ms per token) on layers 0-15."""
    from backends.models import resolve_model
    from backends.shard import SeqChunk, load_shard
    from backends.weights import open_checkpoint

    ck = open_checkpoint(resolve_model(MODEL, quiet=True))
    sh = load_shard(backend, ck, 0, 15, dtype=dtype, threads=1)
    n = 1536
    toks = (np.arange(n, dtype=np.int32) * 7919) % 40000 + 10
    sh.add_sequence("src")
    t0 = time.perf_counter()
    for at in range(0, n, 512):  # as the scheduler sends it: 512-token chunks
        sh.forward([SeqChunk("src", at, 512)], toks[at:at + 512])
    prefill = (time.perf_counter() - t0) * 1000 / n
    rows = []
    for block in (16, 32, 64, 128):
        export = imp = float("inf")
        for _ in range(3):  # the best of three: a shared machine's noise only ever adds
            t0 = time.perf_counter()
            blobs = [sh._export_kv("src", i, i + block) for i in range(0, n, block)]
            export = min(export, (time.perf_counter() - t0) * 1000 / len(blobs))
            sh.add_sequence("dst")
            t0 = time.perf_counter()
            sh._import_kv("dst", blobs)
            imp = min(imp, (time.perf_counter() - t0) * 1000 / len(blobs))
            sh.free_sequence("dst")
        rows.append((block, export, imp, prefill))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--words", type=int, default=1500, help="words of each system prompt (~1 token each)")
    ap.add_argument("--backend", default="torch", help="the backend of the store rows (mlx or torch)")
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()

    print(f"store, {a.backend} {a.dtype}, layers 0-15 of {MODEL} (one stage's share of a two-peer ring)")
    print(f"{'block':>6} {'export ms/block':>16} {'import ms/block':>16} {'import us/token':>16} "
          f"{'prefill us/token':>17} {'import/prefill':>15}")
    for block, exp, imp, pre in store_rows(a.backend, a.dtype):
        print(f"{block:>6} {exp:>16.3f} {imp:>16.3f} {imp * 1000 / block:>16.1f} {pre * 1000:>17.1f} "
              f"{imp / block / pre:>14.4f}x")
    print()
    print(f"two-peer torch ring ({a.dtype}), {a.words}-word system prompt, {a.rounds} rounds")
    print(f"{'what':<52} {'median ms':>10} {'best ms':>9} {'ratio':>7}")
    for what, med, best, ratio in ring_rows(a.rounds, a.words, a.dtype):
        print(f"{what:<52} {med:>10.1f} {best:>9.1f} {ratio:>7}")


if __name__ == "__main__":
    main()
