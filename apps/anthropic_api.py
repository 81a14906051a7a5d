"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) as a thin translation over
the one chat path (apps/chat.py): Anthropic's body becomes OpenAI chat messages and tools, and the
run's events become Anthropic's content blocks or its stream of events. Errors answer in Anthropic's
shape on these routes, so the official `anthropic` client raises the right exception class."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp_sse import sse_response

from apps.chat import ChatRequest, ChatRun, Finish, TextDelta, ToolCallDelta, function_tool, start_chat
from apps.openai_schema import InvalidRequest
from backends.errors import RequestError
from backends.sampling import SamplingParams
from mesh.scheduler import RingUnavailable

log = logging.getLogger(__name__)

# Anthropic's error type for each HTTP status we answer with
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 415: "invalid_request_error",
               429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
# accepted and ignored: hints for Anthropic's own service (caching, routing, diagnostics) with no meaning here
_IGNORED = {"metadata", "service_tier", "cache_control", "diagnostics", "inference_geo", "speed", "user_profile_id",
            "workspace_id", "container"}
_TOP_LEVEL = {"model", "messages", "max_tokens", "system", "stop_sequences", "temperature", "top_p", "top_k",
              "stream", "tools", "tool_choice", "thinking", "output_config", *_IGNORED}
_COUNT_LEVEL = {"model", "messages", "system", "tools", "tool_choice", "thinking", "output_config", *_IGNORED}


class AnthropicError(Exception):
    """Answered as {"type": "error", "error": {"type", "message"}} with `status`."""

    def __init__(self, status: int, message: str, type_: str | None = None):
        super().__init__(message)
        self.status, self.type = status, type_ or ERROR_TYPES.get(status, "api_error")


def _bad(message: str) -> AnthropicError:
    return AnthropicError(400, message)


def error_json(e: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, body) in Anthropic's shape for any error a request can meet."""
    from apps.api import ApiError  # api registers this module's routes

    if isinstance(e, AnthropicError):
        status, kind = e.status, e.type
    elif isinstance(e, ApiError):
        status = 529 if e.status == 503 else e.status
        kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    elif isinstance(e, (InvalidRequest, RequestError)):
        status, kind = 400, "invalid_request_error"
    elif isinstance(e, RingUnavailable):
        status, kind = 529, "overloaded_error"
    elif isinstance(e, web.HTTPException):
        status, kind = e.status, ERROR_TYPES.get(e.status, "invalid_request_error")
    else:
        log.exception("internal error on an Anthropic route", exc_info=e)
        return 500, {"type": "error", "error": {"type": "api_error", "message": "internal error (logged on the peer)"}}
    return status, {"type": "error", "error": {"type": kind, "message": str(e) or kind}}


def error_response(e: BaseException) -> web.Response:
    status, body = error_json(e)
    return web.json_response(body, status=status)


# --- request: Anthropic -> OpenAI chat ---------------------------------------------------------------

def _text_of(content: Any, where: str) -> str:
    """A string, or text blocks joined (system prompts and tool results)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}: must be a string or a list of text blocks")
    parts = []
    for i, b in enumerate(content):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            kind = b.get("type") if isinstance(b, dict) else type(b).__name__
            raise _bad(f"{where}.{i}: blocks of type {kind!r} are not supported here (text only)")
        parts.append(b["text"])
    return "".join(parts)


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _bad(f"{where}.content: must be a string or a list of content blocks")
    for i, b in enumerate(content):
        if not isinstance(b, dict) or not isinstance(b.get("type"), str):
            raise _bad(f"{where}.content.{i}: must be a content block (an object with a 'type')")
    return content


def _user_turn(blocks: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Tool results become `tool` messages (they answer the previous assistant turn), text one user message."""
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for i, b in enumerate(blocks):
        at = f"{where}.content.{i}"
        if b["type"] == "text":
            if not isinstance(b.get("text"), str):
                raise _bad(f"{at}.text: must be a string")
            texts.append(b["text"])
        elif b["type"] == "tool_result":
            if not isinstance(b.get("tool_use_id"), str) or not b["tool_use_id"]:
                raise _bad(f"{at}.tool_use_id: is required (the id of the tool_use block this answers)")
            text = _text_of(b.get("content", ""), f"{at}.content")
            if b.get("is_error"):
                text = f"Error: {text}"
            out.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": text})
        elif b["type"] in ("thinking", "redacted_thinking"):
            continue
        else:
            raise _bad(f"{at}: blocks of type {b['type']!r} are not supported (text and tool_result only)")
    if texts:
        out.append({"role": "user", "content": "".join(texts)})
    return out


def _assistant_turn(blocks: list[dict[str, Any]], where: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, b in enumerate(blocks):
        at = f"{where}.content.{i}"
        if b["type"] == "text":
            if not isinstance(b.get("text"), str):
                raise _bad(f"{at}.text: must be a string")
            texts.append(b["text"])
        elif b["type"] == "tool_use":
            if not isinstance(b.get("name"), str) or not isinstance(b.get("id"), str):
                raise _bad(f"{at}: a tool_use block needs 'id' and 'name' strings")
            if not isinstance(b.get("input", {}), dict):
                raise _bad(f"{at}.input: must be an object")
            calls.append({"id": b["id"], "type": "function",
                          "function": {"name": b["name"], "arguments": json.dumps(b.get("input", {}))}})
        elif b["type"] in ("thinking", "redacted_thinking"):
            continue
        else:
            raise _bad(f"{at}: blocks of type {b['type']!r} are not supported in assistant turns "
                       f"(text and tool_use only)")
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        msg["tool_calls"] = calls
    return msg


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Anthropic's `system` and `messages` as OpenAI chat messages."""
    out: list[dict[str, Any]] = []
    if body.get("system") is not None:
        system = _text_of(body["system"], "system")
        if system:
            out.append({"role": "system", "content": system})
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages: field required (a non-empty list of {role, content})")
    for i, m in enumerate(msgs):
        where = f"messages.{i}"
        if not isinstance(m, dict):
            raise _bad(f"{where}: must be an object with role and content")
        if m.get("role") not in ("user", "assistant"):
            raise _bad(f"{where}.role: must be 'user' or 'assistant' (the system prompt goes in 'system')")
        if "content" not in m:
            raise _bad(f"{where}.content: field required")
        blocks = _blocks(m["content"], where)
        if m["role"] == "user":
            out.extend(_user_turn(blocks, where))
        else:
            out.append(_assistant_turn(blocks, where))
    if out[-1]["role"] == "assistant":
        raise _bad("messages: the last message must be the user's (continuing a prefilled assistant turn "
                   "is not supported here)")
    return out


def chat_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Anthropic tools ({name, description, input_schema}) as OpenAI chat function tools."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise _bad("tools: must be a list of {name, description, input_schema}")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise _bad(f"tools.{i}.name: field required")
        if t.get("type") not in (None, "custom"):
            raise _bad(f"tools.{i}: tools of type {t['type']!r} (server tools) are not supported; "
                       f"define a custom tool with an input_schema")
        schema = t.get("input_schema")
        if not isinstance(schema, dict):
            raise _bad(f"tools.{i}.input_schema: field required (a JSON schema object)")
        out.append(function_tool(t["name"], schema, t.get("description")))
    return out


def chat_tool_choice(tc: Any, tools: list[dict[str, Any]] | None) -> str | dict[str, Any] | None:
    """{"type": "auto"|"any"|"tool"|"none"} (or "none") as OpenAI's tool_choice."""
    if tc is None:
        return None
    kind = tc if isinstance(tc, str) else tc.get("type") if isinstance(tc, dict) else None
    if kind == "none":
        return "none"
    if not tools:
        raise _bad("tool_choice: needs 'tools'")
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "tool":
        name = tc.get("name") if isinstance(tc, dict) else None
        names = [t["function"]["name"] for t in tools]
        if name not in names:
            raise _bad(f"tool_choice.name: {name!r} is not one of the tools ({', '.join(names)})")
        return {"type": "function", "function": {"name": name}}
    raise _bad("tool_choice: must be {\"type\": \"auto\"}, {\"type\": \"any\"}, {\"type\": \"tool\", \"name\": ...} "
               "or {\"type\": \"none\"}")


def _number(body: dict[str, Any], key: str, lo: float, hi: float, integer: bool = False) -> Any:
    v = body.get(key)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not (lo <= v <= hi):
        kind = "an integer" if integer else "a number"
        raise _bad(f"{key}: must be {kind} between {lo} and {hi}, got {v!r}")
    return v


@dataclass
class MessagesRequest:
    """An Anthropic request translated: what start_chat takes plus what only the answer needs."""

    chat: ChatRequest
    stop_sequences: list[str] = field(default_factory=list)
    stream: bool = False


def _check_keys(body: dict[str, Any], allowed: set[str]) -> None:
    for k in body:
        if k not in allowed:
            raise _bad(f"{k}: extra inputs are not permitted (unknown parameter)")
    if body.get("container") is not None:
        raise _bad("container: code execution containers are not supported by this server")
    thinking = body.get("thinking")
    if thinking is not None and not (isinstance(thinking, dict) and thinking.get("type") == "disabled"):
        raise _bad("thinking: extended thinking is not supported by this server")


def response_format(output_config: Any) -> dict[str, Any] | None:
    """`output_config.format` (structured outputs: {"type": "json_schema", "schema"}) as chat's
    response_format, enforced by the same grammar; `effort` has no meaning here and is ignored."""
    if output_config is None:
        return None
    if not isinstance(output_config, dict):
        raise _bad("output_config: must be an object")
    fmt = output_config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise _bad("output_config.format: must be {\"type\": \"json_schema\", \"schema\": {...}}")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model: field required (GET /v1/models lists them)")
    return model


def translate(body: dict[str, Any]) -> MessagesRequest:
    """A /v1/messages body as a ChatRequest (AnthropicError 400 naming the first bad field)."""
    _check_keys(body, _TOP_LEVEL)
    model = _model(body)
    mt = body.get("max_tokens")
    if mt is None:
        raise _bad("max_tokens: field required")
    if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
        raise _bad(f"max_tokens: must be an integer of at least 1, got {mt!r}")
    stops = body.get("stop_sequences") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop_sequences: must be a list of non-empty strings")
    temperature = _number(body, "temperature", 0, 1)
    top_p = _number(body, "top_p", 0, 1)
    top_k = _number(body, "top_k", 0, 2**31 - 1, integer=True)
    if not isinstance(body.get("stream", False), bool):
        raise _bad("stream: must be a boolean")
    tools = chat_tools(body.get("tools"))
    tool_choice = chat_tool_choice(body.get("tool_choice"), tools)
    sampling = SamplingParams(temperature=1.0 if temperature is None else float(temperature),
                              top_p=1.0 if top_p is None else (float(top_p) or 1e-9),
                              top_k=top_k or 0, max_tokens=mt, stop=list(stops))
    chat = ChatRequest(model=model, messages=chat_messages(body), sampling=sampling, tools=tools,
                       tool_choice=tool_choice, response_format=response_format(body.get("output_config")))
    return MessagesRequest(chat, list(stops), bool(body.get("stream", False)))


# --- answer: chat events -> Anthropic ---------------------------------------------------------------

def tool_input(arguments: str) -> dict[str, Any]:
    """A call's JSON arguments as the tool_use block's `input` (an object; anything else is kept under
    'arguments' rather than dropped)."""
    try:
        v = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {"arguments": arguments}
    return v if isinstance(v, dict) else {"arguments": v}


def stop_sequence(run: ChatRun, stops: list[str]) -> str | None:
    """Which stop string ended a choice that finished "stop" (None when the model's EOS did): the engine
    strips the stop string from the text, so it is found again in the decoded tokens."""
    if not stops or not run.reqs:
        return None
    gen = run.reqs[0].gen
    if not gen.tokens or gen.tokens[-1] in set(gen.params.stop_token_ids) | gen.tok.eos_ids:
        return None
    full = gen.tok.decode(gen.tokens)
    hits = [(i + len(s), s) for s in stops if (i := full.find(s)) != -1]
    return min(hits)[1] if hits else None


def usage_json(u: dict[str, int]) -> dict[str, int]:
    """Anthropic counts the prompt tokens read from a cache apart from input_tokens."""
    cached = u.get("cached_tokens", 0)
    return {"input_tokens": u["prompt_tokens"] - cached, "output_tokens": u["completion_tokens"],
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


class Blocks:
    """Chat events folded into Anthropic content blocks, and the stream events that build them."""

    def __init__(self) -> None:
        self.content: list[dict[str, Any]] = []
        self.open_text = False
        self.reason: str | None = None

    def add(self, ev: TextDelta | ToolCallDelta | Finish) -> list[tuple[str, dict[str, Any]]]:
        """The stream events `ev` makes (the final content accumulates in `content`)."""
        out: list[tuple[str, dict[str, Any]]] = []
        if isinstance(ev, TextDelta):
            if not ev.text:
                return out
            if not self.open_text:
                self.content.append({"type": "text", "text": ""})
                self.open_text = True
                out.append(("content_block_start", {"type": "content_block_start", "index": len(self.content) - 1,
                                                    "content_block": {"type": "text", "text": ""}}))
            self.content[-1]["text"] += ev.text
            out.append(("content_block_delta", {"type": "content_block_delta", "index": len(self.content) - 1,
                                                "delta": {"type": "text_delta", "text": ev.text}}))
        elif isinstance(ev, ToolCallDelta):
            out += self._close()
            block = {"type": "tool_use", "id": ev.id, "name": ev.name, "input": tool_input(ev.arguments)}
            self.content.append(block)
            i = len(self.content) - 1
            out += [("content_block_start", {"type": "content_block_start", "index": i,
                                              "content_block": {**block, "input": {}}}),
                    ("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                        "type": "input_json_delta", "partial_json": json.dumps(block["input"])}}),
                    ("content_block_stop", {"type": "content_block_stop", "index": i})]
        else:
            out += self._close()
            self.reason = ev.reason
        return out

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if not self.open_text:
            return []
        self.open_text = False
        return [("content_block_stop", {"type": "content_block_stop", "index": len(self.content) - 1})]


def stop_reason(finish: str | None, matched: str | None) -> str:
    if matched is not None:
        return "stop_sequence"
    return STOP_REASONS.get(finish or "stop", "end_turn")


def message_json(mid: str, model: str, content: list[dict[str, Any]], reason: str | None,
                 matched: str | None, usage: dict[str, int]) -> dict[str, Any]:
    return {"id": mid, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": matched, "usage": usage}


# --- handlers ---------------------------------------------------------------------------------------

async def _body(request: web.Request) -> dict[str, Any]:
    from apps.api import _json_body

    return await _json_body(request)


async def messages(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages."""
    try:
        req = translate(await _body(request))
        run = await start_chat(request.app, req.chat)
    except Exception as e:
        return error_response(e)
    mid, model = new_id("msg_"), req.chat.model
    try:
        if req.stream:
            return await _stream(request, run, req, mid)
        blocks = Blocks()
        try:
            async for ev in run.events(0):
                blocks.add(ev)
        except Exception as e:
            return error_response(e)
        matched = stop_sequence(run, req.stop_sequences) if blocks.reason == "stop" else None
        return web.json_response(message_json(mid, model, blocks.content, stop_reason(blocks.reason, matched),
                                              matched, usage_json(run.usage())))
    finally:
        run.cancel()


async def _stream(request: web.Request, run: ChatRun, req: MessagesRequest, mid: str) -> web.StreamResponse:
    """Anthropic's event order: message_start, (content_block_start, ping once, content_block_delta...,
    content_block_stop) per block, message_delta (stop_reason, usage), message_stop."""
    try:
        async with sse_response(request, sep="\n", allow_all_methods=True) as resp:
            start = message_json(mid, req.chat.model, [], None, None, {
                "input_tokens": run.prompt_tokens, "output_tokens": 0,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})
            await resp.send(json.dumps({"type": "message_start", "message": start}), event="message_start")
            blocks, pinged = Blocks(), False
            try:
                async for ev in run.events(0):
                    for name, data in blocks.add(ev):
                        await resp.send(json.dumps(data), event=name)
                        if not pinged and name == "content_block_start":
                            await resp.send(json.dumps({"type": "ping"}), event="ping")
                            pinged = True
            except (ConnectionResetError, TimeoutError):
                raise
            except Exception as e:
                await resp.send(json.dumps(error_json(e)[1]), event="error")
                return resp
            if not pinged:
                await resp.send(json.dumps({"type": "ping"}), event="ping")
            matched = stop_sequence(run, req.stop_sequences) if blocks.reason == "stop" else None
            await resp.send(json.dumps({"type": "message_delta", "delta": {
                "stop_reason": stop_reason(blocks.reason, matched), "stop_sequence": matched},
                "usage": usage_json(run.usage())}), event="message_delta")
            await resp.send(json.dumps({"type": "message_stop"}), event="message_stop")
    except TimeoutError:
        raise ConnectionResetError("the client stopped reading the stream") from None
    return resp


async def count_tokens(request: web.Request) -> web.Response:
    """POST /v1/messages/count_tokens: the prompt's tokens as the chat template renders it, tools included."""
    try:
        body = await _body(request)
        _check_keys(body, _COUNT_LEVEL)
        tools = chat_tools(body.get("tools"))
        chat = ChatRequest(model=_model(body), messages=chat_messages(body), sampling=SamplingParams(),
                           tools=tools, tool_choice=chat_tool_choice(body.get("tool_choice"), tools))
        n = await prompt_tokens(request.app, chat)
    except Exception as e:
        return error_response(e)
    return web.json_response({"input_tokens": n})


async def prompt_tokens(app: web.Application, chat: ChatRequest) -> int:
    """How many tokens `chat` renders to, without running it (the same rendering start_chat does)."""
    import asyncio

    from apps import api
    from apps import tools as T

    node, sched = app[api.NODE], app[api.SCHED]
    api._adapter(node, chat.model)
    tok = sched.tok
    plan = T.plan_tools(chat.tools, chat.tool_choice, T.detect_family(tok))
    prompt = await asyncio.to_thread(T.render, tok, T.normalise_messages(chat.messages), plan)
    return len(prompt)
