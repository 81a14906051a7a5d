"""Recovery and load benchmark on real `together join` processes (torch, float32, this host).

1. Recovery: a three-peer ring (layers 0-10 / 10-20 / 20-30) plus one standby. K times: stream a
   greedy answer, SIGKILL the current middle stage mid-stream, and time the gap from the kill to the
   next token reaching the client; then start a fresh standby for the next round.
2. Load: a two-peer ring (0-15 / 15-30), 64 streaming clients for 60 s: tokens/s, requests/s, errors.

    python perf/bench_recovery.py [--rounds 3] [--load-seconds 60] [--workers 64] [--no-load]
                                  [--standby mlx]   # MLX standbys: an MLX peer takes over, then is killed
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.models import resolve_model  # noqa: E402
from mesh.local import LocalMesh, http_json  # noqa: E402
from tests.mesh.test_load import run_load  # noqa: E402

MODEL = "smollm2-135m"
PROMPT = "Tell me a long story about a dragon who learns to bake bread."


def torch_peer(m: LocalMesh, name: str, *args: str, api: bool = False, backend: str = "torch"):
    return m.add(name, "--backend", backend, "--dtype", "float32", *args, api=api)


def wait_standby(m: LocalMesh, api, name: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = m.peers[name]
        if p.proc.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{p.log()[-2000:]}")
        if "standing by" in p.log():
            return
        time.sleep(0.3)
    raise RuntimeError(f"{name} never stood by:\n{m.peers[name].log()[-2000:]}")


def middle_stage(api) -> str:
    _, body = http_json(f"{api.api}/health")
    ring = sorted(body["ring"], key=lambda s: s["start"])
    return ring[len(ring) // 2]["name"]


def kill_mid_stream(m: LocalMesh, api, victim: str, at: int = 30, max_tokens: int = 120) -> tuple[float, int]:
    """(seconds from the SIGKILL to the next token at the client, tokens received per the usage)."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
                       "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", api.api_port, timeout=120)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    n, tokens, killed, gap = 0, 0, None, None  # n counts text chunks (when to kill), tokens the usage
    for line in r:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if "error" in ev:
            raise RuntimeError(f"the stream failed: {ev['error']}")
        if ev.get("usage"):
            tokens = ev["usage"]["completion_tokens"]
        if any((c.get("delta") or {}).get("content") for c in ev.get("choices", [])):
            n += 1
            if killed is not None and gap is None:
                gap = time.monotonic() - killed
            if n == at:
                m.peers[victim].proc.send_signal(signal.SIGKILL)
                killed = time.monotonic()
    conn.close()
    if gap is None:
        raise RuntimeError("no token after the kill")
    return gap, tokens


def bench_recovery(model_path: str, rounds: int, standby: str = "torch") -> list[tuple[int, str, float, int]]:
    """standby: the backend of the standbys (mlx: from round 2 on, the killed stage is MLX too)."""
    m = LocalMesh(model_path)
    rows = []
    try:
        api = torch_peer(m, "a", "--layers", "0-10", api=True)
        torch_peer(m, "b0", "--layers", "10-20")
        torch_peer(m, "c", "--layers", "20-30")
        m.wait_ready(api, stages=3)
        torch_peer(m, "s0", backend=standby)
        wait_standby(m, api, "s0")
        for k in range(rounds):
            victim = middle_stage(api)
            gap, n = kill_mid_stream(m, api, victim)
            m.wait_ready(api, stages=3, timeout=120)
            rows.append((k + 1, victim, gap, n))
            print(f"  round {k + 1}: killed {victim}, next token after {gap:.2f} s ({n} tokens)", flush=True)
            if k + 1 < rounds:  # a fresh standby for the next round
                name = f"s{k + 1}"
                torch_peer(m, name, backend=standby)
                wait_standby(m, api, name)
    finally:
        m.stop()
    return rows


def bench_load(model_path: str, seconds: float, workers: int):
    m = LocalMesh(model_path)
    try:
        a = torch_peer(m, "a", "--no-mdns", "--layers", "0-15", api=True)
        torch_peer(m, "b", "--no-mdns", "--layers", "15-30", "--peer", a.address)
        m.wait_ready(a, stages=2)
        return run_load("127.0.0.1", a.api_port, seconds, workers)
    finally:
        m.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--load-seconds", type=float, default=60)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--no-load", action="store_true", help="only the recovery table")
    ap.add_argument("--standby", choices=["torch", "mlx"], default="torch",
                    help="backend of the standbys (mlx: an MLX peer takes over, then is the one killed)")
    a = ap.parse_args()
    path = str(resolve_model(MODEL, quiet=True))
    print(f"model {MODEL}, torch float32, CPU, peers on 127.0.0.1, 1 thread each")
    print(f"\n# recovery: 3 torch stages (0-10/10-20/20-30) + {a.standby} standby, SIGKILL the middle "
          f"stage at token 30")
    rows = bench_recovery(path, a.rounds, a.standby)
    print(f"\n| kill | victim | kill -> next token (s) | tokens streamed |")
    print(f"|-----:|:-------|-----------------------:|----------------:|")
    for k, victim, gap, n in rows:
        print(f"| {k} | {victim} | {gap:.2f} | {n} |")
    print(f"p50 kill -> next token: {statistics.median(r[2] for r in rows):.2f} s")
    if a.no_load:
        return
    print(f"\n# load: 2 stages (0-15/15-30), {a.workers} streaming clients, greedy, max_tokens 8..40, "
          f"{a.load_seconds:.0f} s")
    rep = bench_load(path, a.load_seconds, a.workers)
    print(f"| requests | tokens | seconds | tokens/s | requests/s | errors | lost/mixed |")
    print(f"|---------:|-------:|--------:|---------:|-----------:|-------:|-----------:|")
    print(f"| {rep.requests} | {rep.tokens} | {rep.seconds:.1f} | {rep.tokens / rep.seconds:.1f} | "
          f"{rep.requests / rep.seconds:.2f} | {len(rep.errors)} | {len(rep.bad)} |")
    for e in rep.errors[:5]:
        print("  error:", e)


if __name__ == "__main__":
    main()
