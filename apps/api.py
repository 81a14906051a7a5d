"""The OpenAI-compatible HTTP API of a peer (aiohttp)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from backends.errors import RequestError
from backends.generation import Delta
from backends.sampling import SamplingParams
from mesh.node import Node
from mesh.scheduler import Request, RingUnavailable, Scheduler

WEB_DIR = Path(__file__).resolve().parent / "web"
NODE = web.AppKey("node", Node)
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
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, str(e), e.type, e.param, e.code)
    except RequestError as e:
        return error_response(400, str(e))
    except RingUnavailable as e:
        return error_response(503, str(e), "service_unavailable")
    except web.HTTPException as e:
        if e.status >= 400:
            return error_response(e.status, e.reason or "error", "invalid_request_error")
        raise


async def index(request: web.Request) -> web.FileResponse:
    """The web page: chat and live node status, no build step."""
    return web.FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def health(request: web.Request) -> web.Response:
    node = request.app[NODE]
    plan = node.plan
    body = {"status": "ok" if plan.complete else "incomplete", "epoch": plan.epoch,
            "ring": ring_view(node), "missing": plan.missing}
    return web.json_response(body, status=200 if plan.complete else 503)


def ring_view(node: Node) -> list[dict[str, Any]]:
    peers = {p.node_id: p for p in node.plan.peers}
    out = []
    for st in node.plan.stages:
        p = peers.get(st.node_id) or node.known.get(st.node_id)
        out.append({"node_id": st.node_id, "name": p.name if p else "?", "backend": p.backend if p else "?",
                    "address": p.address if p else "", "start": st.start, "end": st.end,
                    "ready": bool(p and p.ready)})
    return out


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(q * len(ys)))]


async def mesh_view(request: web.Request) -> web.Response:
    """Peers, layers, backends, memory and recent speed of the ring, as this peer sees it."""
    node, sched = request.app[NODE], request.app[SCHED]
    stages = {s.node_id: s for s in node.plan.stages}
    peers = []
    for p in node.plan.peers:
        st = stages.get(p.node_id)
        peers.append({"node_id": p.node_id, "name": p.name, "backend": p.backend, "address": p.address,
                      "api": p.api, "layers": [st.start, st.end] if st else None, "ready": p.ready,
                      "free_memory": p.free_memory, "coordinator": p.node_id == node.plan.coordinator,
                      "tokens_per_s": round(p.tokens_per_s, 2),
                      "standby": st is None})
    hop = sched.hop_overhead_ms
    return web.json_response({
        "model": node.cfg.model, "epoch": node.plan.epoch, "complete": node.plan.complete,
        "missing": node.plan.missing, "num_layers": node.num_layers, "self": node.node_id,
        "ring": ring_view(node), "peers": peers,
        "stage_tokens_per_s": node.stage_tokens_per_s(),
        "scheduler": {"running": len(sched.running), "waiting": len(sched.waiting), **sched.stats,
                      "step_ms_p50": _pct(sched.step_ms, 0.5),
                      "hop_overhead_ms_p50": _pct(hop, 0.5), "hop_overhead_ms_p90": _pct(hop, 0.9),
                      "hop_samples": len(hop)},
        "bytes_per_token_hop": node.bytes_per_token_hop,
    })


async def models(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return web.json_response({"object": "list", "data": [
        {"id": node.cfg.model, "object": "model", "created": int(node.started_at), "owned_by": "together"}]})


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _num(body: dict, key: str, kind: type, default, lo=None, hi=None):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
        raise ApiError(400, f"'{key}' must be {'a number' if kind is float else 'an integer'}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ApiError(400, f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return kind(v)


def sampling_from(body: dict) -> SamplingParams:
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return SamplingParams(
        temperature=_num(body, "temperature", float, 1.0, 0, 2),
        top_p=_num(body, "top_p", float, 1.0, 0, 1) or 1.0,
        top_k=_num(body, "top_k", int, 0, 0, None),
        min_p=_num(body, "min_p", float, 0.0, 0, 0.999),
        repetition_penalty=_num(body, "repetition_penalty", float, 1.0, 0.01, 10),
        presence_penalty=_num(body, "presence_penalty", float, 0.0, -2, 2),
        frequency_penalty=_num(body, "frequency_penalty", float, 0.0, -2, 2),
        seed=_num(body, "seed", int, None, None, None),
        max_tokens=_num({"m": max_tokens}, "m", int, 256, 1, None) if max_tokens is not None else 256,
        stop=[s for s in stop if s],
        ignore_eos=bool(body.get("ignore_eos", False)),  # vLLM's extension, for benchmarks
    )


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", "messages")
        c = m.get("content")
        if isinstance(c, list):
            parts = []
            for p in c:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise ApiError(400, f"messages[{i}]: only text content parts are supported",
                                   "messages")
                parts.append(p["text"])
            c = "".join(parts)
        if not isinstance(c, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": c})
    return out


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    node, sched = request.app[NODE], request.app[SCHED]
    _check_model(node, body)
    params = sampling_from(body)
    prompt = sched.tok.apply_chat(_messages(body))
    return await _serve(request, body, prompt, params, chat=True)


def _check_model(node: Node, body: dict) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required", "model")
    if model != node.cfg.model:
        raise ApiError(404, f"the model '{model}' does not exist here; GET /v1/models lists them",
                       "model", code="model_not_found")


async def _serve(request: web.Request, body: dict, prompt: list[int], params: SamplingParams,
                 chat: bool) -> web.StreamResponse:
    node, sched = request.app[NODE], request.app[SCHED]
    if not node.plan.complete:
        raise RingUnavailable(f"the ring is incomplete: {node.plan.missing}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream")
    req = sched.submit(prompt, params)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    model = node.cfg.model
    obj = "chat.completion" if chat else "text_completion"
    try:
        if not stream:
            text = await _collect(req)
            g = req.gen
            choice = {"index": 0, "finish_reason": g.finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            return web.json_response({"id": rid, "object": obj, "created": created, "model": model,
                                      "choices": [choice], "usage": _usage(g)})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        async def send(choice: dict, **extra) -> None:
            payload = {"id": rid, "object": chunk_obj, "created": created, "model": model,
                       "choices": [choice], **extra}
            await resp.write(f"data: {json.dumps(payload)}\n\n".encode())

        if chat:
            await send({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        while True:
            item = await req.queue.get()
            if item is None:
                break
            if isinstance(item, Exception):
                await resp.write(f"data: {json.dumps({'error': {'message': str(item), 'type': 'server_error'}})}\n\n".encode())
                break
            if item.text:
                await send({"index": 0, "delta": {"content": item.text}, "finish_reason": None} if chat
                           else {"index": 0, "text": item.text, "finish_reason": None})
        g = req.gen
        if g.finished:
            await send({"index": 0, "delta": {}, "finish_reason": g.finish_reason} if chat
                       else {"index": 0, "text": "", "finish_reason": g.finish_reason})
            so = body.get("stream_options") or {}
            if isinstance(so, dict) and so.get("include_usage"):
                payload = {"id": rid, "object": chunk_obj, "created": created, "model": model,
                           "choices": [], "usage": _usage(g)}
                await resp.write(f"data: {json.dumps(payload)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    except (asyncio.CancelledError, ConnectionResetError):
        sched.cancel(req)
        raise
    finally:
        if not req.gen.finished:
            sched.cancel(req)


async def _collect(req: Request) -> str:
    parts = []
    while True:
        item = await req.queue.get()
        if item is None:
            return "".join(parts)
        if isinstance(item, Exception):
            raise item
        parts.append(item.text)


def _usage(g) -> dict:
    return {"prompt_tokens": len(g.prompt), "completion_tokens": len(g.tokens),
            "total_tokens": len(g.prompt) + len(g.tokens)}


def bearer_middleware(api_key: str):
    import hmac

    @web.middleware
    async def check(request: web.Request, handler):
        if request.path.startswith("/v1/"):
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                return error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                      "authentication_error", code="invalid_api_key")
        return await handler(request)

    return check


def make_app(node: Node, sched: Scheduler, api_key: str | None = None) -> web.Application:
    """The API app for one peer; the scheduler's background loop lives in cleanup_ctx."""
    mws = [errors_middleware] + ([bearer_middleware(api_key)] if api_key else [])
    app = web.Application(middlewares=mws, client_max_size=8 * 1024 * 1024)
    app[NODE], app[SCHED] = node, sched

    async def scheduler_ctx(app: web.Application):
        await sched.start()
        yield
        await sched.stop()

    app.cleanup_ctx.append(scheduler_ctx)
    app.router.add_get("/", index)
    app.router.add_static("/static/", WEB_DIR, show_index=False, follow_symlinks=False)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/mesh", mesh_view)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app
