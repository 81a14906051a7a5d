"""The OpenAI-compatible HTTP API of a peer (aiohttp)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST

from apps.chat import ChatRequest, start_chat
from apps.openai_responses import ChatOutput, Output, collect, stream
from apps.openai_schema import ChatBody, CompletionBody, InvalidRequest, parse
from apps.routing import Router, client_ctx, ring_items, rings_view
from backends.errors import RequestError
from backends.sampling import SamplingParams
from mesh.node import Node
from mesh.scheduler import QueueFull, Request, RingUnavailable, Scheduler, TooLarge
from protos import together_pb2 as pb

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
WEB_DIR = Path(__file__).resolve().parent / "web"
NODE = web.AppKey("node", Node)
AUTHORIZED = "together.authorized"  # request key: the caller sent the right API key (or none is set)
SCHED = web.AppKey("scheduler", Scheduler)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.type, self.code = status, param, type_, code


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "param": param,
                                        "code": code}}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, str(e), e.type, e.param, e.code)
    except InvalidRequest as e:
        return error_response(400, str(e), param=e.param, code=e.code)
    except RequestError as e:
        return error_response(400, str(e))
    except RingUnavailable as e:
        return error_response(503, str(e), "service_unavailable")
    except web.HTTPException as e:
        if e.status >= 400:
            return error_response(e.status, e.reason or "error", "invalid_request_error")
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:  # a bug still answers in the OpenAI shape, and is logged
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(500, "internal error (logged on the peer)", "server_error")


async def index(request: web.Request) -> web.FileResponse:
    """The web page: chat and live node status, no build step."""
    return web.FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def health(request: web.Request) -> web.Response:
    """Liveness for anyone; the ring (names, addresses) only with the API key, when one is set."""
    node = request.app[NODE]
    plan = node.plan
    body: dict[str, Any] = {"status": "ok" if plan.complete else "incomplete", "epoch": plan.epoch}
    if request.get(AUTHORIZED, True):
        body.update(ring=ring_view(node), missing=plan.missing)
    return web.json_response(body, status=200 if plan.complete else 503)


def ring_view(node: Node) -> list[dict[str, Any]]:
    return ring_items(node.plan, node.known)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(q * len(ys)))]


def _missing_ranges(node: Node) -> list[list[int]]:
    from mesh.placement import free_ranges

    return [list(r) for r in free_ranges(node.num_layers, [(s.start, s.end) for s in node.plan.stages])]


async def mesh_view(request: web.Request) -> web.Response:
    """Peers, layers, backends, memory and recent speed of the ring, as this peer sees it."""
    node, sched = request.app[NODE], request.app[SCHED]
    stages = {s.node_id: s for s in node.plan.stages}
    peers = []
    for p in node.plan.peers:
        if p.model and p.model != node.cfg.model:
            continue  # the coordinator, of another model's ring: listed under `rings`
        st = stages.get(p.node_id)
        peers.append({"node_id": p.node_id, "name": p.name, "backend": p.backend, "address": p.address,
                      "api": p.api, "layers": [st.start, st.end] if st else None,
                      "held": [p.start, p.end] if p.start >= 0 else None,
                      "ready": bool(p.ready and st and (p.start, p.end) == (st.start, st.end)),
                      "free_memory": p.free_memory, "coordinator": p.node_id == node.plan.coordinator,
                      "tokens_per_s": round(p.tokens_per_s, 2), "dtype": p.dtype,
                      "weight_format": p.weight_format, "layer_ms": round(p.layer_ms, 3),
                      "adapters": [a for a in p.adapters.split(",") if a], "tp_group": p.tp_group,
                      "standby": st is None, "weights": p.weights, "training": p.training,
                      "links": links_view(node, p)})
    hop = sched.hop_overhead_ms
    return web.json_response({
        "model": node.cfg.model, "epoch": node.plan.epoch, "complete": node.plan.complete,
        "missing": node.plan.missing, "num_layers": node.num_layers, "self": node.node_id,
        "missing_ranges": _missing_ranges(node),
        "ring": ring_view(node), "peers": peers, "adapters": node.ring_adapters(),
        # several models in one mesh: every ring (this peer's first), see apps/routing.py
        "rings": rings_view(node.plan, node.known, node.ring_adapters()),
        "stage_tokens_per_s": node.stage_tokens_per_s(),
        "scheduler": {"running": len(sched.running), "waiting": len(sched.waiting), **sched.stats,
                      "step_ms_p50": _pct(sched.step_ms, 0.5),
                      "hop_overhead_ms_p50": _pct(hop, 0.5), "hop_overhead_ms_p90": _pct(hop, 0.9),
                      "hop_samples": len(hop),
                      "speculation": sched.drafting.view() if sched.drafting else {"draft": "off"}},
        "bytes_per_token_hop": node.bytes_per_token_hop, "speed": speed_view(node, sched),
        # this peer's stage's prefix cache, and what this API peer believes the ring's stages hold
        "prefix_cache": {**(node.shard.prefix_stats() if node.shard else {}),
                         **(sched.prefixes.stats() if sched.prefixes is not None else {"keys": 0})},
    })


def links_view(node: Node, p: pb.PeerInfo) -> list[dict[str, Any]]:
    """A peer's measured links (mesh/linkprobe.py): to whom, round trip, throughput, age."""
    names = {q.node_id: q.name for q in node.plan.peers}
    now = time.time()
    return [{"to": ln.node_id, "to_name": names.get(ln.node_id, ln.node_id[:8]), "rtt_ms": round(ln.rtt_ms, 3),
             "mbps": round(ln.mbps, 1), "age_s": round(max(0.0, now - ln.measured_at), 1)}
            for ln in sorted(p.links, key=lambda ln: names.get(ln.node_id, ln.node_id))]


def speed_view(node: Node, sched: Scheduler) -> dict[str, Any]:
    """The plan's predicted decode tokens/s (null until the coordinator predicts one) next to the measured
    one: one stream's decode, 1000 / the median wall time of this API peer's recent one-token frames
    alone in the ring (null before any)."""
    plan, recent = node.plan, sched.decode_ms[-16:]
    predicted, prefill = plan.predicted_tokens_per_s, plan.predicted_prefill_tokens_per_s
    step = _pct(recent, 0.5)
    return {"predicted_tokens_per_s": round(predicted, 2) if predicted > 0 else None,
            "predicted_prefill_tokens_per_s": round(prefill, 2) if prefill > 0 else None,
            "limit": plan.limit,
            "measured_tokens_per_s": round(1000 / step, 2) if step else None, "measured_steps": len(recent),
            "measured": "one stream's decode: 1000 / median wall ms of the last one-token frames alone in the ring"}


async def models(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return web.json_response({"object": "list", "data": [
        {"id": m, "object": "model", "created": int(node.started_at), "owned_by": "together", "ring": ring}
        for m, ring in _listed(node)]})


def _listed(node: Node) -> list[tuple[str, dict[str, Any]]]:
    """(model id, its ring) for this peer's model (even while its ring is incomplete: requests then say
    why) and every other ring of the mesh that is complete, each followed by its adapters' MODEL+ADAPTER."""
    out = []
    for r in rings_view(node.plan, node.known, node.ring_adapters()):
        if r["complete"] or r["self"]:
            ring = {"complete": r["complete"], "peers": len({s["node_id"] for s in r["ring"]})}
            out += [(m, ring) for m in [r["model"], *(f"{r['model']}+{a}" for a in r["adapters"])]]
    return out


def served_models(node: Node) -> list[str]:
    """Every model of the mesh's complete rings (this peer's first), then MODEL+ADAPTER for each adapter
    every stage of that ring has loaded."""
    return [m for m, _ in _listed(node)]


async def _json_body(request: web.Request) -> dict[str, Any]:
    ctype = request.content_type
    if ctype not in ("application/json", "", "application/octet-stream", "text/plain"):
        raise ApiError(415, f"send the body as application/json, not {ctype}")
    try:
        raw = await request.read()
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:  # JSON may escape lone surrogates (\\ud800); the tokenizer cannot take them
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "the request body contains a lone UTF-16 surrogate (not valid Unicode)") from None
    return body


def _adapter(node: Node, model: str) -> str:
    """The adapter a request's `model` names ('' for the base model); another ring's model reaches no
    handler (apps/routing.py passes it on), so only this ring's are served here."""
    if model not in served_models(node) or model.partition("+")[0] != node.cfg.model:
        base, plus, name = model.partition("+")
        if plus and base == node.cfg.model and name in node.adapter_names():
            raise RingUnavailable(f"adapter {name!r} is not loaded on every stage of the ring yet "
                                  f"(start each peer with --adapter)")
        raise ApiError(404, f"the model '{model}' does not exist here; GET /v1/models lists them "
                            f"({', '.join(served_models(node))})", "model", code="model_not_found")
    return model.partition("+")[2]


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """A translation over apps/chat.py's start_chat (tools, response_format, n, logprobs, usage)."""
    body = parse(ChatBody, await _json_body(request))
    run = await start_chat(request.app, ChatRequest(
        model=body.model, messages=[m.for_template() for m in body.messages], sampling=body.sampling(),
        tools=body.tools, tool_choice=body.tool_choice, response_format=body.response_format, n=body.n,
        draft=body.draft))
    out = ChatOutput(run, request.app[SCHED].tok, body.model)
    try:
        if not body.stream:
            return web.json_response(await out.final())
        return await out.stream(request, body.include_usage)
    finally:
        run.cancel()


async def completions(request: web.Request) -> web.StreamResponse:
    body = parse(CompletionBody, await _json_body(request))
    adapter = _adapter(request.app[NODE], body.model)
    prompts = await asyncio.to_thread(body.token_prompts, request.app[SCHED].tok.encode)
    if len(prompts) * body.n > 64:
        raise ApiError(400, "at most 64 completions per request (prompts x n)", "n")
    vocab = request.app[NODE].ck.config.vocab_size
    if any(t < 0 or t >= vocab for pr in prompts for t in pr):
        raise ApiError(400, f"token ids must be in [0, {vocab})", "prompt")
    return await _serve(request, body, adapter, prompts)


def _context_check(node: Node, prompts: list[list[int]]) -> None:
    ctx = node.ck.config.max_position_embeddings
    for pr in prompts:
        if not pr:
            raise ApiError(400, "the prompt is empty", "prompt")
        if len(pr) >= ctx:
            raise ApiError(400, f"the prompt is {len(pr)} tokens but the model's context is {ctx} "
                                f"tokens; shorten it", "messages", code="context_length_exceeded")


def _submit(sched: Scheduler, prompts: list[list[int]], params: SamplingParams, n: int,
            adapter: str, draft: bool = True) -> list[Request]:
    reqs = []
    try:
        for pr in prompts:
            for i in range(n):
                p = params if params.seed is None or i == 0 else \
                    SamplingParams.from_dict({**params.to_dict(), "seed": (params.seed + i + 2**63) % 2**64 - 2**63})
                reqs.append(sched.submit(pr, p, adapter, draft=draft))
    except RequestError as e:
        for r in reqs:
            sched.cancel(r)
        if isinstance(e, QueueFull):
            raise ApiError(429, str(e), type_="rate_limit_error", code="queue_full") from None
        if isinstance(e, TooLarge):
            raise ApiError(413, str(e), "max_tokens", code="kv_memory_exceeded") from None
        raise
    return reqs


async def _serve(request: web.Request, body: ChatBody | CompletionBody, adapter: str,
                 prompts: list[list[int]]) -> web.StreamResponse:
    node, sched = request.app[NODE], request.app[SCHED]
    _context_check(node, prompts)
    if not node.plan.complete:
        raise RingUnavailable(f"the ring is incomplete: {node.plan.missing}")
    params = body.sampling()
    if body.response_format is not None:  # structured output on plain completions too
        from backends import constrain

        try:
            grammar = constrain.response_format_grammar(body.response_format)
            if grammar:
                await asyncio.to_thread(constrain.check_grammar, grammar, sched.tok)
        except constrain.GrammarError as e:
            raise InvalidRequest(f"response_format: {e}", "response_format") from None
        params.grammar = grammar
    reqs = _submit(sched, prompts, params, body.n, adapter, body.draft)
    out = Output(isinstance(body, ChatBody), reqs, sched.tok, body.model)
    try:
        if not body.stream:
            await asyncio.gather(*(collect(r) for r in reqs))
            return web.json_response(out.final())
        return await stream(request, out, body.include_usage)
    finally:
        for r in reqs:
            if not r.gen.finished:
                sched.cancel(r)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format: this peer's registry (counters and histograms from the scheduler and
    the stage, gauges read at scrape time)."""
    return web.Response(body=request.app[NODE].metrics.render(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST, "X-Content-Type-Options": "nosniff"})


def _gauges(node: Node, sched: Scheduler) -> None:
    def stage_sequences() -> float:
        return node.shard.num_sequences if node.shard else 0

    def stage_kv_bytes() -> float:
        return node.shard.cache_nbytes() if node.shard else 0

    g = node.metrics.gauge
    g("queue_depth", "Requests waiting for admission.", lambda: len(sched.waiting))
    g("running_sequences", "Sequences in the running batch.", lambda: len(sched.running))
    g("kv_budget_tokens", "KV tokens the ring admits at once.", sched.kv_budget)
    g("ring_complete", "1 when every layer is served.", lambda: int(node.plan.complete))
    g("plan_epoch", "Current plan epoch.", lambda: node.plan.epoch)
    g("stage_sequences", "Sequences with a KV cache on this peer.", stage_sequences)
    g("stage_kv_cache_bytes", "Bytes of KV cache on this peer.", stage_kv_bytes)
    for key, what in (("bytes", "Bytes of KV this peer's prefix cache holds."),
                      ("blocks", "Blocks this peer's prefix cache holds."),
                      ("hits", "Blocks a sequence took from this peer's prefix cache."),
                      ("misses", "Blocks a sequence asked of this peer's prefix cache that it lacked."),
                      ("evictions", "Blocks this peer's prefix cache evicted (least recently used).")):
        g(f"prefix_cache_{key}", what, _prefix_stat(node, key))
    mirror = sched.prefixes
    if mirror is not None:
        g("prefix_cached_tokens", "Prompt tokens of this API peer's requests the stages took from their "
          "prefix caches instead of computing them.", lambda: mirror.cached_tokens)
        g("prefix_retries", "Starts a stage refused for a prefix it lacked, sent again whole.",
          lambda: mirror.retries)


def _prefix_stat(node: Node, key: str) -> Callable[[], float]:
    return lambda: node.shard.prefix_stats()[key] if node.shard else 0


def cors_middleware(origin: str) -> Middleware:
    """Preflights answered here; the headers themselves go on in `cors_headers`."""
    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return web.Response(status=204)
        return await handler(request)

    return cors


def cors_headers(origin: str) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """Set on response prepare, not after the handler: a stream's headers are sent before its
    handler returns."""
    async def add(request: web.Request, resp: web.StreamResponse) -> None:
        resp.headers["Access-Control-Allow-Origin"] = origin
        resp.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, x-api-key, anthropic-version"
        resp.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"

    return add


def bearer_middleware(api_key: str, open_resources: set[web.AbstractResource]) -> Middleware:
    """Every route needs the key but the page's own files (no data in them: the page asks for the
    key and sends it) and /health, which without it says only whether the ring is up."""
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        got = request.headers.get("Authorization", "")
        x_key = request.headers.get("x-api-key", "")  # where Anthropic's clients send the key
        request[AUTHORIZED] = hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()) or \
            hmac.compare_digest(x_key.encode(), api_key.encode())
        # decided by the route that will run, not by spelling the path: no encoding slips past
        if not request[AUTHORIZED] and request.match_info.route.resource not in open_resources:
            message = "missing or wrong API key: send 'Authorization: Bearer KEY' (or 'x-api-key: KEY')"
            if request.path.startswith("/v1/messages"):  # Anthropic's routes answer in its shape
                return web.json_response({"type": "error", "error": {"type": "authentication_error",
                                                                      "message": message}}, status=401)
            return error_response(401, message, "authentication_error", code="invalid_api_key")
        return await handler(request)

    return check


def make_app(node: Node, sched: Scheduler, api_key: str | None = None,
             cors_origin: str | None = None) -> web.Application:
    """The API app for one peer; the scheduler's background loop lives in cleanup_ctx.
    CORS is off unless an origin is given."""
    open_resources: set[web.AbstractResource] = set()
    # another ring's model: passed on to that ring's API peer, after the key check (apps/routing.py)
    router = Router(lambda: node.plan, lambda: node.api_address, lambda: served_models(node))
    mws = ([cors_middleware(cors_origin)] if cors_origin else []) + [errors_middleware] + \
        ([bearer_middleware(api_key, open_resources)] if api_key else []) + [router.middleware()]
    app = web.Application(middlewares=mws, client_max_size=8 * 1024 * 1024)
    app.cleanup_ctx.append(client_ctx)
    app[NODE], app[SCHED] = node, sched
    if cors_origin:
        app.on_response_prepare.append(cors_headers(cors_origin))
    _gauges(node, sched)
    node.view.on_ring_change.append(sched.decode_ms.clear)  # measured speed belongs to the ring it measured

    async def scheduler_ctx(app: web.Application) -> AsyncIterator[None]:
        await sched.start()
        yield
        await sched.stop()

    app.cleanup_ctx.append(scheduler_ctx)
    open_resources.update(r.resource for r in (app.router.add_get("/", index), app.router.add_get("/health", health))
                          if r.resource is not None)
    open_resources.add(app.router.add_static("/static/", WEB_DIR, show_index=False, follow_symlinks=False))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/mesh", mesh_view)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    from apps import anthropic_api, responses  # translations over apps/chat.py, which imports this module

    app.router.add_post("/v1/messages", anthropic_api.messages)
    app.router.add_post("/v1/messages/count_tokens", anthropic_api.count_tokens)
    app.router.add_post("/v1/responses", responses.responses)
    return app
