"""The web page in a real browser (headless Chromium, driven by playwright). On canned answers of the API:
Markdown answers rendered and sanitised, conversations that survive a reload, the model menu and one
block per ring (the page's real code on a real browser; only the peer is replaced by recorded JSON).
Then on a real mesh of two models (two peers, one ring each): the page shows both rings and its model
menu switches between them, the other model's answers passed on by this peer (apps/routing.py).
tests/apps/test_web.py drives the page against a real two-stage ring."""

from __future__ import annotations

import json
import os
import time

from pathlib import Path

import pytest

from mesh.local import LocalMesh, http_json
from tests.apps.test_web import ARGS, CHROMIUM, WEB, need_browser

pytestmark = pytest.mark.slow

# *.localhost is a secure context in Chromium: the page may use the clipboard API there
ORIGIN = "http://together.localhost"
A, B = "/m/smollm2.gguf", "/m/tiny-llama"

MARKDOWN = """Here is a list:

- one
- **two**

| name | value |
|------|-------|
| x    | 1     |

```python
print("hi")
```

<script>window.__pwned = (window.__pwned || 0) + 1</script>

Inline <img src="nope.png" onerror="window.__pwned = (window.__pwned || 0) + 1"> html.

[a link](javascript:window.__pwned=1) and [a good one](https://example.org/x)
"""


def _peer(node_id: str, name: str, start: int, end: int, api: str = "") -> dict:
    return {"node_id": node_id, "name": name, "backend": "torch", "address": f"h:{node_id}", "api": api,
            "layers": [start, end], "ready": True, "free_memory": 2**30, "coordinator": node_id == "a1",
            "tokens_per_s": 33.333, "standby": False, "links": []}


def _stage(node_id: str, name: str, start: int, end: int, ready: bool = True) -> dict:
    return {"node_id": node_id, "name": name, "backend": "torch", "address": f"h:{node_id}", "start": start,
            "end": end, "ready": ready}


MESH = {"model": A, "epoch": 3, "complete": True, "missing": "", "num_layers": 30, "self": "a1",
        "ring": [_stage("a1", "alpha", 0, 15), _stage("a2", "beta", 15, 30)],
        "peers": [_peer("a1", "alpha", 0, 15, api="h:9"), _peer("a2", "beta", 15, 30),
                  _peer("b1", "gamma", 0, 2, api="h:8"),
                  {**_peer("s1", "spare", 0, 0), "layers": None, "standby": True}],
        "scheduler": {"running": 0, "waiting": 0}, "speed": {},
        "rings": [{"model": B, "complete": False, "missing": "no peer holds layers [2, 4)", "epoch": 5,
                   "num_layers": 4, "ring": [_stage("b1", "gamma", 0, 2)], "api": ["http://h:8"],
                   "adapters": [], "self": False},
                  {"model": A, "complete": True, "missing": "", "epoch": 3, "num_layers": 30,
                   "ring": [_stage("a1", "alpha", 0, 15), _stage("a2", "beta", 15, 30)], "api": ["http://h:9"],
                   "adapters": ["sql"], "self": True}]}
MODELS = [A, f"{A}+sql", B]


def sse(text: str, model: str) -> str:
    """A chat-completions stream of `text`, a few characters per chunk, with usage and [DONE]."""
    parts = [text[i:i + 7] for i in range(0, len(text), 7)]
    chunks = [{"object": "chat.completion.chunk", "model": model,
               "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in parts]
    chunks.append({"object": "chat.completion.chunk", "model": model, "choices": [],
                   "usage": {"prompt_tokens": 5, "completion_tokens": len(parts), "total_tokens": 5 + len(parts)}})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


@pytest.fixture
def site():
    """A browser whose page talks to canned API answers; `sent` records the chat requests, `answer`
    is what the next chat request streams back."""
    need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            ctx = browser.new_context(viewport={"width": 1280, "height": 800})
            ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=ORIGIN)
            page = ctx.new_page()
            page.set_default_timeout(15_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            st = {"sent": [], "answer": "Paris.", "errors": errors, "page": page}

            def handle(route):
                req = route.request
                path = req.url.split(ORIGIN, 1)[1].split("?")[0]
                if path == "/":
                    route.fulfill(path=str(WEB / "index.html"))
                elif path.startswith("/static/"):
                    route.fulfill(path=str(WEB / path[len("/static/"):]))
                elif path == "/v1/models":
                    route.fulfill(json={"object": "list", "data": [{"id": m, "object": "model"} for m in MODELS]})
                elif path == "/v1/mesh":
                    route.fulfill(json=MESH)
                elif path == "/v1/chat/completions" and req.method == "POST":
                    body = json.loads(req.post_data)
                    st["sent"].append(body)
                    route.fulfill(body=sse(st["answer"], body["model"]), content_type="text/event-stream")
                else:
                    route.abort()

            ctx.route(f"{ORIGIN}/**", handle)
            yield st
        finally:
            browser.close()


def ask(page, text: str) -> None:
    n = page.locator("#messages .msg.assistant").count()
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_function(f"() => document.querySelectorAll('#messages .msg.assistant').length === {n + 1} && "
                           "!document.querySelector('#messages .streaming') && "
                           "!document.getElementById('send').disabled")


def test_markdown_answer_renders_as_sanitised_html(site):
    page = site["page"]
    page.goto(ORIGIN + "/")
    page.wait_for_selector("#model option", state="attached")
    site["answer"] = MARKDOWN
    ask(page, "Show me some Markdown")
    md = "#messages .msg.assistant .content"
    assert page.eval_on_selector(md, "c => c.dataset.text") == MARKDOWN
    assert page.eval_on_selector_all(f"{md} ul > li", "ls => ls.map(l => l.textContent)") == ["one", "two"]
    assert page.text_content(f"{md} li strong") == "two"
    assert page.eval_on_selector_all(f"{md} table th", "c => c.map(x => x.textContent)") == ["name", "value"]
    assert page.eval_on_selector_all(f"{md} table td", "c => c.map(x => x.textContent)") == ["x", "1"]
    assert page.text_content(f"{md} .code pre code.language-python") == 'print("hi")\n'
    # the model's raw HTML is shown as text; nothing of it became markup, nothing ran
    assert page.locator(f"{md} script, {md} img, #messages [onerror]").count() == 0
    text = page.text_content(md)
    assert "<script>window.__pwned" in text and '<img src="nope.png" onerror=' in text
    # a javascript: link loses its target (DOMPurify); a real link opens elsewhere, without an opener
    links = "as => as.map(a => [a.textContent, a.getAttribute('href'), a.rel])"
    assert page.eval_on_selector_all(f"{md} a", links) == [
        ["a link", None, ""], ["a good one", "https://example.org/x", "noopener noreferrer"]]
    page.click(f"{md} a:text-is('a link')")
    # the sanitiser on its own, on what marked passes through unescaped (an autolink, a link's title)
    html = page.evaluate("() => Markdown.toHtml('[x](javascript:alert(1) \"t\") <javascript:alert(1)>')")
    assert html.count("<a") == 2 and "href" not in html
    assert page.evaluate("() => window.__pwned") is None

    # the copy button puts the code on the clipboard
    page.click(f"{md} .code button.copy")
    page.wait_for_selector(f"{md} .code button.copy[data-copied=true]")
    assert page.evaluate("() => navigator.clipboard.readText()") == 'print("hi")\n'
    assert site["errors"] == []


def test_conversations_models_and_rings_survive_a_reload(site):
    page = site["page"]
    page.goto(ORIGIN + "/")
    # the menu: one group per ring's model, the adapter under its model, in /v1/models' order
    page.wait_for_selector("#model option", state="attached")
    assert page.eval_on_selector_all("#model optgroup", "gs => gs.map(g => [g.label, [...g.children].map("
                                     "o => o.value)])") == [["smollm2.gguf", [A, f"{A}+sql"]], ["tiny-llama", [B]]]
    assert page.input_value("#model") == A

    # one block per ring, this peer's first; the other ring's peer is not on standby
    page.wait_for_selector(f"#other-rings .ring-block[data-model='{B}']")
    assert page.eval_on_selector_all("#rings .ring-block", "bs => bs.map(b => [b.dataset.model, b.dataset.complete])") \
        == [[A, "true"], [B, "false"]]
    assert page.eval_on_selector_all("#ring .peer", "ps => ps.map(p => p.dataset.name)") == ["alpha", "beta"]
    other = f"#other-rings .ring-block[data-model='{B}']"
    assert page.eval_on_selector_all(f"{other} .peer", "ps => ps.map(p => p.dataset.name)") == ["gamma"]
    assert "no peer holds layers [2, 4)" in page.text_content(other)
    assert page.text_content(f"{other} .gap") == "layers [2, 4) missing"
    assert "back to the API peer (gamma), not to stage 0" in page.text_content(f"{other} .arrow.back")
    assert page.eval_on_selector_all("#standby .peer", "ps => ps.map(p => p.dataset.name)") == ["spare"]
    assert page.text_content("#ring .peer[data-name=alpha] .speed") == "speed 33.3 tok/s"

    ask(page, "What is the capital of France?")
    page.click("#new-chat")
    assert page.locator("#messages .msg").count() == 0
    page.select_option("#model", B)
    site["answer"] = "Second answer with `code`."
    ask(page, "Another question")
    assert site["sent"][-1]["model"] == B
    assert [m["role"] for m in site["sent"][-1]["messages"]] == ["user"]  # a new chat starts empty
    assert page.text_content("#messages .msg.assistant .role .model") == " · tiny-llama"

    page.reload()
    page.wait_for_selector("#messages .msg.assistant")
    # the current conversation, its rendered answer, both conversations listed, the chosen model
    assert page.eval_on_selector_all("#messages .msg .content", "cs => cs.map(c => c.textContent.trim())") == [
        "Another question", "Second answer with code."]
    assert page.text_content("#messages .msg.assistant code") == "code"
    assert page.eval_on_selector_all("#chats .chat .open", "bs => bs.map(b => b.textContent)") == [
        "Another question", "What is the capital of France?"]
    assert page.get_attribute("#chats .chat.current", "data-id") == page.get_attribute("#chats .chat", "data-id")
    page.wait_for_selector("#model option", state="attached")
    assert page.input_value("#model") == B

    # back to the first conversation: it goes on from where it was, with the chosen model
    page.click("#chats .chat:not(.current) .open")
    assert page.eval_on_selector_all("#messages .msg .content", "cs => cs.map(c => c.dataset.text ?? c.textContent)") \
        == ["What is the capital of France?", "Paris."]
    site["answer"] = "Lyon is second."
    ask(page, "And the second city?")
    assert [(m["role"], m["content"]) for m in site["sent"][-1]["messages"]] == [
        ("user", "What is the capital of France?"), ("assistant", "Paris."), ("user", "And the second city?")]
    assert site["sent"][-1]["model"] == B

    # deleting a conversation forgets it, across a reload too
    page.click("#chats .chat:not(.current) .delete")
    page.reload()
    page.wait_for_selector("#messages .msg.assistant")
    assert page.eval_on_selector_all("#chats .chat .open", "bs => bs.map(b => b.textContent)") == [
        "What is the capital of France?"]
    assert page.locator("#messages .msg").count() == 4
    assert site["errors"] == []


QUESTION = "What is the capital of France?"
OTHER = "other-135m"


@pytest.fixture(scope="module")
def two_models(embedded_path, tmp_path_factory):
    """One mesh, two rings of one peer each: the embedded model on `a` (whose API the page uses) and
    the same weights under a second name on `b`."""
    need_browser()
    other: Path = tmp_path_factory.mktemp("other") / f"{OTHER}.gguf"
    os.symlink(embedded_path, other)
    m = LocalMesh(str(embedded_path))
    common = ("--backend", "torch", "--dtype", "float32", "--no-mdns")
    try:
        a = m.add("a", *common, api=True)
        time.sleep(0.3)  # a is the oldest: it coordinates both rings
        b = m.add("b", *common, "--peer", a.address, "--model", str(other), api=True)
        m.wait_ready(a, timeout=120, stages=1)
        m.wait_ready(b, timeout=120, stages=1)
        deadline = time.time() + 60
        while time.time() < deadline:
            rings = http_json(f"{a.api}/v1/mesh")[1].get("rings", [])
            if len(rings) == 2 and all(r["complete"] for r in rings):
                break
            time.sleep(0.3)
        yield m
    finally:
        m.stop()


def test_the_page_shows_both_rings_and_switches_models(two_models):
    a, b = two_models.peers["a"], two_models.peers["b"]
    need_browser()
    from playwright.sync_api import sync_playwright

    def greedy(model: str) -> str:
        """The answer of the model's own ring, asked directly."""
        import urllib.request

        body = {"model": model, "temperature": 0, "max_tokens": 16, "messages": [{"role": "user", "content": QUESTION}]}
        api = b.api if model == OTHER else a.api
        req = urllib.request.Request(f"{api}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["choices"][0]["message"]["content"]

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            routed: list[tuple[str, str | None]] = []
            page.on("response", lambda r: routed.append((json.loads(r.request.post_data)["model"],
                                                         r.headers.get("x-together-routed-to")))
                    if r.url.endswith("/v1/chat/completions") else None)
            page.goto(a.api)
            # both rings, this peer's first, each with its peer, both complete
            page.wait_for_function("() => [...document.querySelectorAll('#rings .ring-block')]"
                                   ".filter(b => b.dataset.complete === 'true').length === 2")
            blocks = page.eval_on_selector_all("#rings .ring-block", "bs => bs.map(b => [b.dataset.model, "
                                               "[...b.querySelectorAll('.peer')].map(p => p.dataset.name)])")
            models = [m["id"] for m in http_json(f"{a.api}/v1/models")[1]["data"]]
            assert models[1] == OTHER and blocks == [[models[0], ["a"]], [OTHER, ["b"]]]
            assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == models
            back = page.text_content(f"#other-rings .ring-block[data-model='{OTHER}'] .arrow.back")
            assert "back to the API peer (b)" in back or f"back to the API peer ({b.api[7:]})" in back
            assert page.locator("#standby .peer").count() == 0

            # the menu switches models: each answer comes from its own ring, greedy as asked directly
            for k, v in {"temperature": 0, "top_p": 1, "top_k": 0, "max_tokens": 16}.items():
                page.fill(f"#{k}", str(v))
            for n, model in enumerate([OTHER, models[0]]):
                page.select_option("#model", model)
                page.click("#new-chat")
                ask(page, QUESTION)
                got = page.eval_on_selector("#messages .msg.assistant .content", "c => c.dataset.text")
                assert got and got == greedy(model)
                assert page.get_attribute("#messages .msg.assistant", "data-model") == model
            assert routed == [(OTHER, b.api.removeprefix("http://")), (models[0], None)]
            assert page.is_hidden("#error") and errors == []
            page.screenshot(path="/tmp/together-web-two-models.png")
        finally:
            browser.close()
