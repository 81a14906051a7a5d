"""Tool calling and structured output through the official `openai` client against one real torch peer
(the embedded SmolLM2, whose template knows no tools: they go Hermes style into the system prompt)."""

from __future__ import annotations

import json

import jsonschema
import pytest

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather of a city",
                                             "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit"], "additionalProperties": False}}}
DIGITS = {"type": "integer", "minimum": 0, "maximum": 99}
ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": DIGITS, "b": DIGITS}, "required": ["a", "b"],
    "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def oa(api_peer):
    """The package's one torch peer (tests/apps/conftest.py), shared with /v1/messages and /v1/responses."""
    from openai import OpenAI

    return OpenAI(base_url=f"{api_peer.api}/v1", api_key="x", max_retries=0, timeout=120)


def test_a_forced_call_has_valid_arguments_streamed_and_not(oa):
    kw = dict(model=MODEL, messages=ASK, tools=[WEATHER, ADD], temperature=1.0, max_tokens=60, seed=3,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = oa.chat.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None, c
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    calls: dict[int, dict] = {}
    finish = None
    for chunk in oa.chat.completions.create(**{**kw, "tool_choice": "required", "temperature": 0},
                                            stream=True):
        ch = chunk.choices[0]
        for d in ch.delta.tool_calls or []:
            got = calls.setdefault(d.index, {"name": "", "arguments": ""})
            got["name"] += d.function.name or ""
            got["arguments"] += d.function.arguments or ""
        finish = ch.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1, calls
    got = calls[0]
    tool = {"get_weather": WEATHER, "add": ADD}[got["name"]]
    jsonschema.validate(json.loads(got["arguments"]), tool["function"]["parameters"])


def test_a_tool_conversation_continues_to_a_text_answer(oa):
    asked = oa.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=1)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "c"}'}}
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees."}]
    r = oa.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                   temperature=0, max_tokens=12)
    c = r.choices[0]
    assert c.message.tool_calls is None and c.message.content and c.finish_reason in ("stop", "length")
    # auto: whatever the model says is parsed; it is either text or well-formed calls of the given tools
    r = oa.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=16)
    c = r.choices[0]
    assert r.usage.prompt_tokens > asked.usage.prompt_tokens + 20  # the call and its result are in the prompt
    if c.finish_reason == "tool_calls":
        for t in c.message.tool_calls:
            jsonschema.validate(json.loads(t.function.arguments), WEATHER["function"]["parameters"])
    else:
        assert c.message.content and "<tool_call>" not in c.message.content


def test_tool_choice_none_answers_in_text_like_no_tools(oa):
    kw = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=16)
    plain = oa.chat.completions.create(**kw).choices[0].message.content
    none = oa.chat.completions.create(**kw, tools=[WEATHER], tool_choice="none").choices[0]
    assert none.message.content == plain and none.message.tool_calls is None


def test_unknown_named_tool_and_bad_schema_are_400s(oa):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],
                                   tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert e.value.body["param"] == "tool_choice" and "get_time" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=MODEL, messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
                "a": {"type": "frobnicate"}}}}})
    assert e.value.body["param"] == "response_format"


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10}, "kind": {"enum": ["cat", "dog"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    "owner": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["age"],
              "additionalProperties": False}},
    "required": ["name", "kind", "tags", "owner"], "additionalProperties": False}


def test_response_format_json_schema_through_the_client_validates(oa):
    r = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe a pet."}],
                                   temperature=1.0, max_tokens=90, n=2, seed=1, response_format={
                                       "type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA,
                                                                              "strict": True}})
    for c in r.choices:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    tiny = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
            "additionalProperties": False}
    text = ""
    for chunk in oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Is water wet?"}],
                                            max_tokens=20, temperature=1.0, seed=2, stream=True, response_format={
                                                "type": "json_schema", "json_schema": {"name": "t", "schema": tiny}}):
        text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    jsonschema.validate(json.loads(text), tiny)


def test_plain_completions_take_a_regex_response_format(oa):
    import re

    r = oa.completions.create(model=MODEL, prompt="My PIN is", max_tokens=8, temperature=1.0, seed=5,
                              extra_body={"response_format": {"type": "regex", "regex": "[0-9]{4}"}})
    assert re.fullmatch("[0-9]{4}", r.choices[0].text) and r.choices[0].finish_reason == "stop", r.choices[0]
