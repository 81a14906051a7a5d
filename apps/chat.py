"""The one path every chat-like API goes through (/v1/chat/completions, /v1/messages, /v1/responses):
validate, render the chat template (with tools), add the grammar that response_format or a forced tool
call needs, submit to the scheduler, and turn each choice's tokens into text and tool-call events.

The endpoints are thin translations of `ChatRun.events` into their own wire shapes, so tools, grammars,
stop strings, n choices and usage behave the same in all three."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, AsyncIterator

from aiohttp import web

from apps import tools as T
from apps.openai_schema import InvalidRequest
from backends.generation import Delta
from backends.sampling import SamplingParams

if TYPE_CHECKING:
    from mesh.batching import Request
    from mesh.scheduler import Scheduler


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]  # OpenAI chat messages (role system|developer|user|assistant|tool)
    sampling: SamplingParams  # without grammar: start_chat adds response_format/tool grammars
    tools: list[dict[str, Any]] | None = None  # OpenAI chat tools [{"type":"function","function":{...}}]
    tool_choice: str | dict[str, Any] | None = None  # "auto"|"none"|"required"|{"type":"function",...}
    response_format: dict[str, Any] | None = None  # as OpenAI chat
    n: int = 1
    draft: bool = True


@dataclass
class TextDelta:
    text: str
    # the sampled tokens this text came from (for logprobs); may be non-empty with text "" when the
    # request asked for logprobs, so every token is reported
    tokens: list[Delta] = field(default_factory=list)


@dataclass
class ToolCallDelta:
    """One complete tool call (its arguments as JSON text)."""

    index: int
    id: str
    name: str
    arguments: str


@dataclass
class Finish:
    reason: str  # "stop" | "length" | "tool_calls" | ...


Event = TextDelta | ToolCallDelta | Finish


class ChatRun:
    """The choices of one chat request in flight. `events(i)` may be read once per choice, concurrently."""

    def __init__(self, sched: Scheduler, reqs: list[Request], prompt_tokens: int, plan: T.ToolPlan | None):
        self.sched, self.reqs, self.prompt_tokens, self.plan = sched, reqs, prompt_tokens, plan

    async def events(self, choice: int = 0) -> AsyncIterator[Event]:
        """Text deltas until a tool call opens, then each call once complete, then the finish reason.
        A choice that fails raises its error (RingUnavailable, RequestError)."""
        r = self.reqs[choice]
        parser = T.StreamParser(self.plan.family, self.plan.names) if self.plan and self.plan.parse else None
        logprobs = r.gen.params.logprobs >= 0
        pending: list[Delta] = []
        while True:
            item = await r.queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                break
            pending.append(item)
            if parser is None:
                if item.text or logprobs:
                    yield TextDelta(item.text, pending if logprobs else [])
                    pending = []
                continue
            for ev in parser.push(item.text):
                if isinstance(ev, str):
                    yield TextDelta(ev, pending if logprobs else [])
                    pending = []
                else:
                    yield ToolCallDelta(ev.index, ev.id, ev.name, ev.arguments)
        calls = 0
        if parser is not None:
            for ev in parser.finish():
                if isinstance(ev, str):
                    yield TextDelta(ev, pending if logprobs else [])
                    pending = []
                else:
                    yield ToolCallDelta(ev.index, ev.id, ev.name, ev.arguments)
            calls = parser.calls
        if pending and logprobs:
            yield TextDelta("", pending)
        reason = r.gen.finish_reason or "stop"
        yield Finish("tool_calls" if calls and reason == "stop" else reason)

    def usage(self) -> dict[str, int]:
        """n choices of one prompt count its tokens once, as OpenAI does (cached: the most any choice
        took from the stages' prefix caches)."""
        pt = self.prompt_tokens
        ct = sum(len(r.gen.tokens) for r in self.reqs)
        cached = max((r.cached for r in self.reqs), default=0)
        return {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct, "cached_tokens": cached}

    def cancel(self) -> None:
        """Frees every sequence not finished (call in a finally: the client may have gone)."""
        for r in self.reqs:
            if not r.gen.finished:
                self.sched.cancel(r)


def _grammar(req: ChatRequest, plan: T.ToolPlan | None) -> str:
    """The grammar the output must follow: a forced tool call's, else response_format's ("" for none)."""
    from backends import constrain

    if plan is not None and plan.forced:
        return constrain.lark_grammar(plan.grammar())
    try:
        return constrain.response_format_grammar(req.response_format)
    except constrain.GrammarError as e:
        raise InvalidRequest(f"response_format: {e}", "response_format") from None


async def render_prompt(app: web.Application, req: ChatRequest) -> list[int]:
    """The prompt's token ids exactly as start_chat renders them (tools included), without running it
    (Anthropic's count_tokens). Checks the model and the tools as start_chat does."""
    from apps import api

    node, tok = app[api.NODE], app[api.SCHED].tok
    api._adapter(node, req.model)
    plan = T.plan_tools(req.tools, req.tool_choice, T.detect_family(tok))
    return await asyncio.to_thread(T.render, tok, T.normalise_messages(req.messages), plan)


async def start_chat(app: web.Application, req: ChatRequest) -> ChatRun:
    """Validates (400s as ApiError/InvalidRequest), renders the template with the tools, submits every
    choice to the scheduler. Raises RingUnavailable when the ring is incomplete, as chat completions did."""
    from apps import api  # api imports the endpoints that import this module

    node, sched = app[api.NODE], app[api.SCHED]
    adapter = api._adapter(node, req.model)
    tok = sched.tok
    plan = T.plan_tools(req.tools, req.tool_choice, T.detect_family(tok))
    if plan is not None and plan.forced and req.response_format not in (None, {"type": "text"}):
        raise InvalidRequest("response_format cannot be combined with a forced tool call (tool_choice "
                             "'required' or a named function); drop one of them", "response_format")
    messages = T.normalise_messages(req.messages)
    # a long prompt takes seconds to tokenize: off the loop, which also answers the mesh's heartbeats
    prompt = await asyncio.to_thread(T.render, tok, messages, plan)
    grammar = _grammar(req, plan)
    params = req.sampling
    if grammar:
        from backends import constrain

        try:
            await asyncio.to_thread(constrain.check_grammar, grammar, tok)
        except constrain.GrammarError as e:
            param = "tools" if plan is not None and plan.forced else "response_format"
            raise InvalidRequest(f"{param}: {e}", param) from None
        params = replace(params, grammar=grammar)
    api._context_check(node, [prompt])
    if not node.plan.complete:
        from mesh.scheduler import RingUnavailable

        raise RingUnavailable(f"the ring is incomplete: {node.plan.missing}")
    reqs = api._submit(sched, [prompt], params, req.n, adapter, req.draft)
    return ChatRun(sched, reqs, len(prompt), plan)


def function_tool(name: str, parameters: dict[str, Any], description: Any = None) -> dict[str, Any]:
    """A tool of another API (Anthropic's input_schema, Responses' flat function) as an OpenAI chat tool."""
    fn: dict[str, Any] = {"name": name, "parameters": parameters}
    if isinstance(description, str):
        fn["description"] = description
    return {"type": "function", "function": fn}


def arguments_json(args: Any) -> str:
    """A call's arguments as the JSON text OpenAI sends (models may give an object or a string)."""
    if isinstance(args, str):
        return args
    return json.dumps(args, ensure_ascii=False)
