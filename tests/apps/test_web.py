"""A real browser (headless Chromium, driven by playwright) uses the web page of a two-peer ring."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request

from pathlib import Path

import pytest

from mesh.local import LocalMesh, http_json

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-proxy-server"]
SCREENSHOT = "/tmp/together-web.png"
QUESTION = "What is the capital of France?"


WEB = Path(__file__).resolve().parents[2] / "apps" / "web"


def need_browser() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium binary at {CHROMIUM}: run `make browser` (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


@pytest.fixture(scope="module")
def ring(embedded_path):
    need_browser()
    m = LocalMesh(str(embedded_path))
    try:
        # room for its own 15 layers, not for beta's too: when beta leaves, the ring stays incomplete
        # (a survivor taking them over would close the gap before the page's next poll, or not)
        first = m.add("alpha", "--backend", "torch", "--dtype", "float32", "--no-mdns", "--layers", "0-15",
                      "--max-memory", "450MB", api=True)
        m.add("beta", "--backend", "torch", "--dtype", "float32", "--no-mdns", "--layers", "15-30",
              "--peer", first.address)
        m.wait_ready(first, timeout=120, stages=2)
        yield m
    finally:
        m.stop()


@pytest.fixture
def page():
    need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1280, "height": 800})
            pg.page_errors = []
            pg.on("pageerror", lambda e: pg.page_errors.append(str(e)))
            pg.set_default_timeout(15_000)
            yield pg
        finally:
            browser.close()


def post(api: str, body: dict) -> dict:
    req = urllib.request.Request(f"{api}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


# Records the length of the last assistant answer on every DOM change, to see it stream in.
WATCH = """() => {
  window.__lens = [];
  new MutationObserver(() => {
    const all = document.querySelectorAll('#messages .msg.assistant .content');
    if (all.length) window.__lens.push((all[all.length - 1].dataset.text || '').length);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""
# the answer's Markdown source (the page renders it as HTML and keeps the source on the element)
LAST_ANSWER = "() => { const a = document.querySelectorAll('#messages .msg.assistant .content');" \
              " return a.length ? a[a.length - 1].dataset.text : null; }"


def set_controls(page, **values) -> None:
    for k, v in values.items():
        page.fill(f"#{k}", str(v))


def wait_idle(page, timeout: float = 60_000) -> None:
    page.wait_for_function("() => !document.querySelector('#messages .streaming') && "
                           "!document.getElementById('send').disabled", timeout=timeout)


def test_chat_and_ring_status_in_a_real_browser(ring, page):
    api = ring.peers["alpha"]
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") and r.method == "POST" else None)
    page.goto(api.api)

    # the ring: both peers, in order, with layers, backend, memory and a coordinator
    page.wait_for_selector("#ring .peer[data-name=alpha][data-state=ready]")
    page.wait_for_selector("#ring .peer[data-name=beta][data-state=ready]")
    peers = page.eval_on_selector_all("#ring .peer", "els => els.map(e => [e.dataset.name, e.dataset.layers,"
                                                     " e.dataset.backend, e.textContent])")
    assert [(n, lay, b) for n, lay, b, _ in peers] == [("alpha", "0-15", "torch"), ("beta", "15-30", "torch")]
    assert "[0, 15)" in peers[0][3] and "[15, 30)" in peers[1][3]
    assert all("GiB" in text and "torch" in text for *_, text in peers)
    assert page.locator("#ring .tag.coordinator").count() == 1
    assert page.is_hidden("#banner")
    assert page.eval_on_selector("#model", "s => s.value") == http_json(f"{api.api}/v1/models")[1]["data"][0]["id"]

    # a greedy answer streams in, token by token, and equals the non-streaming API's
    set_controls(page, temperature=0, top_p=1, top_k=0, max_tokens=40)
    page.evaluate(WATCH)
    page.fill("#prompt", QUESTION)
    page.click("#send")
    page.wait_for_selector("#messages .msg.assistant")
    wait_idle(page)
    streamed = page.evaluate(LAST_ANSWER)
    lens = page.evaluate("() => window.__lens")
    assert len(set(x for x in lens if x > 0)) > 1, f"the answer did not grow in steps: {lens}"
    model = page.eval_on_selector("#model", "s => s.value")
    want = post(api.api, {"model": model, "temperature": 0, "top_p": 1, "top_k": 0, "max_tokens": 40,
                          "messages": [{"role": "user", "content": QUESTION}]})
    assert streamed and streamed == want["choices"][0]["message"]["content"]
    assert float(page.get_attribute("#tps", "data-value")) > 0
    # the links both peers measured, and this peer's measured one-stream decode speed
    page.wait_for_selector("#links tr[data-from=alpha][data-to=beta]")
    page.wait_for_selector("#links tr[data-from=beta][data-to=alpha]")
    page.wait_for_function("() => document.getElementById('ring-speed').dataset.measured > 0")
    assert "measured" in page.text_content("#ring-speed")
    assert "tok/s" in page.text_content("#tps")
    assert sent[0]["stream"] is True and sent[0]["stream_options"] == {"include_usage": True}
    assert sent[0]["temperature"] == 0 and sent[0]["max_tokens"] == 40 and sent[0]["model"] == model
    assert page.is_hidden("#error")
    page.screenshot(path=SCREENSHOT)

    # a long answer, stopped: it stops growing and the server frees the sequence
    set_controls(page, max_tokens=200)
    page.fill("#prompt", "Tell me a long story about a dragon and a knight.")
    page.click("#send")
    page.wait_for_function(f"() => ({LAST_ANSWER})() !== null && ({LAST_ANSWER})().length > 20 && "
                           "document.querySelectorAll('#messages .msg.assistant').length === 2")
    assert http_json(f"{api.api}/v1/mesh")[1]["scheduler"]["running"] == 1
    page.click("#stop")
    page.wait_for_selector("#messages .msg.assistant .note")
    assert page.text_content("#messages .msg.assistant:last-child .note") == "stopped"
    deadline = time.time() + 2
    while time.time() < deadline and http_json(f"{api.api}/v1/mesh")[1]["scheduler"]["running"]:
        time.sleep(0.1)
    assert http_json(f"{api.api}/v1/mesh")[1]["scheduler"]["running"] == 0
    stopped_at = page.evaluate(LAST_ANSWER)
    time.sleep(1.0)
    assert page.evaluate(LAST_ANSWER) == stopped_at
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    # multi-turn: the whole conversation went with the second question
    assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]
    assert sent[1]["messages"][1]["content"] == streamed and sent[1]["max_tokens"] == 200

    # a reload keeps the conversation (localStorage), the stopped answer and its note included
    page.reload()
    page.wait_for_selector("#ring .peer[data-name=alpha]")
    assert page.eval_on_selector_all("#messages .msg", "ms => ms.map(m => m.dataset.role)") == [
        "user", "assistant", "user", "assistant"]
    assert page.eval_on_selector_all("#messages .msg.assistant .content", "cs => cs.map(c => c.dataset.text)") == [
        streamed, stopped_at]
    assert page.text_content("#messages .msg.assistant:last-child .note") == "stopped"
    assert page.text_content("#messages .msg.user .content") == QUESTION
    assert page.locator("#chats .chat.current").count() == 1

    # Clear empties the conversation
    page.click("#clear")
    assert page.locator("#messages .msg").count() == 0
    assert page.text_content("#tps").startswith("–")

    # an error of the API (OpenAI shape) is shown, and the message stays in the box to retry
    set_controls(page, max_tokens=0)
    page.fill("#prompt", "Hello?")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert "400" in page.text_content("#error") and "max_tokens" in page.text_content("#error")
    assert page.locator("#messages .msg.user.failed").count() == 1
    assert page.input_value("#prompt") == "Hello?" and page.is_enabled("#send")

    # a peer leaves: the status view shows the ring incomplete and the peer gone
    ring.peers["beta"].stop()
    page.wait_for_selector("#banner:not([hidden])", timeout=10_000)
    assert "incomplete" in page.text_content("#banner").lower()
    assert page.get_attribute("#health", "data-state") == "incomplete"
    page.screenshot(path=SCREENSHOT.replace(".png", "-incomplete.png"))
    page.wait_for_function("() => !document.querySelector('.peer[data-name=beta]')", timeout=10_000)
    assert page.page_errors == []


def test_gaps_standby_and_untrusted_names_render_safely(page):
    """The page on canned /v1/mesh answers (no ring needed): a gap in the layers, a standby peer, a
    name that looks like HTML (shown as text), and an API that stops answering."""
    mesh = {"model": "/m/smollm2.gguf", "epoch": 7, "complete": False, "missing": "no peer holds layers [10, 20)",
            "num_layers": 30, "self": "n1",
            "ring": [{"node_id": "n1", "name": "<b>x</b>", "backend": "mlx", "address": "a:1", "start": 0,
                      "end": 10, "ready": True},
                     {"node_id": "n2", "name": "two", "backend": "torch", "address": "a:2", "start": 20,
                      "end": 30, "ready": False}],
            "peers": [{"node_id": "n1", "name": "<b>x</b>", "backend": "mlx", "address": "a:1", "api": "a:9",
                       "layers": [0, 10], "ready": True, "free_memory": 3 * 2**30, "coordinator": True,
                       "tokens_per_s": 12.5, "standby": False, "dtype": "float32", "weight_format": "float32",
                       "layer_ms": 8.96, "links": [{"to": "n2", "to_name": "two", "rtt_ms": 40.25, "mbps": 940.4,
                                                    "age_s": 3.2}]},
                      {"node_id": "n2", "name": "two", "backend": "torch", "address": "a:2", "api": "",
                       "layers": [20, 30], "ready": False, "free_memory": 2**30, "coordinator": False,
                       "tokens_per_s": 0, "standby": False, "dtype": "bfloat16", "weight_format": "int4/g32",
                       "layer_ms": 0.823},
                      {"node_id": "n3", "name": "spare", "backend": "torch", "address": "a:3", "api": "",
                       "layers": None, "ready": True, "free_memory": 2**31, "coordinator": False,
                       "tokens_per_s": 0, "standby": True}],
            "stage_tokens_per_s": 12.5, "scheduler": {"running": 0, "waiting": 0}, "bytes_per_token_hop": 1152,
            "speed": {"predicted_tokens_per_s": 20.0, "measured_tokens_per_s": 15.5, "limit": "the link to two"}}
    up = {"on": True}

    def handle(route):
        path = route.request.url.split("together.test", 1)[1].split("?")[0]
        if path == "/":
            route.fulfill(path=str(WEB / "index.html"))
        elif path.startswith("/static/"):
            route.fulfill(path=str(WEB / path[len("/static/"):]))
        elif path == "/v1/models":
            route.fulfill(json={"object": "list", "data": [{"id": "/m/smollm2.gguf"}, {"id": "other"}]})
        elif path == "/v1/mesh" and up["on"]:
            route.fulfill(json=mesh)
        else:
            route.abort()

    page.route("http://together.test/**", handle)
    page.goto("http://together.test/")
    page.wait_for_selector("#ring .peer[data-name='<b>x</b>']")
    assert page.locator("#ring b:text-is('x')").count() == 0  # the name is text, not markup
    assert page.eval_on_selector_all("#ring > *", "els => els.map(e => e.className)") == [
        "arrow in", "peer", "arrow", "gap", "arrow", "peer", "arrow back"]
    # today's token path: ids from the API peer to stage 0, straight back from the last stage to it
    assert "token ids from the API peer (<b>x</b>)" in page.text_content("#ring .arrow.in")
    assert "back to the API peer (<b>x</b>), not to stage 0" in page.text_content("#ring .arrow.back")
    assert page.text_content(".peer[data-name='<b>x</b>'] .speed") == "speed 12.5 tok/s"
    assert page.text_content("#ring .gap") == "layers [10, 20) missing"
    assert page.get_attribute(".peer[data-name=two]", "data-state") == "loading"
    assert "3.00 GiB" in page.text_content(".peer[data-name='<b>x</b>']")
    # what each peer runs and its measured time per layer; a peer that has not said shows neither
    assert page.text_content(".peer[data-name=two] .runs") == "runs bfloat16 · int4/g32"
    assert page.text_content(".peer[data-name=two] .layer-ms") == "layer 0.82 ms"
    assert page.text_content(".peer[data-name='<b>x</b>'] .runs") == "runs float32 · float32"
    assert page.locator(".peer[data-name=spare] .runs").count() == 0
    assert page.get_attribute("#standby .peer", "data-name") == "spare"
    assert page.eval_on_selector_all("#links tbody tr", "rs => rs.map(r => [...r.cells].map(c => c.textContent))") == [
        ["<b>x</b>", "two", "40.25 ms", "940 Mbit/s", "3 s ago"]]
    assert page.text_content("#ring-speed") == "predicted 20.0 tok/s · measured 15.5 tok/s (limit: the link to two)"
    assert "no peer holds layers [10, 20)" in page.text_content("#banner")
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["/m/smollm2.gguf", "other"]
    assert page.is_enabled("#model")
    page.screenshot(path=SCREENSHOT.replace(".png", "-gap.png"))
    up["on"] = False
    page.wait_for_selector("#health[data-state=down]", timeout=5_000)
    assert "does not answer" in page.text_content("#banner")
    assert page.page_errors == []
