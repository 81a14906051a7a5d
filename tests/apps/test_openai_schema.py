"""The request schema of the OpenAI endpoints, without a ring: what passes, what it becomes, and the
400 (message, param, code) of what does not."""

from __future__ import annotations

import pytest

from apps.openai_schema import ChatBody, CompletionBody, InvalidRequest, parse

MODEL = "smollm2-135m"
HI = [{"role": "user", "content": "hi"}]


def chat(**kw):
    return {"model": MODEL, "messages": HI, **kw}


def text(**kw):
    return {"model": MODEL, "prompt": "x", **kw}


def test_defaults_and_values_become_sampling_params():
    p = parse(ChatBody, chat()).sampling()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.logprobs, p.stop, p.seed) == \
        (1.0, 1.0, 0, 256, -1, [], None)
    assert parse(CompletionBody, text()).sampling().max_tokens == 16
    b = parse(ChatBody, chat(temperature=0, top_p=0, stop="x", max_tokens=9, max_completion_tokens=3, seed=-5,
                             n=None, logprobs=True, top_logprobs=2, stream=True,
                             stream_options={"include_usage": True}, best_of=1,
                             response_format={"type": "text"}, tools=[], metadata={"a": 1}))
    p = b.sampling()
    assert (p.temperature, p.top_p, p.stop, p.max_tokens, p.seed, p.logprobs) == (0.0, 1e-9, ["x"], 3, -5, 2)
    assert b.n == 1 and b.include_usage
    assert parse(CompletionBody, text(logprobs=0)).sampling().logprobs == 0
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    b = parse(ChatBody, chat(messages=[{"role": "developer", "content": parts, "name": "x"}]))
    assert [m.for_template() for m in b.messages] == [{"role": "system", "content": "ab"}]


@pytest.mark.parametrize("prompt, want", [
    ("ab", [[97, 98]]), (["a", "b"], [[97], [98]]), ([5, 6], [[5, 6]]), ([[1], [2, 3]], [[1], [2, 3]])])
def test_prompts_of_every_shape_become_token_lists(prompt, want):
    assert parse(CompletionBody, text(prompt=prompt)).token_prompts(lambda s: [ord(c) for c in s]) == want


BAD = [
    (ChatBody, {"messages": HI}, "'model' is required", "model", None),
    (ChatBody, chat(model=5), "'model' must be a string", "model", None),
    (ChatBody, chat(temperature="hot"), "'temperature' must be a number", "temperature", None),
    (ChatBody, chat(temperature=True), "'temperature' must be a number", "temperature", None),
    (ChatBody, chat(temperature=7), "'temperature' must be between 0 and 2", "temperature", None),
    (ChatBody, chat(temperature=float("nan")), "'temperature' must be between", "temperature", None),
    (ChatBody, chat(max_tokens=0), "'max_tokens' must be at least 1", "max_tokens", None),
    (ChatBody, chat(max_tokens=2.5), "'max_tokens' must be an integer", "max_tokens", None),
    (ChatBody, chat(n=True), "'n' must be an integer", "n", None),
    (ChatBody, chat(n=17), "'n' must be between 1 and 16", "n", None),
    (ChatBody, chat(top_k=2**31), "'top_k' must be between", "top_k", None),
    (ChatBody, chat(stop=[1, 2]), "'stop' must be a string or a list of at most 4 strings", "stop", None),
    (ChatBody, chat(stop=["a"] * 5), "at most 4", "stop", None),
    (ChatBody, chat(stream="yes"), "'stream' must be a boolean", "stream", None),
    (ChatBody, chat(stream=None), "'stream' must be a boolean", "stream", None),
    (ChatBody, chat(stream_options={}), "needs 'stream': true", "stream_options", None),
    (ChatBody, chat(top_logprobs=3), "'top_logprobs' needs 'logprobs': true", "top_logprobs", None),
    (ChatBody, chat(logprobs=1), "'logprobs' must be a boolean", "logprobs", None),
    (ChatBody, chat(user=5), "'user' must be a string", "user", None),
    (ChatBody, chat(tools="f"), "'tools' must be a list", "tools", None),
    (ChatBody, chat(functions=[{"name": "f"}]), "send 'tools'", "functions", "unsupported_parameter"),
    (CompletionBody, text(tools=[{"type": "function"}]), "tool calling on /v1/completions", "tools",
     "unsupported_parameter"),
    (ChatBody, chat(best_of=2), "'best_of' is not supported", "best_of", "unsupported_parameter"),
    (ChatBody, chat(frobnicate=1, temperature="hot"), "unknown parameter 'frobnicate'", "frobnicate",
     "unknown_parameter"),
    (ChatBody, chat(frobnicate=1, echo=True), "'echo' is not supported", "echo", "unsupported_parameter"),
    (ChatBody, chat(messages=[]), "'messages' must be a non-empty list", "messages", None),
    (ChatBody, chat(messages="hi"), "'messages' must be a non-empty list", "messages", None),
    (ChatBody, chat(messages=[5]), "messages[0] must be an object", "messages", None),
    (ChatBody, chat(messages=[{"role": "tool", "content": "x"}]), "tool_call_id is required", "messages", None),
    (ChatBody, chat(messages=[*HI, {"role": "user", "content": 5}]), "messages[1].content must be", "messages",
     None),
    (ChatBody, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
     "parts of type 'image_url' are not supported", "messages", None),
    (ChatBody, chat(messages=[{"role": "assistant", "content": "", "tool_calls": [{}]}]), "tool_calls must be",
     "messages", None),
    (CompletionBody, text(prompt=42), "'prompt' must be a string, a list of strings, or token ids", "prompt",
     None),
    (CompletionBody, text(prompt=[[1], []]), "'prompt'", "prompt", None),
    (CompletionBody, text(prompt=[True]), "'prompt'", "prompt", None),
    (CompletionBody, {"model": MODEL}, "'prompt'", "prompt", None),
    (CompletionBody, text(logprobs=9), "'logprobs' must be between 0 and 5", "logprobs", None),
]


@pytest.mark.parametrize("kind, body, message, param, code", BAD)
def test_a_bad_body_is_one_clear_error_naming_the_parameter(kind, body, message, param, code):
    with pytest.raises(InvalidRequest) as e:
        parse(kind, body)
    assert message in str(e.value), str(e.value)
    assert (e.value.param, e.value.code) == (param, code), (str(e.value), e.value.param)
