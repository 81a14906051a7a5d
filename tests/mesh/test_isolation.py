"""No request hurts another: clients that drop their streams mid-answer, prompts longer than a frame
should carry, and an API peer killed mid-answer. Real processes, real gRPC, the official openai
client."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request

import pytest

from tests.mesh.cluster import Cluster, two_peer_ring

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
TOPICS = ["the sea", "a lighthouse", "bread", "a fox", "winter", "a violin", "the moon", "a garden"]


def client(peer):
    from openai import OpenAI

    return OpenAI(base_url=f"{peer.api}/v1", api_key="x", max_retries=0, timeout=600)


def chat(peer, topic: str, n: int, drop_after: int | None = None, on_piece=None) -> str:
    """Stream a greedy answer; with drop_after, close the stream after that many pieces of text."""
    s = client(peer).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Write a short poem about {topic}."}],
        temperature=0, max_tokens=n, stream=True, extra_body={"ignore_eos": True})
    parts: list[str] = []
    for ch in s:
        if ch.choices and ch.choices[0].delta.content:
            parts.append(ch.choices[0].delta.content)
            if on_piece:
                on_piece(len(parts))
            if drop_after is not None and len(parts) >= drop_after:
                s.close()  # the client goes away mid-answer
                break
    return "".join(parts)


def sequences(c: Cluster, timeout: float, names: tuple[str, ...] = ("a", "b")) -> list[int]:
    """Live caches on these peers, polled until all are zero (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        live = [c.status(c.peers[n]).sequences for n in names]
        if not any(live) or time.monotonic() > deadline:
            return live
        time.sleep(0.2)


@pytest.fixture(scope="module")
def ring(embedded_path):
    with two_peer_ring(str(embedded_path)) as c:
        yield c


def test_two_clients_drop_their_streams_and_the_other_six_equal_their_solo_text(ring):
    a = ring.peers["a"]
    solo = {t: chat(a, t, 24) for t in TOPICS[:6]}
    for round_ in range(2):
        got: dict[str, str | BaseException] = {}

        def run(topic: str, drop: bool) -> None:
            try:
                got[topic] = chat(a, topic, 24, drop_after=3 if drop else None)
            except BaseException as e:  # noqa: BLE001 - reported below with the others
                got[topic] = e

        threads = [threading.Thread(target=run, args=(t, i >= 6)) for i, t in enumerate(TOPICS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
        assert {t: got[t] for t in TOPICS[:6]} == solo, f"round {round_}"
    assert sequences(ring, 10) == [0, 0]  # the dropped ones were released too


def test_a_6000_token_prompt_is_answered_in_chunks(ring):
    a = ring.peers["a"]
    steps = metric(a, "together_ring_steps_total")
    r = client(a).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello " * 5990 + "\nSay hi."}],
        temperature=0, max_tokens=4, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens > 6000 and r.usage.completion_tokens == 4
    # in one frame: 4 steps (the prompt's frame draws the first token); in chunks of at most 4,096
    # tokens: at least one more
    assert metric(a, "together_ring_steps_total") - steps >= 5
    assert sequences(ring, 10) == [0, 0]


def metric(peer, name: str) -> float:
    with urllib.request.urlopen(f"{peer.api}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def test_killing_the_api_peer_mid_answer_empties_every_stage_within_the_lease(embedded_path):
    lease = 3.0
    c = Cluster(str(embedded_path))
    try:
        a = c.add("a", "--backend", "torch", "--dtype", "float32", "--no-mdns", "--layers", "0-15",
                  "--seq-lease", str(lease))
        c.add("b", "--backend", "torch", "--dtype", "float32", "--no-mdns", "--layers", "15-30",
              "--peer", a.address, "--seq-lease", str(lease))
        api = c.add("api", "--backend", "torch", "--dtype", "float32", "--no-mdns", "--peer", a.address,
                    api=True)  # a standby that serves the API: its death leaves the ring as it is
        c.wait_ready(api, stages=2)
        started = threading.Event()

        def run(topic: str) -> None:
            try:
                chat(api, topic, 400, on_piece=lambda i: started.set() if i >= 5 else None)
            except Exception:  # noqa: BLE001 - its peer is killed under it
                pass

        threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in TOPICS[:4]]
        for th in threads:
            th.start()
        assert started.wait(120)
        live = sequences(c, 0)
        api.proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        assert min(live) > 0
        left = sequences(c, lease + 5)
        assert left == [0, 0], f"caches left after {time.monotonic() - t0:.1f} s: {left}"
        assert time.monotonic() - t0 < lease + 3
    finally:
        c.stop()
