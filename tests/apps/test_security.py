"""The API's security posture on a live peer: bearer key on /v1/*, loopback-only sockets, CORS off
unless asked for, no file reads outside the web page's own files, no code-running endpoints."""

from __future__ import annotations

import http.client
import json

import pytest

from tests.mesh.cluster import Cluster

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
API_KEY = "s3cret"
ORIGIN = "http://example.test"


@pytest.fixture(scope="module")
def peers(embedded_path):
    """A one-peer ring that requires an API key, and a second one-peer ring (its own mesh) with CORS."""
    c = Cluster(str(embedded_path))
    try:
        locked = c.add("locked", "--backend", "torch", "--dtype", "float32", "--no-mdns", "--layers", "0-30",
                       "--api-key", API_KEY, api=True)
        cors = c.add("cors", "--backend", "torch", "--dtype", "float32", "--no-mdns", "--layers", "0-30",
                     "--cors-origin", ORIGIN, api=True, mesh=c.mesh + "-cors")
        c.wait_ready(locked, stages=1)
        c.wait_ready(cors, stages=1)
        yield c
    finally:
        c.stop()


def request(peer, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 60) -> tuple[int, dict, bytes]:
    """A raw request: the path goes on the wire exactly as given (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", peer.api_port, timeout=timeout)
    try:
        h = dict(headers or {})
        if body is not None:
            h.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def openai_error(raw: bytes) -> dict:
    body = json.loads(raw)
    assert set(body) == {"error"}, body
    e = body["error"]
    assert isinstance(e["message"], str) and e["message"] and isinstance(e["type"], str), e
    return e


CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                   "temperature": 0}).encode()


def test_v1_needs_the_bearer_key(peers):
    p = peers.peers["locked"]
    wrong = [None, "", "Bearer", "Bearer ", "Bearer wrong", f"Bearer {API_KEY}x", f"Bearer {API_KEY[:-1]}",
             f"Basic {API_KEY}", API_KEY, f"Bearer  {API_KEY}", f"Token {API_KEY}",
             "Bearer " + "A" * 4000]
    for auth in wrong:
        h = {} if auth is None else {"Authorization": auth}
        for method, path, body in (("GET", "/v1/models", None), ("GET", "/v1/mesh", None),
                                   ("POST", "/v1/chat/completions", CHAT), ("POST", "/v1/completions", b"{}"),
                                   ("POST", "/v1/nothing", b"{}")):
            code, _, raw = request(p, method, path, body, h)
            assert code == 401, (auth, path, code, raw[:200])
            e = openai_error(raw)
            assert e["type"] == "authentication_error" and e["code"] == "invalid_api_key", e
    # (a trailing space is not part of a header's value, RFC 9110 5.5: "Bearer s3cret " is the key)
    # spellings of the path that reach a /v1 route must not slip past the check
    for path in ("/%76%31/models", "/v1/./models", "/v1//models", "/v1/models/", "//v1/models", "/V1/models",
                 "/v1/models?x=1", "/v1/models#frag", "/v1%2fmodels"):
        code, _, raw = request(p, "GET", path)
        assert code in (401, 404), (path, code, raw[:200])
    ok = {"Authorization": f"Bearer {API_KEY}"}
    code, _, raw = request(p, "GET", "/v1/models", headers=ok)
    assert code == 200 and [m["id"] for m in json.loads(raw)["data"]] == [MODEL]
    code, _, raw = request(p, "POST", "/v1/chat/completions", CHAT, ok)
    assert code == 200 and json.loads(raw)["choices"][0]["message"]["content"]
    code, _, raw = request(p, "POST", "/v1/chat/completions", b"{not json", ok)
    assert code == 400 and openai_error(raw)


def test_what_is_reachable_without_the_key(peers):
    """Without the key: a bare /health (up or not: no peers, no addresses) and the page's own files
    (no data in them; the page asks for the key). Everything else, /metrics and /v1/mesh included, is 401."""
    p = peers.peers["locked"]
    code, _, raw = request(p, "GET", "/health")
    assert code == 200 and json.loads(raw).keys() == {"status", "epoch"} and json.loads(raw)["status"] == "ok"
    assert b"127.0.0.1" not in raw and b"locked" not in raw
    code, _, raw = request(p, "GET", "/health", headers={"Authorization": f"Bearer {API_KEY}"})
    assert code == 200 and [s["name"] for s in json.loads(raw)["ring"]] == ["locked"]
    for path in ("/", "/static/index.html", "/static/app.js", "/static/style.css"):
        code, _, raw = request(p, "GET", path)
        assert code == 200 and raw, path
    for path in ("/metrics", "/v1/mesh", "/v1/models", "/nothing", "/health/", "/health?x", "/static/../metrics",
                 "/%6detrics", "//metrics", "/metrics/"):
        code, _, raw = request(p, "GET", path)
        assert code == 401 or (code == 200 and path.startswith("/health")  # the same bare /health
                               and json.loads(raw).keys() == {"status", "epoch"}), (path, code, raw[:200])
    code, _, raw = request(p, "GET", "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert code == 200 and b"together_" in raw


def test_an_open_mesh_says_so(peers):
    for p in peers.peers.values():  # neither has a mesh key
        assert "this mesh is open to anyone on the network" in p.log(), p.log()[-2000:]


def _loopback(ip: str) -> bool:
    import ipaddress

    a = ipaddress.ip_address(ip)
    return a.is_loopback or bool(getattr(a, "ipv4_mapped", None) and a.ipv4_mapped.is_loopback)


def _listening(pid: int) -> list[tuple[str, int]]:
    import psutil

    return sorted((c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
                  if c.status == psutil.CONN_LISTEN)


def test_every_listening_socket_is_on_loopback(peers):
    for p in (peers.peers["locked"], peers.peers["cors"]):
        socks = _listening(p.proc.pid)
        ports = {port for _, port in socks}
        assert p.api_port in ports and p.port in ports, (socks, p.api_port, p.port)
        # gRPC listens dual-stack on ::ffff:127.0.0.1, still loopback; never 0.0.0.0, :: or a LAN address
        assert all(_loopback(ip) for ip, _ in socks), socks


def test_cors_is_off_by_default_and_on_only_for_the_given_origin(peers):
    locked, cors = peers.peers["locked"], peers.peers["cors"]
    preflight = {"Origin": "http://evil.test", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    ok = {"Authorization": f"Bearer {API_KEY}", "Origin": "http://evil.test"}
    for method, path, h, body in (("GET", "/v1/models", ok, None), ("GET", "/health", ok, None),
                                  ("POST", "/v1/chat/completions", ok, CHAT),
                                  ("OPTIONS", "/v1/chat/completions", preflight, None),
                                  ("OPTIONS", "/v1/models", preflight, None)):
        code, headers, _ = request(locked, method, path, body, h)
        assert not any(k.startswith("access-control-") for k in headers), (method, path, code, headers)
        if method == "OPTIONS":
            assert code >= 400, (path, code)  # no preflight success without CORS
    code, headers, _ = request(cors, "OPTIONS", "/v1/chat/completions", None, {**preflight, "Origin": ORIGIN})
    assert code in (200, 204) and headers.get("access-control-allow-origin") == ORIGIN, (code, headers)
    assert "POST" in headers.get("access-control-allow-methods", "")
    code, headers, raw = request(cors, "POST", "/v1/chat/completions", CHAT, {"Origin": ORIGIN})
    assert code == 200 and headers.get("access-control-allow-origin") == ORIGIN
    # a stream sends its headers before its handler returns: they must carry CORS too
    stream = json.dumps({**json.loads(CHAT), "stream": True}).encode()
    code, headers, raw = request(cors, "POST", "/v1/chat/completions", stream, {"Origin": ORIGIN})
    assert code == 200 and b"[DONE]" in raw and headers.get("access-control-allow-origin") == ORIGIN, headers
    code, headers, _ = request(cors, "GET", "/v1/models", None, {"Origin": "http://evil.test"})
    # one fixed origin, never a reflected or wildcard one
    assert headers.get("access-control-allow-origin") == ORIGIN
    assert headers.get("access-control-allow-credentials") is None


TRAVERSALS = [
    "/static/../../../../etc/passwd", "/static/../../../../../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/static/%2E%2E/%2E%2E/%2E%2E/%2E%2E/etc/passwd",
    "/static/..%2f..%2f..%2f..%2fetc%2fpasswd", "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/static/%252e%252e/%252e%252e/%252e%252e/etc/passwd", "/static/..%5c..%5c..%5c..%5cetc%5cpasswd",
    "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/static/etc/passwd", "//etc/passwd", "/../../etc/passwd",
    "/etc/passwd", "/static/....//....//....//etc/passwd", "/static/..;/..;/..;/etc/passwd",
    "/static/%c0%ae%c0%ae/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd", "/static/index.html%00.css",
    "/static/../api.py", "/static/%2e%2e/api.py", "/static/..%2fapi.py", "/static/../../mesh/auth.py",
    "/static/../../pyproject.toml", "/static/%2e%2e/%2e%2e/pyproject.toml", "/static/", "/static/.",
    "/static/%2e", "/static/../", "/static/../__init__.py", "/static/../web/../api.py",
    "/static/" + "../" * 64 + "proc/self/environ", "/static/../../../../proc/self/cmdline",
]


def test_no_endpoint_reads_files_outside_the_web_page(peers):
    p = peers.peers["locked"]
    secrets = [b"root:", b"def make_app", b"import ", b"[project]", b"PYTHONPATH", b"--api-key"]
    for path in TRAVERSALS:
        code, _, raw = request(p, "GET", path)
        assert code in (400, 401, 403, 404), (path, code, raw[:200])
        assert not any(s in raw for s in secrets), (path, raw[:200])
    code, _, raw = request(p, "GET", "/static/index.html")
    assert code == 200 and b"<html" in raw.lower()  # the page's own files are served


def test_no_endpoint_runs_code_or_takes_other_methods(peers):
    p = peers.peers["locked"]
    ok = {"Authorization": f"Bearer {API_KEY}"}
    payload = json.dumps({"code": "import os; os.system('touch /tmp/pwned')", "cmd": "id"}).encode()
    for path in ("/exec", "/eval", "/run", "/v1/exec", "/v1/eval", "/v1/run", "/v1/code", "/admin", "/debug",
                 "/v1/lora", "/v1/adapters", "/v1/files", "/v1/fine_tuning/jobs", "/v1/shutdown", "/shutdown",
                 "/v1/mesh", "/v1/models", "/health", "/metrics", "/static/index.html", "/"):
        code, _, raw = request(p, "POST", path, payload, ok)
        assert code in (404, 405), (path, code, raw[:200])
    for method in ("PUT", "DELETE", "PATCH", "TRACE"):
        code, _, _ = request(p, method, "/v1/chat/completions", CHAT, ok)
        assert code in (404, 405), (method, code)


def test_the_page_works_behind_the_api_key(peers):
    """The page's own files load without the key; it shows that the mesh needs one; once the key is
    typed in its field it reads the ring and the models and answers, sending the key as a bearer header."""
    from tests.apps.test_web import ARGS, CHROMIUM, LAST_ANSWER, need_browser, wait_idle

    need_browser()
    from playwright.sync_api import sync_playwright

    p = peers.peers["locked"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            auth: list[str | None] = []
            page.on("request", lambda r: auth.append(r.headers.get("authorization"))
                    if "/v1/" in r.url else None)
            page.goto(f"http://127.0.0.1:{p.api_port}/")
            page.wait_for_selector("#banner:not([hidden])")
            assert "API key" in page.text_content("#banner")
            page.fill("#api_key", API_KEY)
            page.dispatch_event("#api_key", "change")
            page.wait_for_selector("#ring .peer[data-name=locked][data-state=ready]")
            page.wait_for_function("() => document.querySelector('#model').value !== ''")
            page.fill("#prompt", "Hi")
            page.click("#send")
            page.wait_for_selector("#messages .msg.assistant")
            wait_idle(page)
            assert page.evaluate(LAST_ANSWER)
            assert f"Bearer {API_KEY}" in auth and None in auth  # first without, then with the key
        finally:
            browser.close()
