"""The request bodies of /v1/chat/completions and /v1/completions as pydantic models. A body that
does not fit becomes one OpenAI-shaped 400 naming the parameter (`InvalidRequest`)."""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, TypeVar

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      model_validator)
from pydantic_core import ErrorDetails, PydanticCustomError

from backends.sampling import SamplingParams


class InvalidRequest(Exception):
    """A body that breaks the schema: answered 400 invalid_request_error."""

    def __init__(self, message: str, param: str | None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def _range(lo: float, hi: float | None = None) -> AfterValidator:
    def check(v: float) -> float:
        if v != v or v < lo or (hi is not None and v > hi):  # v != v: NaN
            rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise PydanticCustomError("out_of_range", "must be {rng}, got {got}", {"rng": rng, "got": v})
        return v

    return AfterValidator(check)


def _refused(what: str, allowed: Callable[[Any], bool] = lambda v: False) -> AfterValidator:
    """A field a sampling server cannot honour: refused, never silently ignored (its off values pass)."""

    def check(v: Any) -> None:
        if v is None or v is False or v == [] or allowed(v):
            return None
        raise PydanticCustomError("unsupported_parameter", "is not supported: this server does not do {what}",
                                  {"what": what})

    return AfterValidator(check)


def _stop(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not (isinstance(v, list) and all(isinstance(x, str) for x in v)) or len(v) > 4:
        raise PydanticCustomError("stop_type", "must be a string or a list of at most 4 strings")
    return v


def _text(v: Any) -> Any:
    """A message's content: a string, or a list of text parts joined into one (None: checked by the
    message, since only an assistant message with tool calls may leave it out)."""
    if v is None:
        return None
    if isinstance(v, list):
        for p in v:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise PydanticCustomError("content_part", ": parts of type {kind} are not supported (text only)",
                                          {"kind": repr(kind)})
        return "".join(p["text"] for p in v)
    if not isinstance(v, str):
        raise PydanticCustomError("content_type", "must be a string or a list of text parts")
    return v


def _role(v: Any) -> Any:
    if v not in ("system", "developer", "user", "assistant", "tool"):
        raise PydanticCustomError("role", "needs to be system, developer, user, assistant or tool")
    return v


def _tool_calls(v: Any) -> Any:
    """An assistant message's calls, as OpenAI sends them back: id, type function, name, arguments text."""
    if v is None or v == []:
        return None
    if not isinstance(v, list):
        raise PydanticCustomError("tool_calls", "must be a list of tool calls")
    for c in v:
        fn = c.get("function") if isinstance(c, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and
                isinstance(fn.get("arguments", ""), (str, dict)) and c.get("type", "function") == "function"):
            raise PydanticCustomError("tool_calls", "must be a list of {shape}", {
                "shape": '{"id", "type": "function", "function": {"name", "arguments"}}'})
    return [{"id": str(c.get("id") or f"call_{i}"), "type": "function",
             "function": {"name": c["function"]["name"], "arguments": c["function"].get("arguments") or "{}"}}
            for i, c in enumerate(v)]


def _response_format(v: Any) -> Any:
    """Its shape only; whether the schema/regex/grammar compiles is backends.constrain's call (a 400 too)."""
    if v is None:
        return None
    kinds = ("text", "json_object", "json_schema", "regex", "grammar")
    if not isinstance(v, dict) or v.get("type") not in kinds:
        raise PydanticCustomError("response_format", "must be an object with 'type' one of {kinds}",
                                  {"kinds": ", ".join(kinds)})
    if v["type"] == "json_schema" and not isinstance(v.get("json_schema"), dict):
        raise PydanticCustomError("response_format", "of type json_schema needs 'json_schema': {shape}",
                                  {"shape": '{"name", "schema": {...}, "strict"}'})
    return v


def _tools(v: Any) -> Any:
    """Its shape only; apps/tools.py checks each function (names, parameters) with errors naming it."""
    if v is None or v == []:
        return None
    if not isinstance(v, list) or not all(isinstance(t, dict) for t in v):
        raise PydanticCustomError("tools", "must be a list of {shape}",
                                  {"shape": '{"type": "function", "function": {"name", "parameters"}}'})
    return v


def _non_empty_list(v: Any) -> Any:
    if not isinstance(v, list) or not v:
        raise PydanticCustomError("non_empty_list", "must be a non-empty list")
    return v


def _prompt(v: Any) -> Any:
    def ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    ok = isinstance(v, str) or (isinstance(v, list) and bool(v) and (
        all(isinstance(x, str) for x in v) or ids(v) or all(ids(x) for x in v)))
    if not ok:
        raise PydanticCustomError("prompt_type", "must be a string, a list of strings, or token ids")
    return v


def _model_name(v: str) -> str:
    if not v:
        raise PydanticCustomError("model_required", "is required (GET /v1/models lists them)")
    return v


Ignored = Any  # accepted for compatibility with OpenAI clients, and ignored
Positive = Annotated[int, _range(1)]
# sampling numbers given as null take their defaults
_NULL_IS_DEFAULT = {"n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty"}


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Annotated[Literal["system", "developer", "user", "assistant", "tool"], BeforeValidator(_role)]
    content: Annotated[str | None, BeforeValidator(_text)] = None
    tool_calls: Annotated[list[dict[str, Any]] | None, BeforeValidator(_tool_calls)] = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_unless_calls(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError("content_missing", ".content is required (only an assistant message with "
                                      "tool_calls may leave it out)")
        if self.tool_calls and self.role != "assistant":
            raise PydanticCustomError("tool_calls_role", ".tool_calls belong on assistant messages only")
        if self.role == "tool" and not self.tool_call_id:
            raise PydanticCustomError("tool_call_id", ".tool_call_id is required on a tool message (the id of "
                                      "the call it answers)")
        return self

    def for_template(self) -> dict[str, Any]:
        m: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.content}
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        if self.tool_call_id:
            m["tool_call_id"] = self.tool_call_id
        return m


class _Body(BaseModel):
    """What both endpoints take; the fields a sampling server cannot honour come first."""

    model_config = ConfigDict(strict=True, extra="forbid")

    tools: Annotated[Any, _refused("tool calling on /v1/completions (use /v1/chat/completions)")] = None
    tool_choice: Annotated[Any, _refused("tool calling on /v1/completions (use /v1/chat/completions)")] = None
    functions: Annotated[Any, _refused("the legacy 'functions' (send 'tools')")] = None
    function_call: Annotated[Any, _refused("the legacy 'function_call' (send 'tool_choice')")] = None
    parallel_tool_calls: Annotated[Any, _refused("tool calling on /v1/completions")] = None
    audio: Annotated[Any, _refused("audio output")] = None
    modalities: Annotated[Any, _refused("non-text modalities")] = None
    prediction: Annotated[Any, _refused("predicted outputs")] = None
    logit_bias: Annotated[Any, _refused("logit_bias")] = None
    response_format: Annotated[dict[str, Any] | None, BeforeValidator(_response_format)] = None
    web_search_options: Annotated[Any, _refused("web search")] = None
    suffix: Annotated[Any, _refused("suffix (fill-in-the-middle)")] = None
    best_of: Annotated[Any, _refused("best_of", lambda v: v == 1)] = None
    echo: Annotated[Any, _refused("echo")] = None

    model: Annotated[str, AfterValidator(_model_name)] = Field("", validate_default=True)
    n: Annotated[int, _range(1, 16)] = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: Annotated[list[str], BeforeValidator(_stop)] = []
    max_completion_tokens: Positive | None = None
    max_tokens: Positive = 256
    temperature: Annotated[float, _range(0, 2)] = 1.0
    top_p: Annotated[float, _range(0, 1)] = 1.0
    top_k: Annotated[int, _range(0, 2**31 - 1)] = 0  # int32 on the wire
    min_p: Annotated[float, _range(0, 0.999)] = 0.0
    repetition_penalty: Annotated[float, _range(0.01, 10)] = 1.0
    presence_penalty: Annotated[float, _range(-2, 2)] = 0.0
    frequency_penalty: Annotated[float, _range(-2, 2)] = 0.0
    seed: Annotated[int, _range(-(2**63), 2**63 - 1)] | None = None
    ignore_eos: bool = False
    draft: bool = True  # false: no speculative decoding for this request (same answer, one token a trip)
    user: str | None = None
    metadata: Ignored = None
    store: Ignored = None
    service_level: Ignored = None
    service_tier: Ignored = None
    reasoning_effort: Ignored = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in _NULL_IS_DEFAULT}
        return data

    @model_validator(mode="after")
    def _options_need_a_stream(self) -> _Body:
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("stream_options", "must be an object and needs 'stream': true",
                                      {"param": "stream_options"})
        return self

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def _sampling(self, logprobs: int) -> SamplingParams:
        mct = self.max_completion_tokens
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p or 1e-9, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed,
            max_tokens=self.max_tokens if mct is None else mct, stop=[x for x in self.stop if x],
            logprobs=logprobs, ignore_eos=self.ignore_eos)


class ChatBody(_Body):
    """POST /v1/chat/completions."""

    messages: Annotated[list[Message], BeforeValidator(_non_empty_list)]
    tools: Annotated[list[dict[str, Any]] | None, BeforeValidator(_tools)] = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # forced calls are one call; 'auto' parses every call it finds
    logprobs: bool | None = None
    top_logprobs: Annotated[int, _range(0, 20)] | None = None
    prompt: Ignored = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatBody:
        if self.top_logprobs is not None and not self.logprobs:
            raise PydanticCustomError("top_logprobs", "needs 'logprobs': true", {"param": "top_logprobs"})
        return self

    def sampling(self) -> SamplingParams:
        return self._sampling((self.top_logprobs or 0) if self.logprobs else -1)


class CompletionBody(_Body):
    """POST /v1/completions."""

    prompt: Annotated[str | list[str] | list[int] | list[list[int]], BeforeValidator(_prompt)]
    max_tokens: Positive = 16
    logprobs: Annotated[int, _range(0, 5)] | None = None
    messages: Ignored = None
    top_logprobs: Ignored = None

    def token_prompts(self, encode: Callable[[str], list[int]]) -> list[list[int]]:
        """One list of token ids per prompt."""
        p = self.prompt
        if isinstance(p, str):
            return [encode(p)]
        if all(isinstance(x, int) for x in p):
            return [[x for x in p if isinstance(x, int)]]
        return [encode(x) if isinstance(x, str) else list(x) for x in p if not isinstance(x, int)]

    def sampling(self) -> SamplingParams:
        return self._sampling(-1 if self.logprobs is None else self.logprobs)


_TYPES = {"int_type": "must be an integer", "float_type": "must be a number", "bool_type": "must be a boolean",
          "string_type": "must be a string", "dict_type": "must be an object", "model_type": "must be an object",
          "list_type": "must be a list", "missing": "is required"}
# which error a body with several is answered with: refused, then unknown parameters, first (as before)
_RANK = {"unsupported_parameter": 0, "extra_forbidden": 1}


def _describe(err: ErrorDetails) -> InvalidRequest:
    loc = err["loc"]
    param = (err.get("ctx") or {}).get("param") or (str(loc[0]) if loc else None)
    if err["type"] == "extra_forbidden":
        return InvalidRequest(f"unknown parameter '{param}'", param, "unknown_parameter")
    where = f"'{param}'" if len(loc) < 2 else str(param) + "".join(
        f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc[1:])
    text = _TYPES.get(err["type"]) or err["msg"].replace("Input should", "should")
    code = "unsupported_parameter" if err["type"] == "unsupported_parameter" else None
    return InvalidRequest(where + ("" if text.startswith(":") else " ") + text, param, code)


B = TypeVar("B", bound=_Body)


def parse(kind: type[B], body: dict[str, Any]) -> B:
    """The body as a `kind`, or InvalidRequest naming the first parameter that breaks the schema."""
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        raise _describe(min(e.errors(include_url=False), key=lambda x: _RANK.get(x["type"], 2))) from None
