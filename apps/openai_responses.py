"""Answers of /v1/chat/completions and /v1/completions in the OpenAI shapes: whole, or streamed as
server-sent events (aiohttp-sse) ending with `data: [DONE]`."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response

from apps.chat import ChatRun, Event, Finish, TextDelta, ToolCallDelta
from backends.generation import Delta
from backends.tokenizer import Tokenizer
from mesh.scheduler import Request, RingUnavailable


class Output:
    """Renders choices (final or as chunks) in the OpenAI shapes of chat or text completions."""

    def __init__(self, chat: bool, reqs: list[Request], tok: Tokenizer, model: str):
        self.chat, self.reqs, self.tok = chat, reqs, tok
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = model
        self.offsets = [0] * len(reqs)

    def _lp_chat(self, deltas: list[Delta]) -> dict[str, Any]:
        def entry(tid: int, lp: float) -> dict[str, Any]:
            t = self.tok.decode([tid])
            return {"token": t, "logprob": lp, "bytes": list(t.encode())}

        return {"content": [{**entry(d.token, d.logprob),
                             "top_logprobs": [entry(t, lp) for t, lp in d.top_logprobs]} for d in deltas]}

    def _lp_text(self, i: int, deltas: list[Delta]) -> dict[str, Any]:
        toks = [self.tok.decode([d.token]) for d in deltas]
        offs = []
        for t in toks:
            offs.append(self.offsets[i])
            self.offsets[i] += len(t)
        return {"tokens": toks, "token_logprobs": [d.logprob for d in deltas],
                "top_logprobs": [{self.tok.decode([t]): lp for t, lp in d.top_logprobs} for d in deltas],
                "text_offset": offs}

    def choice(self, i: int, text: str, deltas: list[Delta], finish: str | None, first: bool,
               final: bool) -> dict[str, Any]:
        c: dict[str, Any] = {"index": i}
        if self.chat:
            if final:
                c["message"] = {"role": "assistant", "content": text}
            else:
                c["delta"] = ({"role": "assistant", "content": text} if first else
                              ({"content": text} if text else {}))
        else:
            c["text"] = text
        if self.reqs[i].gen.params.logprobs >= 0:
            c["logprobs"] = self._lp_chat(deltas) if self.chat else self._lp_text(i, deltas)
        else:
            c["logprobs"] = None
        c["finish_reason"] = finish
        return c

    def usage(self) -> dict[str, Any]:
        # n choices of one prompt count its tokens once, as OpenAI does (its cached tokens too: the most
        # any of its choices took from the stages' prefix caches)
        prompts: dict[tuple[int, ...], int] = {}
        for r in self.reqs:
            key = tuple(r.gen.prompt)
            prompts[key] = max(prompts.get(key, 0), r.cached)
        pt = sum(len(p) for p in prompts)
        ct = sum(len(r.gen.tokens) for r in self.reqs)
        return {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct,
                "prompt_tokens_details": {"cached_tokens": sum(prompts.values())}}

    def final(self) -> dict[str, Any]:
        choices = [self.choice(i, r.gen.text, r.deltas, r.gen.finish_reason, False, True)
                   for i, r in enumerate(self.reqs)]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage(),
                "system_fingerprint": None}

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None,
              with_usage: bool = False) -> str:
        payload: dict[str, Any] = {"id": self.id, "created": self.created, "model": self.model,
                                   "object": "chat.completion.chunk" if self.chat else "text_completion",
                                   "choices": choices, "system_fingerprint": None}
        if with_usage:
            payload["usage"] = usage
        return json.dumps(payload)


async def collect(req: Request) -> None:
    """Waits for a request's end; its failure is raised."""
    while True:
        item = await req.queue.get()
        if item is None:
            return
        if isinstance(item, Exception):
            raise item


async def stream(request: web.Request, out: Output, include_usage: bool) -> EventSourceResponse:
    """Streams every choice as it grows: chunks as `data:` events, then `data: [DONE]`; a failed
    choice sends an OpenAI-shaped error event and the others go on."""
    # "\n" line ends as OpenAI sends them (the library's default is "\r\n"); its comment pings
    # (": ping" every 15 s), which SSE clients skip, keep proxies from closing a long prefill, and a
    # client that stops reading is dropped after send_timeout, which frees its sequences
    try:
        async with sse_response(request, sep="\n", allow_all_methods=True) as resp:
            await _send_all(resp, out, include_usage)
    except TimeoutError:
        raise ConnectionResetError("the client stopped reading the stream") from None
    return resp


async def _send_all(resp: EventSourceResponse, out: Output, include_usage: bool) -> None:
    reqs = out.reqs
    queue: asyncio.Queue[tuple[int, Delta | Exception | None]] = asyncio.Queue()

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
                await resp.send(out.chunk([out.choice(i, "", [], None, True, False)], with_usage=include_usage))
                first[i] = False
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
                await resp.send(out.chunk([out.choice(i, "", [], reqs[i].gen.finish_reason, False, False)],
                                          with_usage=include_usage))
            elif isinstance(item, Exception):
                live -= 1
                kind = "service_unavailable" if isinstance(item, RingUnavailable) else "invalid_request_error"
                await resp.send(json.dumps({"error": {"message": str(item), "type": kind}}))
            elif item.text or reqs[i].gen.params.logprobs >= 0:
                await resp.send(out.chunk([out.choice(i, item.text, [item], None, first[i], False)],
                                          with_usage=include_usage))
                first[i] = False
        if include_usage:
            await resp.send(out.chunk([], out.usage(), with_usage=True))
        await resp.send("[DONE]")
    finally:
        for p in pumps:
            p.cancel()


def _lp_chat(tok: Tokenizer, deltas: list[Delta]) -> dict[str, Any]:
    def entry(tid: int, lp: float) -> dict[str, Any]:
        t = tok.decode([tid])
        return {"token": t, "logprob": lp, "bytes": list(t.encode())}

    return {"content": [{**entry(d.token, d.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in d.top_logprobs]} for d in deltas]}


def tool_call_json(c: ToolCallDelta, streamed: bool = False) -> dict[str, Any]:
    """A call in OpenAI's shape (a streamed one carries its index)."""
    out: dict[str, Any] = {"index": c.index} if streamed else {}
    return {**out, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


class ChatOutput:
    """A chat run (apps/chat.py) as /v1/chat/completions answers: whole, or as chunks whose deltas carry
    text, then each tool call once complete, then the finish reason."""

    def __init__(self, run: ChatRun, tok: Tokenizer, model: str):
        self.run, self.tok, self.model = run, tok, model
        self.id = "chatcmpl-" + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.logprobs = [r.gen.params.logprobs >= 0 for r in run.reqs]

    def usage(self) -> dict[str, Any]:
        u = self.run.usage()
        return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
                "total_tokens": u["total_tokens"], "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]}}

    async def _choice(self, i: int) -> dict[str, Any]:
        text, calls, finish = "", [], "stop"
        async for ev in self.run.events(i):
            if isinstance(ev, TextDelta):
                text += ev.text
            elif isinstance(ev, ToolCallDelta):
                calls.append(tool_call_json(ev))
            else:
                finish = ev.reason
        if calls:  # the text around calls is what the model said besides them, if anything
            text = text.strip()
        msg: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            msg["tool_calls"] = calls
        lp = _lp_chat(self.tok, self.run.reqs[i].deltas) if self.logprobs[i] else None
        return {"index": i, "message": msg, "logprobs": lp, "finish_reason": finish}

    async def final(self) -> dict[str, Any]:
        choices = await asyncio.gather(*(self._choice(i) for i in range(len(self.run.reqs))))
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": list(choices), "usage": self.usage(), "system_fingerprint": None}

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None,
              with_usage: bool = False) -> str:
        payload: dict[str, Any] = {"id": self.id, "created": self.created, "model": self.model,
                                   "object": "chat.completion.chunk", "choices": choices,
                                   "system_fingerprint": None}
        if with_usage:
            payload["usage"] = usage
        return json.dumps(payload)

    def delta(self, i: int, ev: Event) -> dict[str, Any]:
        """One event of choice i as a streamed choice."""
        c: dict[str, Any] = {"index": i, "delta": {}, "logprobs": None, "finish_reason": None}
        if isinstance(ev, TextDelta):
            c["delta"] = {"content": ev.text} if ev.text else {}
            if self.logprobs[i]:
                c["logprobs"] = _lp_chat(self.tok, ev.tokens)
        elif isinstance(ev, ToolCallDelta):
            c["delta"] = {"tool_calls": [tool_call_json(ev, streamed=True)]}
        else:
            c["finish_reason"] = ev.reason
        return c

    async def stream(self, request: web.Request, include_usage: bool) -> EventSourceResponse:
        """As `stream` does for text completions: SSE chunks, then `data: [DONE]`; a failed choice sends
        an OpenAI-shaped error event and the others go on."""
        try:
            async with sse_response(request, sep="\n", allow_all_methods=True) as resp:
                await self._send_all(resp, include_usage)
        except TimeoutError:
            raise ConnectionResetError("the client stopped reading the stream") from None
        return resp

    async def _send_all(self, resp: EventSourceResponse, include_usage: bool) -> None:
        n = len(self.run.reqs)
        queue: asyncio.Queue[tuple[int, Event | Exception | None]] = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for ev in self.run.events(i):
                    await queue.put((i, ev))
            except Exception as e:  # noqa: BLE001 -- a failed choice is reported in the stream
                await queue.put((i, e))
                return
            await queue.put((i, None))

        pumps = [asyncio.ensure_future(pump(i)) for i in range(n)]
        live = n
        try:
            for i in range(n):  # the role comes first, as OpenAI sends it
                first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}
                await resp.send(self.chunk([first], with_usage=include_usage))
            while live:
                i, item = await queue.get()
                if item is None:
                    live -= 1
                elif isinstance(item, Exception):
                    live -= 1
                    kind = "service_unavailable" if isinstance(item, RingUnavailable) else "invalid_request_error"
                    await resp.send(json.dumps({"error": {"message": str(item), "type": kind}}))
                elif isinstance(item, Finish) or item.__class__ is ToolCallDelta or \
                        (isinstance(item, TextDelta) and (item.text or self.logprobs[i])):
                    await resp.send(self.chunk([self.delta(i, item)], with_usage=include_usage))
            if include_usage:
                await resp.send(self.chunk([], self.usage(), with_usage=True))
            await resp.send("[DONE]")
        finally:
            for p in pumps:
                p.cancel()
