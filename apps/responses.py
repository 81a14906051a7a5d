"""OpenAI's Responses API (POST /v1/responses) as a thin translation over the one chat path
(apps/chat.py): input items become chat messages, function tools and `text.format` become chat tools
and response_format, and the run's events become output items (whole, or as Responses stream events).

Stateless: this server keeps no responses, so `store` answers false and `previous_response_id` is a
400 that says to send the conversation again as input items."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp_sse import sse_response

from apps.chat import ChatRequest, ChatRun, Finish, TextDelta, ToolCallDelta, function_tool, start_chat
from apps.openai_schema import InvalidRequest
from backends.sampling import SamplingParams
from mesh.scheduler import RingUnavailable

DEFAULT_MAX_OUTPUT_TOKENS = 4096  # OpenAI's default is "until the context ends"; the context still caps it
_ACCEPTED = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "tools",
             "tool_choice", "text", "store", "previous_response_id", "metadata", "parallel_tool_calls", "user",
             "truncation", "include", "reasoning", "service_tier", "background", "prompt_cache_key",
             "safety_identifier", "stream_options", "top_logprobs", "max_tool_calls", "conversation"}


def _bad(message: str, param: str | None, code: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, param, code)


# --- request: Responses -> OpenAI chat ---------------------------------------------------------------

def _part_text(content: Any, where: str) -> str:
    """A message's content: a string, or input_text / output_text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or a list of content parts", "input")
    out = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else type(p).__name__
        if kind in ("input_text", "output_text", "text") and isinstance(p.get("text"), str):
            out.append(p["text"])
        elif kind == "refusal" and isinstance(p.get("refusal"), str):
            out.append(p["refusal"])
        else:
            raise _bad(f"{where}.content[{j}]: parts of type {kind!r} are not supported (text only)", "input")
    return "".join(out)


def chat_messages(instructions: Any, items: Any) -> list[dict[str, Any]]:
    """`instructions` and `input` (a string, or message / function_call / function_call_output items)
    as OpenAI chat messages; consecutive function calls join one assistant message."""
    out: list[dict[str, Any]] = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("'instructions' must be a string", "instructions")
        if instructions:
            out.append({"role": "system", "content": instructions})
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise _bad("'input' is required: a string or a non-empty list of input items", "input")
    for i, it in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(it, dict):
            raise _bad(f"{where} must be an object (an input item)", "input")
        kind = it.get("type", "message")
        if kind == "message":
            role = it.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _bad(f"{where}.role must be user, system, developer or assistant", "input")
            out.append({"role": role, "content": _part_text(it.get("content"), where)})
        elif kind == "function_call":
            for k in ("call_id", "name", "arguments"):
                if not isinstance(it.get(k), str):
                    raise _bad(f"{where}.{k} is required (a string)", "input")
            call = {"id": it["call_id"], "type": "function",
                    "function": {"name": it["name"], "arguments": it["arguments"]}}
            prev = out[-1] if out else None
            if prev is not None and prev["role"] == "assistant":
                prev.setdefault("tool_calls", []).append(call)
                if not prev["content"]:
                    prev["content"] = None
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(it.get("call_id"), str):
                raise _bad(f"{where}.call_id is required (the call_id of the function_call it answers)", "input")
            output = it.get("output")
            text = output if isinstance(output, str) else _part_text(output, where)
            out.append({"role": "tool", "tool_call_id": it["call_id"], "content": text})
        elif kind == "reasoning":
            continue
        elif kind == "item_reference":
            raise _bad(f"{where}: item references need stored responses, and this server keeps none; send "
                       f"the items themselves", "input")
        else:
            raise _bad(f"{where}: items of type {kind!r} are not supported (message, function_call, "
                       f"function_call_output)", "input")
    return out


def chat_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Function tools ({type: function, name, description, parameters, strict}) as chat tools."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list of function tools", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else type(t).__name__
            raise _bad(f"tools[{i}]: tools of type {kind!r} are not supported (function tools only)", "tools")
        if not isinstance(t.get("name"), str) or not t["name"]:
            raise _bad(f"tools[{i}].name is required", "tools")
        params = t.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise _bad(f"tools[{i}].parameters must be a JSON schema object", "tools")
        out.append(function_tool(t["name"], params, t.get("description")))
    return out


def chat_tool_choice(tc: Any, tools: list[dict[str, Any]] | None) -> str | dict[str, Any] | None:
    if tc is None:
        return None
    if tc in ("auto", "none", "required"):
        if tc != "none" and not tools:
            raise _bad("'tool_choice' needs 'tools'", "tool_choice")
        return str(tc)
    if isinstance(tc, dict) and tc.get("type") == "function":
        names = [t["function"]["name"] for t in tools or []]
        if tc.get("name") not in names:
            raise _bad(f"tool_choice.name {tc.get('name')!r} is not one of the tools ({', '.join(names)})",
                       "tool_choice")
        return {"type": "function", "function": {"name": tc["name"]}}
    raise _bad("'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\", \"name\": ...}",
               "tool_choice")


def response_format(text: Any) -> dict[str, Any] | None:
    """`text.format` as chat's response_format."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _bad("'text' must be an object such as {\"format\": {\"type\": \"json_schema\", ...}}", "text")
    fmt = text.get("format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if not isinstance(fmt, dict):
        raise _bad("text.format must be an object", "text.format")
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("text.format.schema is required (a JSON schema object)", "text.format.schema")
        if not isinstance(fmt.get("name"), str) or not fmt["name"]:
            raise _bad("text.format.name is required", "text.format.name")
        js: dict[str, Any] = {"name": fmt["name"], "schema": fmt["schema"], "strict": bool(fmt.get("strict", False))}
        if isinstance(fmt.get("description"), str):
            js["description"] = fmt["description"]
        return {"type": "json_schema", "json_schema": js}
    raise _bad(f"text.format.type {fmt.get('type')!r} is not supported (text, json_object, json_schema)",
               "text.format")


def _number(body: dict[str, Any], key: str, lo: float, hi: float, integer: bool = False) -> Any:
    v = body.get(key)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not (lo <= v <= hi):
        raise _bad(f"'{key}' must be {'an integer' if integer else 'a number'} between {lo} and {hi}, "
                   f"got {v!r}", key)
    return v


@dataclass
class ResponsesRequest:
    chat: ChatRequest
    stream: bool
    echo: dict[str, Any] = field(default_factory=dict)  # the request's fields the response repeats


def translate(body: dict[str, Any]) -> ResponsesRequest:
    """A /v1/responses body as a ChatRequest (InvalidRequest naming the first bad parameter)."""
    for k in body:
        if k not in _ACCEPTED:
            raise _bad(f"unknown parameter '{k}'", k, "unknown_parameter")
    if body.get("previous_response_id") is not None:
        raise _bad("previous_response_id is not supported: this server keeps no responses (it is stateless); "
                   "send the whole conversation as input items instead (the earlier output items, then the "
                   "new input)", "previous_response_id")
    if body.get("conversation") is not None:
        raise _bad("conversation is not supported: this server keeps no conversations; send the whole "
                   "conversation as input items", "conversation")
    if body.get("background"):
        raise _bad("background responses are not supported (this server keeps no responses)", "background")
    if body.get("top_logprobs"):
        raise _bad("top_logprobs is not supported on /v1/responses (use /v1/chat/completions)", "top_logprobs")
    if body.get("include"):
        raise _bad("include is not supported: there is nothing extra to include", "include")
    reasoning = body.get("reasoning")
    if reasoning is not None and not (isinstance(reasoning, dict) and not any(reasoning.values())):
        raise _bad("reasoning is not supported by this server's models", "reasoning")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required (GET /v1/models lists them)", "model")
    mot = body.get("max_output_tokens")
    if mot is not None and (isinstance(mot, bool) or not isinstance(mot, int) or mot < 1):
        raise _bad(f"'max_output_tokens' must be an integer of at least 1, got {mot!r}", "max_output_tokens")
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    if not isinstance(body.get("stream", False) or False, bool):
        raise _bad("'stream' must be a boolean", "stream")
    tools = chat_tools(body.get("tools"))
    tool_choice = chat_tool_choice(body.get("tool_choice"), tools)
    rf = response_format(body.get("text"))
    sampling = SamplingParams(temperature=1.0 if temperature is None else float(temperature),
                              top_p=1.0 if top_p is None else (float(top_p) or 1e-9),
                              max_tokens=mot or DEFAULT_MAX_OUTPUT_TOKENS)
    chat = ChatRequest(model=model, messages=chat_messages(body.get("instructions"), body.get("input")),
                       sampling=sampling, tools=tools, tool_choice=tool_choice, response_format=rf)
    text = body.get("text") if isinstance(body.get("text"), dict) else {}
    echo = {"instructions": body.get("instructions"), "max_output_tokens": mot, "model": model,
            "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
            "temperature": 1.0 if temperature is None else temperature, "top_p": 1.0 if top_p is None else top_p,
            "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
            "text": {"format": (text or {}).get("format") or {"type": "text"}},
            "metadata": body.get("metadata") or {}, "user": body.get("user"),
            "truncation": body.get("truncation") or "disabled"}
    return ResponsesRequest(chat, bool(body.get("stream")), echo)


# --- answer: chat events -> output items -----------------------------------------------------------

def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def usage_json(u: dict[str, int]) -> dict[str, Any]:
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": u.get("cached_tokens", 0)},
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}


def response_json(rid: str, created: int, echo: dict[str, Any], output: list[dict[str, Any]], status: str,
                  usage: dict[str, Any] | None, error: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "response", "created_at": created, "status": status, "background": False,
            "error": error, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            **echo, "output": output, "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "service_tier": "default", "store": False, "usage": usage}


class Items:
    """Chat events folded into Responses output items, and the stream events that build them (without
    sequence numbers: the sender numbers them)."""

    def __init__(self) -> None:
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the message item text is going into
        self.reason: str | None = None

    def add(self, ev: TextDelta | ToolCallDelta | Finish) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if isinstance(ev, TextDelta):
            if not ev.text:
                return out
            if self.open is None:
                self.open = {"type": "message", "id": new_id("msg_"), "status": "in_progress", "role": "assistant",
                             "content": []}
                self.output.append(self.open)
                i = len(self.output) - 1
                out += [{"type": "response.output_item.added", "output_index": i, "item": dict(self.open, content=[])},
                        {"type": "response.content_part.added", "item_id": self.open["id"], "output_index": i,
                         "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}]
                self.open["content"].append({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            self.open["content"][0]["text"] += ev.text
            out.append({"type": "response.output_text.delta", "item_id": self.open["id"],
                        "output_index": len(self.output) - 1, "content_index": 0, "delta": ev.text, "logprobs": []})
        elif isinstance(ev, ToolCallDelta):
            out += self._close()
            item = {"type": "function_call", "id": new_id("fc_"), "call_id": ev.id, "name": ev.name,
                    "arguments": ev.arguments, "status": "completed"}
            self.output.append(item)
            i = len(self.output) - 1
            out += [{"type": "response.output_item.added", "output_index": i,
                     "item": dict(item, arguments="", status="in_progress")},
                    {"type": "response.function_call_arguments.delta", "item_id": item["id"], "output_index": i,
                     "delta": ev.arguments},
                    {"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": i,
                     "name": ev.name, "arguments": ev.arguments},
                    {"type": "response.output_item.done", "output_index": i, "item": item}]
        else:
            self.reason = ev.reason
            out += self._close()
        return out

    def _close(self) -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        i, part = self.output.index(item), item["content"][0]
        item["status"] = "incomplete" if self.reason == "length" else "completed"
        return [{"type": "response.output_text.done", "item_id": item["id"], "output_index": i, "content_index": 0,
                 "text": part["text"], "logprobs": []},
                {"type": "response.content_part.done", "item_id": item["id"], "output_index": i, "content_index": 0,
                 "part": part},
                {"type": "response.output_item.done", "output_index": i, "item": item}]

    @property
    def status(self) -> str:
        return "incomplete" if self.reason == "length" else "completed"


# --- handler ----------------------------------------------------------------------------------------

async def responses(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses (errors before the answer starts go through the API's OpenAI-shaped middleware)."""
    from apps.api import _json_body  # api registers this module's route

    req = translate(await _json_body(request))
    run = await start_chat(request.app, req.chat)
    rid, created = new_id("resp_"), int(time.time())
    try:
        if req.stream:
            return await _stream(request, run, req, rid, created)
        items = Items()
        async for ev in run.events(0):
            items.add(ev)
        return web.json_response(response_json(rid, created, req.echo, items.output, items.status,
                                               usage_json(run.usage())))
    finally:
        run.cancel()


async def _stream(request: web.Request, run: ChatRun, req: ResponsesRequest, rid: str,
                  created: int) -> web.StreamResponse:
    """response.created, response.in_progress, the items' events, then response.completed (or
    .incomplete at max_output_tokens, .failed after an error event); every event numbered."""
    seq = 0

    async def send(resp: Any, data: dict[str, Any]) -> None:
        nonlocal seq
        await resp.send(json.dumps({**data, "sequence_number": seq}), event=data["type"])
        seq += 1

    try:
        async with sse_response(request, sep="\n", allow_all_methods=True) as resp:
            pending = response_json(rid, created, req.echo, [], "in_progress", None)
            await send(resp, {"type": "response.created", "response": pending})
            await send(resp, {"type": "response.in_progress", "response": pending})
            items = Items()
            try:
                async for ev in run.events(0):
                    for data in items.add(ev):
                        await send(resp, data)
            except (ConnectionResetError, TimeoutError):
                raise
            except Exception as e:
                code = "server_is_overloaded" if isinstance(e, RingUnavailable) else "server_error"
                await send(resp, {"type": "error", "code": code, "message": str(e), "param": None})
                await send(resp, {"type": "response.failed", "response": response_json(
                    rid, created, req.echo, items.output, "failed", usage_json(run.usage()),
                    {"code": code, "message": str(e)})})
                return resp
            done = response_json(rid, created, req.echo, items.output, items.status, usage_json(run.usage()))
            await send(resp, {"type": f"response.{items.status}", "response": done})
    except TimeoutError:
        raise ConnectionResetError("the client stopped reading the stream") from None
    return resp
