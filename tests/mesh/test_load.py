"""Sustained load on a two-peer torch ring: 64 streaming clients for half a minute (TOGETHER_LOAD_S). Nothing is lost,
duplicated or mixed up between streams, and afterwards no peer holds a sequence, a cache byte, a
pending frame, or more tasks and file descriptors than before."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from dataclasses import dataclass, field

import pytest

from tests.mesh.cluster import Cluster, two_peer_ring

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
WORKERS = 64
SECONDS = float(os.environ.get("TOGETHER_LOAD_S", "30"))  # a soak: TOGETHER_LOAD_S=300
SUBJECTS = ["cats", "the moon", "bread", "rivers", "chess", "winter", "bees", "trains", "paper", "music", "glass",
            "salt", "clouds", "maps", "tea", "bridges", "owls", "volcanoes", "copper", "tides", "ferns", "kites",
            "honey", "deserts", "pianos", "lighthouses", "maples", "comets", "otters", "canals", "wool", "caves"]
CHECKED = 8  # workers 0..7 always ask the same question, answered alone first


def job(worker: int, round_: int) -> tuple[str, int]:
    """Prompt and max_tokens (8..40) of a worker's round; the checked workers repeat theirs."""
    k = 0 if worker < CHECKED else round_
    subject = SUBJECTS[(worker * 7 + k) % len(SUBJECTS)]
    verb = ["Tell me one fact about", "Write a short sentence about", "What colour is", "Describe"][(worker + k) % 4]
    return f"{verb} {subject}.", 8 + (worker * 13 + k * 5) % 33


@dataclass
class Outcome:
    text: str = ""
    finish: str | None = None
    tokens: int = 0
    error: str | None = None


def stream_chat(host: str, port: int, prompt: str, max_tokens: int, timeout: float = 300) -> Outcome:
    """One greedy streaming chat request over a raw HTTP connection (the openai client's per-chunk
    parsing costs more CPU than the two peers can spare on a 2-core machine)."""
    out = Outcome()
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                       "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            out.error = f"HTTP {r.status}: {r.read()[:200]!r}"
            return out
        parts = []
        done = False
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                done = True
                break
            ev = json.loads(data)
            if "error" in ev:
                out.error = ev["error"].get("message", "error event")
                break
            if ev.get("usage"):
                out.tokens = ev["usage"]["completion_tokens"]
            for ch in ev.get("choices", []):
                parts.append(ch.get("delta", {}).get("content") or "")
                out.finish = ch.get("finish_reason") or out.finish
        out.text = "".join(parts)
        if not done and out.error is None:
            out.error = "stream ended without [DONE]"
    except (OSError, http.client.HTTPException, ValueError) as e:
        out.error = repr(e)
    finally:
        conn.close()
    return out


@dataclass
class LoadReport:
    seconds: float = 0.0
    requests: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # lost (no finish / empty) or mixed (checked text differs)

    def line(self) -> str:
        return (f"{self.requests} requests, {self.tokens} tokens in {self.seconds:.1f} s: "
                f"{self.tokens / self.seconds:.1f} tokens/s, {self.requests / self.seconds:.2f} requests/s, "
                f"{len(self.errors)} errors, {len(self.bad)} lost/mixed")


def run_load(host: str, port: int, seconds: float, workers: int = WORKERS,
             want: dict[int, str] | None = None) -> LoadReport:
    """`workers` threads each stream requests back to back until the deadline (the last one finishes)."""
    rep = LoadReport()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker(w: int) -> None:
        k = 0
        while time.monotonic() < deadline:
            prompt, n = job(w, k)
            o = stream_chat(host, port, prompt, n)
            with lock:
                rep.requests += 1
                rep.tokens += o.tokens
                if o.error:
                    rep.errors.append(f"worker {w} round {k}: {o.error}")
                elif o.finish not in ("length", "stop") or not o.text:
                    rep.bad.append(f"worker {w} round {k}: lost (finish {o.finish!r}, text {o.text!r})")
                elif want and w in want and o.text != want[w]:
                    rep.bad.append(f"worker {w} round {k}: {o.text!r} != alone {want[w]!r}")
                elif o.finish == "length" and o.tokens != n:
                    rep.bad.append(f"worker {w} round {k}: {o.tokens} tokens for max_tokens {n}")
            k += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 600)
    rep.seconds = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), "a client hung"
    return rep


def quiet(cluster: Cluster, peers, timeout: float = 10.0) -> list:
    """Status of each peer once nothing is in flight (or the last one seen at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        sts = [cluster.status(p) for p in peers]
        idle = all(s.sequences == 0 and s.cache_bytes == 0 and s.pending_frames == 0 and s.running == 0
                   and s.waiting == 0 for s in sts)
        if idle or time.monotonic() > deadline:
            return sts
        time.sleep(0.2)


@pytest.fixture(scope="module")
def ring(embedded_path):
    with two_peer_ring(str(embedded_path)) as c:
        yield c


def test_64_streams_for_half_a_minute_lose_nothing_mix_nothing_and_leak_nothing(ring):
    a = ring.peers["a"]
    peers = [ring.peers["a"], ring.peers["b"]]
    want = {}
    for w in range(CHECKED):  # each checked request alone first, one at a time
        prompt, n = job(w, 0)
        o = stream_chat("127.0.0.1", a.api_port, prompt, n)
        assert o.error is None and o.text, o
        want[w] = o.text
    before = quiet(ring, peers)
    rep = run_load("127.0.0.1", a.api_port, SECONDS, WORKERS, want)
    print("\nload:", rep.line())
    after = quiet(ring, peers)
    assert not rep.errors, rep.errors[:5]
    assert not rep.bad, rep.bad[:5]
    assert rep.requests >= WORKERS
    for p, b, s in zip(peers, before, after):
        assert (s.sequences, s.cache_bytes, s.pending_frames, s.running, s.waiting) == (0, 0, 0, 0, 0), (p.name, s)
        assert s.tasks <= b.tasks + 5, (p.name, "tasks", b.tasks, s.tasks)
        assert s.open_fds <= b.open_fds + 5, (p.name, "fds", b.open_fds, s.open_fds)
        assert p.proc.poll() is None
