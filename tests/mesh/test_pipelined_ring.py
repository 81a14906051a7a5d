"""Micro-batches on real rings: several streams of different lengths, and a long prompt going in
chunks while they decode, give the single process's greedy tokens on a two- and a three-stage ring
(torch, and torch with an MLX stage between), with no frame refused or replayed on the way (every link
delivers in order and every stage runs frames in order, or chunks would arrive out of step)."""

from __future__ import annotations

import concurrent.futures as cf
import urllib.request

import pytest

from tests.mesh.cluster import Cluster

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
LONG = ("Here is a list of things found in an old house: " + ", ".join(
    f"a {c} {t}" for c in ("red", "blue", "green", "brown", "grey") for t in
    ("chair", "lamp", "book", "clock", "cup", "map", "rug", "box", "coat", "key", "pen", "bell"))
    + ". Which of them is the oldest, and why?") * 3
JOBS = [("What is the capital of France?", 24), ("Name two primary colors.", 10),
        ("Write a haiku about the sea.", 30), ("Count from one to ten.", 18), (LONG, 12),
        ("Why is the sky blue?", 28)]


def reference(embedded, tokenizer, jobs: list[tuple[str, int]]) -> list[str]:
    """Each job's single-process greedy answer (float32, one sequence at a time, prompt in one go)."""
    from backends.pipeline import Pipeline, SliceSpec
    from backends.sampling import SamplingParams

    pipe = Pipeline.load(embedded, [SliceSpec("torch", 0, 30)], dtype="float32")
    out = []
    for q, n in jobs:
        prompt = tokenizer.apply_chat([{"role": "user", "content": q}])
        out.append("".join(d.text for d in pipe.generate(prompt, SamplingParams(max_tokens=n), tokenizer)))
    return out


def serve_all(peer, jobs: list[tuple[str, int]]) -> list[str]:
    """Every job at once, through the API, greedy."""
    from openai import OpenAI

    oa = OpenAI(base_url=f"{peer.api}/v1", api_key="x", max_retries=0, timeout=300)

    def one(job: tuple[str, int]) -> str:
        r = oa.chat.completions.create(model=MODEL, temperature=0, max_tokens=job[1],
                                       messages=[{"role": "user", "content": job[0]}])
        return r.choices[0].message.content or ""

    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        return list(ex.map(one, jobs))


def nothing_replayed(peer) -> None:
    with urllib.request.urlopen(f"{peer.api}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(samples["together_recovery_seconds_count"]) == 0, "a sequence was replayed"
    assert float(samples["together_request_errors_total"]) == 0
    assert float(samples["together_requests_total"]) == len(JOBS)


@pytest.fixture(scope="module")
def want(embedded, tokenizer) -> list[str]:
    """The single process's answers, computed once for both rings."""
    return reference(embedded, tokenizer, JOBS)


@pytest.mark.parametrize("backends", [("torch", "torch"), ("torch", "mlx", "torch")], ids=["2-torch", "3-mixed"])
def test_micro_batches_and_chunked_prompts_answer_like_one_process(embedded_path, want, backends):
    cuts = [0, 15, 30] if len(backends) == 2 else [0, 12, 15, 30]  # MLX on a CPU stays short
    c = Cluster(str(embedded_path))
    try:
        api = None
        for i, b in enumerate(backends):
            p = c.add(f"s{i}", "--backend", b, "--dtype", "float32", "--no-mdns", "--layers",
                      f"{cuts[i]}-{cuts[i + 1]}", *(["--peer", api.address] if api else []),
                      *(["--prefill-chunk", "48"] if api is None else []), api=api is None)
            api = api or p
        c.wait_ready(api, stages=len(backends))
        assert serve_all(api, JOBS) == want
        nothing_replayed(api)
    finally:
        c.stop()
