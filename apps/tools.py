"""Tool calling per model family: how the tools reach the prompt, how a call looks in the output, the
grammar that forces one, and the parser that finds calls in text (whole or streamed).

Families (by the chat template): Hermes style `<tool_call>{json}</tool_call>` (Qwen2/2.5, Hermes,
and our fallback for templates without tools, e.g. SmolLM2), Llama 3.x (a bare JSON object
`{"name", "parameters"}`, maybe after `<|python_tag|>`), Mistral (`[TOOL_CALLS] [{"name", "arguments"}]`).
A template that knows tools renders them itself; otherwise they go into the system prompt Hermes style."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from apps.openai_schema import InvalidRequest
from backends.tokenizer import Tokenizer

HERMES, LLAMA3, MISTRAL = "hermes", "llama3", "mistral"
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG, _MISTRAL_TAG = "<|python_tag|>", "[TOOL_CALLS]"


@dataclass
class ToolCall:
    index: int
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])


def detect_family(tok: Tokenizer) -> str:
    """The tool format a model was trained on, read off its chat template (Hermes when it has none)."""
    t = tok.chat_template_text
    if _MISTRAL_TAG in t:
        return MISTRAL
    if _OPEN in t:
        return HERMES
    if _PYTHON_TAG in t or ("<|start_header_id|>" in t and "tools" in t):
        return LLAMA3
    return HERMES


def _tool_functions(tools: Any) -> list[dict[str, Any]]:
    """The `function` objects of OpenAI chat tools, checked (400 naming the fix otherwise)."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be a list of {\"type\": \"function\", \"function\": {...}}", "tools")
    out, seen = [], set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise InvalidRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", "
                                 f"\"parameters\"}}}} (only function tools are supported)", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise InvalidRequest(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'", "tools")
        if name in seen:
            raise InvalidRequest(f"tools[{i}]: the function name {name!r} is used twice", "tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise InvalidRequest(f"tools[{i}].function.description must be a string", "tools")
        seen.add(name)
        out.append({"name": name, **({"description": desc} if desc else {}),
                    "parameters": params if params is not None else {"type": "object", "properties": {}}})
    return out


@dataclass
class ToolPlan:
    """What a request's tools and tool_choice mean for rendering, constraining and parsing."""

    family: str
    functions: list[dict[str, Any]]
    choice: str  # "auto" | "none" | "required" | "function"
    named: str = ""  # the function tool_choice names

    @property
    def names(self) -> set[str]:
        return {f["name"] for f in self.functions}

    @property
    def render_tools(self) -> bool:
        """tool_choice "none": the model answers in text, as OpenAI's does, so the tools stay out of the
        prompt (a small model shown tools calls them regardless)."""
        return bool(self.functions) and self.choice != "none"

    @property
    def parse(self) -> bool:
        return self.render_tools

    @property
    def forced(self) -> bool:
        return self.render_tools and self.choice in ("required", "function")

    def grammar(self) -> str:
        """Lark grammar (llguidance, `%json` for the arguments) of exactly one call in the family's format,
        so the arguments always validate against the tool's schema."""
        fns = [f for f in self.functions if self.choice != "function" or f["name"] == self.named]
        key = "parameters" if self.family == LLAMA3 else "arguments"
        alts = [{"type": "object", "properties": {"name": {"const": f["name"]}, key: f["parameters"]},
                 "required": ["name", key], "additionalProperties": False} for f in fns]
        schema: dict[str, Any] = dict(alts[0]) if len(alts) == 1 else {"anyOf": alts}
        # compact JSON and no free whitespace: a sampled model cannot wander off into endless newlines
        schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        if self.family == LLAMA3:
            body = "call"
        elif self.family == MISTRAL:
            body = '"[" call "]"'
        else:
            body = f"{json.dumps(_OPEN + chr(10))} call {json.dumps(chr(10) + _CLOSE)}"
        return f"start: {body}\ncall: %json {json.dumps(schema)}\n"


def plan_tools(tools: Any, tool_choice: Any, family: str) -> ToolPlan:
    """Checks tools and tool_choice together (400s as OpenAI words them)."""
    fns = _tool_functions(tools)
    named = ""
    if tool_choice is None:
        choice = "auto"
    elif isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise InvalidRequest("'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\", "
                                 "\"function\": {\"name\": ...}}", "tool_choice")
        choice = tool_choice
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict) \
            and isinstance(tool_choice["function"].get("name"), str):
        choice, named = "function", tool_choice["function"]["name"]
    else:
        raise InvalidRequest("'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\", "
                             "\"function\": {\"name\": ...}}", "tool_choice")
    if choice in ("required", "function") and not fns:
        raise InvalidRequest("'tool_choice' needs 'tools': give the functions the model may call", "tool_choice")
    if choice == "function" and named not in {f["name"] for f in fns}:
        raise InvalidRequest(f"tool_choice names the function {named!r}, which is not in 'tools' "
                             f"({', '.join(f['name'] for f in fns)})", "tool_choice")
    return ToolPlan(family, fns, choice, named)


# --- rendering -----------------------------------------------------------------------------------

def hermes_system(functions: list[dict[str, Any]]) -> str:
    """The Hermes/Qwen instruction that lists the tools, for templates that cannot render them."""
    listed = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{listed}\n</tools>\n\nFor each function call, return a json object with function name and "
            "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _args_object(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


def _hermes_call(call: dict[str, Any]) -> str:
    fn = call.get("function") or {}
    body = {"name": fn.get("name"), "arguments": _args_object(fn.get("arguments", "{}"))}
    return f"{_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{_CLOSE}"


def hermes_messages(messages: list[dict[str, Any]], functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that knows no tools: the tool list joins the system prompt, an assistant's
    calls become `<tool_call>` text, and tool results a user turn of `<tool_response>`s (as Qwen2.5 does)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_hermes_call(c) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (content + "\n" if content else "") + calls})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        else:
            out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool", None)
    if functions:
        tools = hermes_system(functions)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + tools}
        else:
            out.insert(0, {"role": "system", "content": tools})
    return out


def _mistral_id(call_id: str) -> str:
    """Mistral's templates refuse call ids that are not 9 letters or digits: the same id maps to the same."""
    return call_id if re.fullmatch(r"[A-Za-z0-9]{9}", call_id) else \
        hashlib.sha1(call_id.encode()).hexdigest()[:9]


def native_messages(messages: list[dict[str, Any]], family: str = HERMES) -> list[dict[str, Any]]:
    """Messages for a template that renders tools itself: transformers' templates want a call's
    arguments as an object, not JSON text."""
    out = []
    fix = _mistral_id if family == MISTRAL else (lambda i: i)
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "id": fix(str(c.get("id", ""))), "function": {**c["function"], "arguments":
                               _args_object(c["function"].get("arguments", "{}"))}} for c in m["tool_calls"]]
        if m.get("tool_call_id"):
            m["tool_call_id"] = fix(str(m["tool_call_id"]))
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out


def render(tok: Tokenizer, messages: list[dict[str, Any]], plan: ToolPlan) -> list[int]:
    """Token ids of the conversation and its tools, through the model's template where it knows tools."""
    fns = plan.functions if plan.render_tools else []
    if tok.supports_tools:
        tools = [{"type": "function", "function": f} for f in fns] or None
        return tok.apply_chat(native_messages(messages, plan.family), tools=tools)
    return tok.apply_chat(hermes_messages(messages, fns))


def normalise_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """developer -> system (templates know only system)."""
    return [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]


# --- parsing -------------------------------------------------------------------------------------

def _call_of(obj: Any, index: int, names: set[str]) -> ToolCall | None:
    """A call out of a decoded JSON object, if it names one of the tools."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(index, obj["name"], json.dumps(args, ensure_ascii=False))


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_block(family: str, block: str, start: int, names: set[str]) -> list[ToolCall] | None:
    """The calls in one block of output the family's opener began (None: not well-formed calls)."""
    text = block.strip()
    if family == HERMES:
        call = _call_of(_json(text), start, names)
        return [call] if call else None
    if family == MISTRAL:
        text = text.removeprefix(_MISTRAL_TAG).strip()
        objs = _json(text)
        objs = objs if isinstance(objs, list) else [objs]
    else:  # Llama 3: one object, or several separated by ';'
        text = text.removeprefix(_PYTHON_TAG).strip()
        whole = _json(text)
        objs = whole if isinstance(whole, list) else [whole] if whole is not None else \
            [_json(p) for p in text.split(";")]
    calls = [_call_of(o, start + i, names) for i, o in enumerate(objs)]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def parse_text(family: str, text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
    """A whole answer split into its text and its well-formed calls."""
    p = StreamParser(family, names)
    events = p.push(text) + p.finish()
    return "".join(e for e in events if isinstance(e, str)), [e for e in events if isinstance(e, ToolCall)]


class StreamParser:
    """Finds calls in text as it streams: text passes through until something that may open a call;
    from there it is held until the call closes (Hermes) or the answer ends (Llama 3, Mistral, whose
    calls are the whole answer). A block that does not parse as calls is released as text."""

    def __init__(self, family: str, names: set[str]):
        self.family, self.names = family, names
        self.openers = {HERMES: [_OPEN], LLAMA3: [_PYTHON_TAG, "{"], MISTRAL: [_MISTRAL_TAG, "[{"]}[family]
        self.buf = ""  # held text
        self.block: str | None = None  # inside a call block: its text so far
        self.calls = 0
        self.seen_text = False  # a call block may only open the answer (Llama 3, Mistral)
        self.ws = ""  # whitespace held back before an open block

    def push(self, text: str) -> list[str | ToolCall]:
        self.buf += text
        out: list[str | ToolCall] = []
        while self.buf:
            if self.block is None:
                if not self._scan_text(out):
                    break
            elif not self._scan_block(out):
                break
        return out

    def _scan_text(self, out: list[str | ToolCall]) -> bool:
        """Releases text up to an opener; True when a block opened and scanning goes on."""
        if self.family != HERMES and self.seen_text:
            out.append(self.buf)
            self.buf = ""
            return False
        hits = [(self.buf.find(o), o) for o in self.openers if o in self.buf]
        if self.family != HERMES:
            lead = self.buf.lstrip()
            hits = [(len(self.buf) - len(lead), o) for o in self.openers if lead.startswith(o)]
        if hits:
            i, _ = min(hits)
            before = self.buf[:i].rstrip()
            self._text(before, out)
            self.ws = self.buf[len(before):i]  # whitespace before the call: text again if it is no call
            self.block, self.buf = "", self.buf[i:]
            return True
        hold = self._held_tail()
        self._text(self.buf[:len(self.buf) - hold], out)
        self.buf = self.buf[len(self.buf) - hold:]
        return False

    def _held_tail(self) -> int:
        """How much of the end of the buffer to hold: whitespace (dropped if a call follows), or a
        prefix of an opener."""
        if not self.buf.strip():
            return len(self.buf)
        if self.family != HERMES:
            lead = self.buf.lstrip()
            if any(o.startswith(lead) for o in self.openers):
                return len(self.buf)
            return 0
        tail = len(self.buf) - len(self.buf.rstrip())
        for o in self.openers:
            for n in range(min(len(o) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(o[:n]):
                    head = self.buf[:-n]
                    return max(tail, n + len(head) - len(head.rstrip()))
        return tail

    def _text(self, s: str, out: list[str | ToolCall]) -> None:
        if not s:
            return
        if self.calls and not s.strip():
            return  # whitespace between calls
        if s.strip():
            self.seen_text = True
        out.append(s)

    def _scan_block(self, out: list[str | ToolCall]) -> bool:
        assert self.block is not None
        if self.family != HERMES:  # the block runs to the end of the answer
            self.block += self.buf
            self.buf = ""
            return False
        self.block += self.buf
        self.buf = ""
        end = self.block.find(_CLOSE)
        if end < 0:
            return False
        body, rest = self.block[len(_OPEN):end], self.block[end + len(_CLOSE):]
        self._close(body, self.block[:end + len(_CLOSE)], out)
        self.buf = rest
        return True

    def _close(self, body: str, raw: str, out: list[str | ToolCall]) -> None:
        self.block = None
        calls = parse_block(self.family, body, self.calls, self.names)
        ws, self.ws = self.ws, ""
        if calls is None:
            self._text(ws + raw, out)
            return
        self.calls += len(calls)
        out.extend(calls)

    def finish(self) -> list[str | ToolCall]:
        """The end of the answer: a block still open is parsed whole (a model may end without closing)."""
        out: list[str | ToolCall] = []
        if self.block is not None:
            block = self.block + self.buf
            self.buf = ""
            body = block[len(_OPEN):] if self.family == HERMES else block
            if self.family == HERMES:  # cut short inside its closing tag (max_tokens): the call is whole
                tail = body.rstrip()
                for n in range(len(_CLOSE) - 1, 0, -1):
                    if tail.endswith(_CLOSE[:n]):
                        body = tail[:-n]
                        break
            self._close(body, block, out)
        if self.buf and (not self.calls or self.buf.strip()):
            out.append(self.buf)
        self.buf = ""
        return out
