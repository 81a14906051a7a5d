"""The OpenAI-compatible HTTP API of a peer (aiohttp)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from backends.errors import RequestError
from backends.generation import Delta
from backends.sampling import SamplingParams
from mesh.node import Node
from mesh.scheduler import QueueFull, Request, RingUnavailable, Scheduler, TooLarge

log = logging.getLogger(__name__)
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
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:  # a bug still answers in the OpenAI shape, and is logged
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(500, "internal error (logged on the peer)", "server_error")


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
                    # ready only once it holds exactly the assigned range (not while reloading)
                    "ready": bool(p and p.ready and (p.start, p.end) == (st.start, st.end)),
                    # a tensor-parallel stage: its peers in rank order (the leader first)
                    "tp_members": [getattr(peers.get(n) or node.known.get(n), "name", "?")
                                   for n in st.tp_members]})
    return out


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
        st = stages.get(p.node_id)
        peers.append({"node_id": p.node_id, "name": p.name, "backend": p.backend, "address": p.address,
                      "api": p.api, "layers": [st.start, st.end] if st else None,
                      "held": [p.start, p.end] if p.start >= 0 else None,
                      "ready": bool(p.ready and st and (p.start, p.end) == (st.start, st.end)),
                      "free_memory": p.free_memory, "coordinator": p.node_id == node.plan.coordinator,
                      "tokens_per_s": round(p.tokens_per_s, 2),
                      "adapters": [a for a in p.adapters.split(",") if a], "tp_group": p.tp_group,
                      "standby": st is None})
    hop = sched.hop_overhead_ms
    return web.json_response({
        "model": node.cfg.model, "epoch": node.plan.epoch, "complete": node.plan.complete,
        "missing": node.plan.missing, "num_layers": node.num_layers, "self": node.node_id,
        "missing_ranges": _missing_ranges(node),
        "ring": ring_view(node), "peers": peers, "adapters": node.ring_adapters(),
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
        {"id": m, "object": "model", "created": int(node.started_at), "owned_by": "together"}
        for m in served_models(node)]})


def served_models(node: Node) -> list[str]:
    """The base model, then MODEL+ADAPTER for each adapter every stage of the ring has loaded."""
    return [node.cfg.model] + [f"{node.cfg.model}+{a}" for a in node.ring_adapters()]


async def _json_body(request: web.Request) -> dict:
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


def _num(body: dict, key: str, kind: type, default, lo=None, hi=None):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
        raise ApiError(400, f"'{key}' must be {'a number' if kind is float else 'an integer'}", key)
    if v != v or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ApiError(400, f"'{key}' must be {rng}, got {v}", key)
    return kind(v)


# Fields a sampling server cannot honour: refused, never silently ignored.
UNSUPPORTED = {
    "tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
    "function_call": "function calling", "parallel_tool_calls": "tool calling", "audio": "audio output",
    "modalities": "non-text modalities", "prediction": "predicted outputs", "logit_bias": "logit_bias",
    "response_format": "structured output (response_format)", "web_search_options": "web search",
    "suffix": "suffix (fill-in-the-middle)", "best_of": "best_of", "echo": "echo",
}
KNOWN = {"model", "messages", "prompt", "stream", "stream_options", "max_tokens", "max_completion_tokens",
         "temperature", "top_p", "top_k", "min_p", "seed", "stop", "n", "presence_penalty",
         "frequency_penalty", "repetition_penalty", "logprobs", "top_logprobs", "user", "ignore_eos",
         "metadata", "store", "service_level", "service_tier", "reasoning_effort"}


def _refuse_unsupported(body: dict) -> None:
    for k, what in UNSUPPORTED.items():
        v = body.get(k)
        if v is None or v is False or v == [] or (k == "best_of" and v == 1) or \
                (k == "response_format" and isinstance(v, dict) and v.get("type") == "text"):
            continue
        raise ApiError(400, f"'{k}' is not supported: this server does not do {what}", k,
                       code="unsupported_parameter")
    unknown = sorted(set(body) - KNOWN - set(UNSUPPORTED))
    if unknown:
        raise ApiError(400, f"unknown parameter '{unknown[0]}'", unknown[0], code="unknown_parameter")


def sampling_from(body: dict, chat: bool) -> SamplingParams:
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(x, str) for x in stop)) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    if body.get("max_completion_tokens") is not None:
        max_tokens = _num(body, "max_completion_tokens", int, 256, 1, None)
    else:
        max_tokens = _num(body, "max_tokens", int, 256 if chat else 16, 1, None)
    if chat:
        lp = body.get("logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise ApiError(400, "'logprobs' must be a boolean", "logprobs")
        top = _num(body, "top_logprobs", int, None, 0, 20)
        if top is not None and not lp:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = (top or 0) if lp else -1
    else:
        logprobs = _num(body, "logprobs", int, None, 0, 5)
        logprobs = -1 if logprobs is None else logprobs
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "'ignore_eos' must be a boolean", "ignore_eos")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, "'user' must be a string", "user")
    return SamplingParams(
        temperature=_num(body, "temperature", float, 1.0, 0, 2),
        top_p=_num(body, "top_p", float, 1.0, 0, 1) or 1e-9,
        top_k=_num(body, "top_k", int, 0, 0, 2**31 - 1),  # int32 on the wire
        min_p=_num(body, "min_p", float, 0.0, 0, 0.999),
        repetition_penalty=_num(body, "repetition_penalty", float, 1.0, 0.01, 10),
        presence_penalty=_num(body, "presence_penalty", float, 0.0, -2, 2),
        frequency_penalty=_num(body, "frequency_penalty", float, 0.0, -2, 2),
        seed=_num(body, "seed", int, None, -(2**63), 2**63 - 1),
        max_tokens=max_tokens, stop=[x for x in stop if x], logprobs=logprobs, ignore_eos=ignore_eos,
    )


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            role = m.get("role") if isinstance(m, dict) else None
            hint = " (tool messages need tool calling, which is not supported)" if role == "tool" else ""
            raise ApiError(400, f"messages[{i}] needs a role of system, developer, user or assistant{hint}",
                           "messages")
        c = m.get("content")
        if isinstance(c, list):
            parts = []
            for p in c:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                    raise ApiError(400, f"messages[{i}]: content parts of type {kind!r} are not supported "
                                        f"(text only)", "messages")
                parts.append(p["text"])
            c = "".join(parts)
        if m.get("tool_calls"):
            raise ApiError(400, f"messages[{i}]: tool calls are not supported", "messages")
        if not isinstance(c, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": c})
    return out


def _check_model(node: Node, body: dict) -> str:
    """The adapter a request's `model` names ('' for the base model)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required (GET /v1/models lists them)", "model")
    if model not in served_models(node):
        base, plus, name = model.partition("+")
        if plus and base == node.cfg.model and name in node.adapter_names():
            raise RingUnavailable(f"adapter {name!r} is not loaded on every stage of the ring yet "
                                  f"(start each peer with --adapter)")
        raise ApiError(404, f"the model '{model}' does not exist here; GET /v1/models lists them "
                            f"({', '.join(served_models(node))})", "model", code="model_not_found")
    return model.partition("+")[2]


def _common(request: web.Request, body: dict) -> tuple[int, bool, dict]:
    _refuse_unsupported(body)
    body["_adapter"] = _check_model(request.app[NODE], body)
    n = _num(body, "n", int, 1, 1, 16)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream")
    so = body.get("stream_options")
    if so is not None and (not isinstance(so, dict) or not stream):
        raise ApiError(400, "'stream_options' must be an object and needs 'stream': true", "stream_options")
    return n, stream, so or {}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    n, stream, so = _common(request, body)
    params = sampling_from(body, chat=True)
    prompt = request.app[SCHED].tok.apply_chat(_messages(body))
    return await _serve(request, body, [prompt], params, n, stream, so, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    n, stream, so = _common(request, body)
    params = sampling_from(body, chat=False)
    tok = request.app[SCHED].tok
    p = body.get("prompt")
    if isinstance(p, str):
        prompts = [tok.encode(p)]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = [tok.encode(x) for x in p]
    elif isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        prompts = [list(p)]
    elif isinstance(p, list) and p and all(isinstance(x, list) and x and all(
            isinstance(y, int) and not isinstance(y, bool) for y in x) for x in p):
        prompts = [list(x) for x in p]
    else:
        raise ApiError(400, "'prompt' must be a string, a list of strings, or token ids", "prompt")
    if len(prompts) * n > 64:
        raise ApiError(400, "at most 64 completions per request (prompts x n)", "n")
    vocab = request.app[NODE].ck.config.vocab_size
    if any(t < 0 or t >= vocab for pr in prompts for t in pr):
        raise ApiError(400, f"token ids must be in [0, {vocab})", "prompt")
    return await _serve(request, body, prompts, params, n, stream, so, chat=False)


def _context_check(node: Node, prompts: list[list[int]]) -> None:
    ctx = node.ck.config.max_position_embeddings
    for pr in prompts:
        if not pr:
            raise ApiError(400, "the prompt is empty", "prompt")
        if len(pr) >= ctx:
            raise ApiError(400, f"the prompt is {len(pr)} tokens but the model's context is {ctx} "
                                f"tokens; shorten it", "messages", code="context_length_exceeded")


def _submit(sched: Scheduler, prompts: list[list[int]], params: SamplingParams, n: int,
            adapter: str = "") -> list[Request]:
    reqs = []
    try:
        for pr in prompts:
            for i in range(n):
                p = params if params.seed is None or i == 0 else \
                    SamplingParams.from_dict({**params.to_dict(), "seed": (params.seed + i + 2**63) % 2**64 - 2**63})
                reqs.append(sched.submit(pr, p, adapter))
    except RequestError as e:
        for r in reqs:
            sched.cancel(r)
        if isinstance(e, QueueFull):
            raise ApiError(429, str(e), type_="rate_limit_error", code="queue_full") from None
        if isinstance(e, TooLarge):
            raise ApiError(413, str(e), "max_tokens", code="kv_memory_exceeded") from None
        raise
    return reqs


async def _serve(request: web.Request, body: dict, prompts: list[list[int]], params: SamplingParams,
                 n: int, stream: bool, so: dict, chat: bool) -> web.StreamResponse:
    node, sched = request.app[NODE], request.app[SCHED]
    _context_check(node, prompts)
    if not node.plan.complete:
        raise RingUnavailable(f"the ring is incomplete: {node.plan.missing}")
    reqs = _submit(sched, prompts, params, n, body["_adapter"])
    out = Output(request, node, chat, reqs, sched.tok, body["model"])
    try:
        if not stream:
            await asyncio.gather(*(_collect(r) for r in reqs))
            return web.json_response(out.final())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        await _stream(resp, out, reqs, so)
        return resp
    finally:
        for r in reqs:
            if not r.gen.finished:
                sched.cancel(r)


class Output:
    """Renders choices (final or as chunks) in the OpenAI shapes of chat or text completions."""

    def __init__(self, request: web.Request, node: Node, chat: bool, reqs: list[Request], tok,
                 model: str):
        self.chat, self.reqs, self.tok = chat, reqs, tok
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = model
        self.offsets = [0] * len(reqs)

    def _lp_chat(self, deltas: list[Delta]) -> dict:
        def entry(tid: int, lp: float) -> dict:
            t = self.tok.decode([tid])
            return {"token": t, "logprob": lp, "bytes": list(t.encode())}

        return {"content": [{**entry(d.token, d.logprob),
                             "top_logprobs": [entry(t, lp) for t, lp in d.top_logprobs]} for d in deltas]}

    def _lp_text(self, i: int, deltas: list[Delta]) -> dict:
        toks = [self.tok.decode([d.token]) for d in deltas]
        offs = []
        for t in toks:
            offs.append(self.offsets[i])
            self.offsets[i] += len(t)
        return {"tokens": toks, "token_logprobs": [d.logprob for d in deltas],
                "top_logprobs": [{self.tok.decode([t]): lp for t, lp in d.top_logprobs} for d in deltas],
                "text_offset": offs}

    def choice(self, i: int, text: str, deltas: list[Delta], finish: str | None, first: bool,
               final: bool) -> dict:
        r = self.reqs[i]
        c: dict[str, Any] = {"index": i}
        if self.chat:
            if final:
                c["message"] = {"role": "assistant", "content": text}
            else:
                c["delta"] = ({"role": "assistant", "content": text} if first else
                              ({"content": text} if text else {}))
        else:
            c["text"] = text
        if r.gen.params.logprobs >= 0:
            c["logprobs"] = self._lp_chat(deltas) if self.chat else self._lp_text(i, deltas)
        else:
            c["logprobs"] = None
        c["finish_reason"] = finish
        return c

    def usage(self) -> dict:
        pt = sum(len(r.gen.prompt) for r in self._unique_prompts())
        ct = sum(len(r.gen.tokens) for r in self.reqs)
        return {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}

    def _unique_prompts(self) -> list[Request]:
        seen, out = set(), []
        for r in self.reqs:  # n choices of one prompt count its tokens once, as OpenAI does
            key = tuple(r.gen.prompt)
            if key not in seen:
                seen.add(key)
                out.append(r)
        return out

    def final(self) -> dict:
        choices = [self.choice(i, r.gen.text, r.deltas, r.gen.finish_reason, False, True)
                   for i, r in enumerate(self.reqs)]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage(),
                "system_fingerprint": None}

    def chunk(self, choices: list[dict], usage: dict | None = None, with_usage: bool = False) -> bytes:
        payload: dict[str, Any] = {"id": self.id, "created": self.created, "model": self.model,
                                   "object": "chat.completion.chunk" if self.chat else "text_completion",
                                   "choices": choices, "system_fingerprint": None}
        if with_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n".encode()


async def _stream(resp: web.StreamResponse, out: Output, reqs: list[Request], so: dict) -> None:
    include_usage = bool(so.get("include_usage"))
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, r: Request) -> None:
        while True:
            item = await r.queue.get()
            await queue.put((i, item))
            if item is None or isinstance(item, Exception):
                return

    pumps = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(reqs)]
    first = [True] * len(reqs)
    live = len(reqs)
    try:
        if out.chat:  # the role comes first, as OpenAI sends it
            for i in range(len(reqs)):
                await resp.write(out.chunk([out.choice(i, "", [], None, True, False)], with_usage=include_usage))
                first[i] = False
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
                g = reqs[i].gen
                await resp.write(out.chunk([out.choice(i, "", [], g.finish_reason, False, False)],
                                           with_usage=include_usage))
                continue
            if isinstance(item, Exception):
                err = {"error": {"message": str(item), "type": "service_unavailable"
                                 if isinstance(item, RingUnavailable) else "invalid_request_error"}}
                await resp.write(f"data: {json.dumps(err)}\n\n".encode())
                live -= 1
                continue
            batch = [item]
            if item.text or reqs[i].gen.params.logprobs >= 0:
                await resp.write(out.chunk([out.choice(i, item.text, batch, None, first[i], False)],
                                           with_usage=include_usage))
                first[i] = False
        if include_usage:
            await resp.write(out.chunk([], out.usage(), with_usage=True))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    finally:
        for p in pumps:
            p.cancel()


async def _collect(req: Request) -> None:
    while True:
        item = await req.queue.get()
        if item is None:
            return
        if isinstance(item, Exception):
            raise item


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    node, sched = request.app[NODE], request.app[SCHED]
    sh = node.shard
    lines = []

    def metric(name: str, kind: str, help_: str, value, labels: str = "") -> None:
        lines.append(f"# HELP together_{name} {help_}")
        lines.append(f"# TYPE together_{name} {kind}")
        if isinstance(value, dict):
            for q, v in value.items():
                if v is not None:
                    lines.append(f'together_{name}{{quantile="{q}"}} {v:.6g}')
        else:
            lines.append(f"together_{name}{labels} {value}")

    metric("requests_total", "counter", "Requests admitted by this API peer.", sched.stats["requests"])
    metric("tokens_generated_total", "counter", "Tokens streamed by this API peer.", sched.stats["tokens"])
    metric("request_errors_total", "counter", "Sequences that failed.", sched.stats["errors"])
    metric("ring_steps_total", "counter", "Frames this API peer sent around the ring.", sched.stats["steps"])
    metric("queue_depth", "gauge", "Requests waiting for admission.", len(sched.waiting))
    metric("running_sequences", "gauge", "Sequences in the running batch.", len(sched.running))
    metric("kv_budget_tokens", "gauge", "KV tokens the ring admits at once.", sched.kv_budget())
    metric("ring_complete", "gauge", "1 when every layer is served.", int(node.plan.complete))
    metric("plan_epoch", "gauge", "Current plan epoch.", node.plan.epoch)
    metric("step_ms", "summary", "Wall time of a ring step.",
           {"0.5": _pct(sched.step_ms, 0.5), "0.9": _pct(sched.step_ms, 0.9)})
    metric("hop_overhead_ms", "summary", "Added time per network hop of a one-token frame.",
           {"0.5": _pct(sched.hop_overhead_ms, 0.5), "0.9": _pct(sched.hop_overhead_ms, 0.9)})
    metric("stage_compute_ms", "summary", "Compute time of this peer's stage per frame.",
           {"0.5": _pct(node.hop_ms, 0.5), "0.9": _pct(node.hop_ms, 0.9)})
    metric("stage_sequences", "gauge", "Sequences with a KV cache on this peer.", sh.num_sequences if sh else 0)
    metric("stage_kv_cache_bytes", "gauge", "Bytes of KV cache on this peer.", sh.cache_nbytes() if sh else 0)
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def cors_middleware(origin: str):
    @web.middleware
    async def cors(request: web.Request, handler):
        if request.method == "OPTIONS":
            resp: web.StreamResponse = web.Response(status=204)
        else:
            resp = await handler(request)
        resp.headers["Access-Control-Allow-Origin"] = origin
        resp.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        resp.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        return resp

    return cors


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


def make_app(node: Node, sched: Scheduler, api_key: str | None = None,
             cors_origin: str | None = None) -> web.Application:
    """The API app for one peer; the scheduler's background loop lives in cleanup_ctx.
    CORS is off unless an origin is given."""
    mws = ([cors_middleware(cors_origin)] if cors_origin else []) + [errors_middleware] + \
        ([bearer_middleware(api_key)] if api_key else [])
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
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    return app
