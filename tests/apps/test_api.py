"""The OpenAI API of a two-peer mixed ring (MLX + torch), driven by the official `openai` client."""

from __future__ import annotations

import concurrent.futures as cf
import json
import urllib.error
import urllib.request

import pytest

from tests.mesh.cluster import two_peer_ring

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def ring(embedded_path):
    # MLX on a CPU is ~30x slower than torch: a short MLX slice keeps the suite fast (any split works)
    with two_peer_ring(str(embedded_path), backends=("mlx", "torch"), names=("m", "t"), api_both=True,
                       split=6) as c:
        yield c


@pytest.fixture(scope="module")
def oa(ring):
    from openai import OpenAI

    return OpenAI(base_url=f"{ring.peers['m'].api}/v1", api_key="x", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def pipe(embedded):
    from backends.pipeline import Pipeline, SliceSpec

    return Pipeline.load(embedded, [SliceSpec("torch", 0, 30)], dtype="float32", threads=1)


def alone(pipe, tokenizer, prompt_ids, max_tokens) -> str:
    from backends.sampling import SamplingParams

    return "".join(d.text for d in pipe.generate(prompt_ids, SamplingParams(max_tokens=max_tokens), tokenizer))


def chat_ids(tokenizer, text, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat(msgs)


def test_models_lists_the_model(oa):
    assert [m.id for m in oa.models.list().data] == [MODEL]


def test_greedy_chat_and_completions_equal_one_process(oa, pipe, tokenizer):
    msgs = [{"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "What is the largest ocean?"}]
    want = alone(pipe, tokenizer, tokenizer.apply_chat(msgs), 40)
    r = oa.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=40)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(tokenizer.apply_chat(msgs))
    assert r.usage.completion_tokens + r.usage.prompt_tokens == r.usage.total_tokens
    got = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(
        model=MODEL, messages=msgs, temperature=0, max_tokens=40, stream=True) if c.choices)
    assert got == want

    raw = "The three primary colors are"
    want = alone(pipe, tokenizer, tokenizer.encode(raw), 24)
    r = oa.completions.create(model=MODEL, prompt=raw, temperature=0, max_tokens=24)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 24
    got = "".join(c.choices[0].text for c in oa.completions.create(
        model=MODEL, prompt=raw, temperature=0, max_tokens=24, stream=True) if c.choices)
    assert got == want


def test_seeded_sampling_is_reproducible(oa):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Write a two-line poem about rain."}],
              temperature=1.0, top_p=0.95, max_tokens=24)
    a = oa.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = oa.chat.completions.create(seed=1234, **kw).choices[0].message.content
    c = oa.chat.completions.create(seed=99, **kw).choices[0].message.content
    assert a == b and a != c


def test_stop_max_tokens_n_logprobs_and_usage(oa):
    q = [{"role": "user", "content": "List the days of the week."}]
    full = oa.chat.completions.create(model=MODEL, messages=q, temperature=0, max_tokens=48)
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), text
    r = oa.chat.completions.create(model=MODEL, messages=q, temperature=0, max_tokens=48, stop=[stop, "zzzz"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.index(stop)]
    streamed = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(
        model=MODEL, messages=q, temperature=0, max_tokens=48, stop=stop, stream=True) if c.choices)
    assert streamed == text[: text.index(stop)]

    r = oa.chat.completions.create(model=MODEL, messages=q, temperature=0, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    r = oa.chat.completions.create(model=MODEL, messages=q, temperature=0, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3

    r = oa.chat.completions.create(model=MODEL, messages=q, temperature=0.9, seed=5, n=3, max_tokens=12)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 36 or r.usage.completion_tokens == sum(
        len(c.logprobs.content) if c.logprobs else 0 for c in r.choices) or r.usage.completion_tokens <= 36
    assert len({c.message.content for c in r.choices}) > 1

    r = oa.chat.completions.create(model=MODEL, messages=q, temperature=0, max_tokens=8, logprobs=True,
                                   top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens == 8
    for e in lp:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-4
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    assert "".join(e.token for e in lp) == r.choices[0].message.content

    r = oa.completions.create(model=MODEL, prompt="One, two,", temperature=0, max_tokens=6, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0

    chunks = list(oa.chat.completions.create(model=MODEL, messages=q, temperature=0, max_tokens=6,
                                             stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason == "length"


def test_sixteen_concurrent_streams_each_get_their_own_text(oa, pipe, tokenizer, ring):
    subjects = ["cats", "the moon", "bread", "rivers", "chess", "winter", "bees", "trains", "paper",
                "music", "glass", "salt", "clouds", "maps", "tea", "bridges"]
    jobs = [(f"Tell me one fact about {s}.", 4 + 2 * i) for i, s in enumerate(subjects)]
    want = [alone(pipe, tokenizer, chat_ids(tokenizer, q), n) for q, n in jobs]

    def run(job):
        q, n = job
        s = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                       temperature=0, max_tokens=n, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in s if c.choices)

    with cf.ThreadPoolExecutor(16) as ex:
        got = list(ex.map(run, jobs))
    assert got == want
    st = ring.status(ring.peers["m"])
    assert st.sequences == 0


def test_two_api_peers_on_one_ring_serve_at_the_same_time(ring, pipe, tokenizer):
    from openai import OpenAI

    clients = [OpenAI(base_url=f"{ring.peers[n].api}/v1", api_key="x", max_retries=0, timeout=300)
               for n in ("m", "t")]
    jobs = [(clients[i % 2], f"Give me a word that rhymes with {w}.", 10 + i) for i, w in
            enumerate(["cat", "tree", "moon", "day", "light", "rain"])]
    want = [alone(pipe, tokenizer, chat_ids(tokenizer, q), n) for _, q, n in jobs]

    def run(job):
        cl, q, n = job
        s = cl.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                       temperature=0, max_tokens=n, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in s if c.choices)

    with cf.ThreadPoolExecutor(6) as ex:
        assert list(ex.map(run, jobs)) == want
    assert [ring.status(ring.peers[n]).sequences for n in ("m", "t")] == [0, 0]


def post(ring, path, body: bytes | str | None, headers=None, method="POST"):
    req = urllib.request.Request(f"{ring.peers['m'].api}{path}", method=method,
                                 data=body.encode() if isinstance(body, str) else body,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"raw": raw.decode(errors="replace")}


def chat(**kw):
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kw})


BAD = [
    ("/v1/chat/completions", "{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", "[1, 2]", 400, "JSON object"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}]}), 400, "'model'"),
    ("/v1/chat/completions", chat(model="gpt-9"), 404, "does not exist"),
    ("/v1/chat/completions", chat(temperature="hot"), 400, "'temperature' must be a number"),
    ("/v1/chat/completions", chat(temperature=7), 400, "'temperature' must be between"),
    ("/v1/chat/completions", chat(top_p=-1), 400, "'top_p'"),
    ("/v1/chat/completions", chat(max_tokens=0), 400, "'max_tokens'"),
    ("/v1/chat/completions", chat(max_tokens=2.5), 400, "'max_tokens' must be an integer"),
    ("/v1/chat/completions", chat(n=0), 400, "'n'"),
    ("/v1/chat/completions", chat(n=True), 400, "'n' must be an integer"),
    ("/v1/chat/completions", chat(stop=[1, 2]), 400, "'stop'"),
    ("/v1/chat/completions", chat(stream="yes"), 400, "'stream' must be a boolean"),
    ("/v1/chat/completions", chat(top_logprobs=3), 400, "needs 'logprobs'"),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=50), 400, "'top_logprobs'"),
    ("/v1/chat/completions", chat(seed="abc"), 400, "'seed'"),
    ("/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                  tool_choice={"type": "function", "function": {"name": "g"}}), 400,
     "'g', which is not in 'tools'"),
    ("/v1/chat/completions", chat(response_format={"type": "yaml"}), 400, "'response_format' must be"),
    ("/v1/chat/completions", chat(response_format={"type": "regex", "regex": "(a"}), 400, "response_format"),
    ("/v1/chat/completions", chat(functions=[{"name": "f"}]), 400, "send 'tools'"),
    ("/v1/chat/completions", chat(frobnicate=1), 400, "unknown parameter 'frobnicate'"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": []}), 400, "non-empty list"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hi"}), 400, "non-empty list"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
     400, "role"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": 5}]}),
     400, "content must be"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}), 400, "'image_url' are not supported"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "word " * 9000}]), 400,
     "context is 8192 tokens"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": 42}), 400, "'prompt'"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": [999999]}), 400, "token ids"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "echo": True}), 400, "'echo'"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "logprobs": 9}), 400, "'logprobs'"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": ""}), 400, "empty"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}),
     400, "'stream_options'"),
    ("/v1/nothing", "{}", 404, ""),
]


def test_bad_requests_get_clear_4xx_in_openai_shape_and_the_server_keeps_serving(ring, oa):
    for path, body, status, msg in BAD:
        code, got = post(ring, path, body)
        assert code == status, (path, body[:80], code, got)
        assert set(got) == {"error"} and isinstance(got["error"]["message"], str), got
        assert msg in got["error"]["message"], (msg, got)
        assert got["error"]["type"]
    code, got = post(ring, "/v1/chat/completions", b"x" * (9 * 1024 * 1024))
    assert code == 413 and "error" in got
    code, got = post(ring, "/v1/chat/completions", None, method="GET")
    assert code == 405 and "error" in got
    code, got = post(ring, "/v1/chat/completions", chat(), headers={"Content-Type": "application/xml"})
    assert code == 415
    r = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                   temperature=0, user="someone")
    assert r.choices[0].message.content


def test_metrics_and_mesh_view(ring, oa):
    from mesh.local import http_json

    code, mesh = http_json(f"{ring.peers['m'].api}/v1/mesh")
    assert code == 200 and mesh["complete"] and [p["layers"] for p in sorted(
        mesh["peers"], key=lambda p: p["layers"][0])] == [[0, 6], [6, 30]]
    assert {p["backend"] for p in mesh["peers"]} == {"mlx", "torch"}
    with urllib.request.urlopen(f"{ring.peers['m'].api}/metrics", timeout=5) as r:
        text = r.read().decode()
    for name in ("together_requests_total", "together_tokens_generated_total", "together_queue_depth",
                 "together_hop_overhead_seconds", "together_ring_complete 1"):
        assert name in text


def scrape(peer) -> dict[str, dict[str, float]]:
    """/metrics parsed by prometheus_client: family -> {sample name with labels: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{peer.api}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = r.read().decode()
    return {f.name: {s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items())): s.value
                     for s in f.samples} for f in text_string_to_metric_families(text)}


def test_metrics_count_requests_and_tokens_and_export_histograms(ring, oa):
    before = scrape(ring.peers["m"])
    made = [oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Count to {i}."}],
                                       temperature=0, max_tokens=3 + i) for i in range(3)]
    after = scrape(ring.peers["m"])
    grew = {k: after[k][k + "_total"] - before[k][k + "_total"]
            for k in ("together_requests", "together_tokens_generated", "together_ring_steps")}
    assert grew["together_requests"] == 3
    assert grew["together_tokens_generated"] == sum(r.usage.completion_tokens for r in made)
    assert grew["together_ring_steps"] >= max(r.usage.completion_tokens for r in made)
    assert after["together_request_errors"]["together_request_errors_total"] == \
        before["together_request_errors"]["together_request_errors_total"]
    for h in ("together_step_seconds", "together_hop_overhead_seconds"):
        samples = after[h]
        assert {h + "_sum", h + "_count", h + "_bucket{le=+Inf}"} <= set(samples), (h, sorted(samples))
        assert samples[h + "_bucket{le=+Inf}"] == samples[h + "_count"]
    step = after["together_step_seconds"]
    assert step["together_step_seconds_count"] - before["together_step_seconds"]["together_step_seconds_count"] \
        == grew["together_ring_steps"] and step["together_step_seconds_sum"] > 0
    stage = after["together_stage_compute_seconds"]  # this peer runs layers [0, 6): each frame counted
    assert stage["together_stage_compute_seconds_count"] > 0
    assert after["together_ring_complete"]["together_ring_complete"] == 1
    assert after["together_plan_epoch"]["together_plan_epoch"] >= 1
    assert after["together_running_sequences"]["together_running_sequences"] == 0
    assert after["together_queue_depth"]["together_queue_depth"] == 0
    # (a finished sequence's caches are released asynchronously: only the gauges' presence is certain)
    assert after["together_stage_sequences"]["together_stage_sequences"] >= 0
    assert after["together_stage_kv_cache_bytes"]["together_stage_kv_cache_bytes"] >= 0
    assert after["together_kv_budget_tokens"]["together_kv_budget_tokens"] > 0


def test_streams_are_plain_server_sent_events_ending_with_done(ring):
    req = urllib.request.Request(f"{ring.peers['m'].api}/v1/completions", method="POST",
                                 data=json.dumps({"model": MODEL, "prompt": "One, two,", "max_tokens": 3,
                                                  "temperature": 0, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["Cache-Control"] == "no-cache"
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e and not e.startswith(":")]  # ": ping" comments may come
    assert events[-1] == "data: [DONE]" and raw.endswith("data: [DONE]\n\n"), raw
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
