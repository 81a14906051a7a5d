"""The pure translations of /v1/messages (Anthropic) and /v1/responses (OpenAI Responses) onto the chat
path: request bodies to chat messages and tools, chat events to content blocks / output items."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from apps import anthropic_api as A
from apps import responses as R
from apps.chat import Finish, TextDelta, ToolCallDelta
from apps.openai_schema import InvalidRequest
from mesh.scheduler import RingUnavailable

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_anthropic_body_becomes_chat_messages_tools_and_sampling():
    body = {"model": "m", "max_tokens": 50,
            "system": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
            "temperature": 0, "top_k": 5, "stop_sequences": ["\n\n"],
            "tools": [{"name": "weather", "description": "Weather now", "input_schema": WEATHER}],
            "tool_choice": {"type": "tool", "name": "weather"},
            "messages": [
                {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                                  {"type": "tool_use", "id": "toolu_1", "name": "weather",
                                                   "input": {"city": "Oslo"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                              "content": [{"type": "text", "text": "-3 C"}]},
                                             {"type": "text", "text": "And tomorrow?"}]}]}
    r = A.translate(body)
    assert r.chat.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "-3 C"},
        {"role": "user", "content": "And tomorrow?"}]
    assert r.chat.tools == [{"type": "function", "function": {"name": "weather", "parameters": WEATHER,
                                                                "description": "Weather now"}}]
    assert r.chat.tool_choice == {"type": "function", "function": {"name": "weather"}}
    s = r.chat.sampling
    assert (s.temperature, s.top_k, s.max_tokens, s.stop) == (0.0, 5, 50, ["\n\n"])
    assert r.stop_sequences == ["\n\n"] and r.stream is False


@pytest.mark.parametrize("tc,want", [({"type": "auto"}, "auto"), ({"type": "any"}, "required"),
                                     ({"type": "none"}, "none"), ("none", "none")])
def test_anthropic_tool_choice(tc, want):
    tools = A.chat_tools([{"name": "f", "input_schema": {"type": "object"}}])
    assert A.chat_tool_choice(tc, tools) == want


@pytest.mark.parametrize("body,needle", [
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens: field required"),
    ({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"model": "m", "max_tokens": 5, "messages": []}, "messages"),
    ({"model": "m", "max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "hi"}]},
     "temperature"),
    ({"model": "m", "max_tokens": 5, "bogus": 1, "messages": [{"role": "user", "content": "hi"}]}, "bogus"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {}}]}]}, "'image'"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "Sure"}]}, "prefill"),
    ({"model": "m", "max_tokens": 5, "tool_choice": {"type": "tool", "name": "x"},
      "tools": [{"name": "f", "input_schema": {"type": "object"}}],
      "messages": [{"role": "user", "content": "hi"}]}, "tool_choice.name"),
    ({"model": "m", "max_tokens": 5, "tools": [{"name": "f"}], "messages": [{"role": "user", "content": "hi"}]},
     "input_schema"),
])
def test_anthropic_bad_bodies_are_400_invalid_request_naming_the_field(body, needle):
    with pytest.raises(A.AnthropicError) as e:
        A.translate(body)
    status, out = A.error_json(e.value)
    assert status == 400 and out["type"] == "error" and out["error"]["type"] == "invalid_request_error"
    assert needle in out["error"]["message"]


def test_anthropic_error_shapes_of_other_errors():
    from apps.api import ApiError

    assert A.error_json(ApiError(404, "the model 'x' does not exist here"))[0] == 404
    assert A.error_json(ApiError(404, "no"))[1]["error"]["type"] == "not_found_error"
    assert A.error_json(ApiError(429, "queue full"))[1]["error"]["type"] == "rate_limit_error"
    assert A.error_json(RingUnavailable("ring down")) == (
        529, {"type": "error", "error": {"type": "overloaded_error", "message": "ring down"}})
    assert A.error_json(InvalidRequest("bad schema", "tools"))[1]["error"]["type"] == "invalid_request_error"
    status, body = A.error_json(ValueError("a bug"))
    assert status == 500 and body["error"]["type"] == "api_error" and "a bug" not in body["error"]["message"]


def test_anthropic_blocks_and_stream_events_in_order():
    b = A.Blocks()
    events = []
    for ev in (TextDelta("Let me "), TextDelta(""), TextDelta("check."),
               ToolCallDelta(0, "call_1", "weather", '{"city": "Oslo"}'), Finish("tool_calls")):
        events += b.add(ev)
    assert [n for n, _ in events] == ["content_block_start", "content_block_delta", "content_block_delta",
                                      "content_block_stop", "content_block_start", "content_block_delta",
                                      "content_block_stop"]
    assert [d["index"] for _, d in events] == [0, 0, 0, 0, 1, 1, 1]
    assert events[4][1]["content_block"] == {"type": "tool_use", "id": "call_1", "name": "weather", "input": {}}
    assert json.loads(events[5][1]["delta"]["partial_json"]) == {"city": "Oslo"}
    assert b.content == [{"type": "text", "text": "Let me check."},
                         {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Oslo"}}]
    assert A.stop_reason(b.reason, None) == "tool_use"
    assert A.stop_reason("length", None) == "max_tokens" and A.stop_reason("stop", None) == "end_turn"
    assert A.stop_reason("stop", "###") == "stop_sequence"
    assert A.tool_input("not json") == {"arguments": "not json"}


class _Tok:
    eos_ids = {0}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def _run(text: str, eos: bool) -> SimpleNamespace:
    toks = [ord(c) for c in text] + ([0] if eos else [])
    gen = SimpleNamespace(tokens=toks, tok=_Tok(), params=SimpleNamespace(stop_token_ids=[]))
    return SimpleNamespace(reqs=[SimpleNamespace(gen=gen)])


def test_anthropic_finds_which_stop_sequence_ended_the_answer():
    assert A.stop_sequence(_run("one, two ### three", eos=False), ["END", "###"]) == "###"
    assert A.stop_sequence(_run("a END b ###", eos=False), ["###", "END"]) == "END"  # the first to end
    assert A.stop_sequence(_run("one ###", eos=True), ["###"]) is None  # the model's EOS ended it
    assert A.stop_sequence(_run("one", eos=False), []) is None
    assert A.usage_json({"prompt_tokens": 10, "completion_tokens": 3, "cached_tokens": 4}) == {
        "input_tokens": 6, "output_tokens": 3, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4}


def test_responses_input_items_become_chat_messages():
    body = {"model": "m", "instructions": "Be brief.", "max_output_tokens": 30, "temperature": 0, "store": True,
            "input": [{"role": "user", "content": "Weather in Oslo?"},
                      {"type": "message", "role": "assistant",
                       "content": [{"type": "output_text", "text": "Checking."}]},
                      {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city":"Oslo"}'},
                      {"type": "function_call", "call_id": "c2", "name": "weather", "arguments": '{"city":"Bergen"}'},
                      {"type": "function_call_output", "call_id": "c1", "output": "-3 C"},
                      {"type": "function_call_output", "call_id": "c2", "output": "4 C"},
                      {"role": "user", "content": [{"type": "input_text", "text": "Warmer?"}]}],
            "tools": [{"type": "function", "name": "weather", "parameters": WEATHER, "strict": True}],
            "tool_choice": {"type": "function", "name": "weather"}}
    r = R.translate(body)
    call = lambda i, c: {"id": i, "type": "function", "function": {"name": "weather", "arguments": c}}  # noqa: E731
    assert r.chat.messages == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Checking.",
         "tool_calls": [call("c1", '{"city":"Oslo"}'), call("c2", '{"city":"Bergen"}')]},
        {"role": "tool", "tool_call_id": "c1", "content": "-3 C"},
        {"role": "tool", "tool_call_id": "c2", "content": "4 C"},
        {"role": "user", "content": "Warmer?"}]
    assert r.chat.tools == [{"type": "function", "function": {"name": "weather", "parameters": WEATHER}}]
    assert r.chat.tool_choice == {"type": "function", "function": {"name": "weather"}}
    assert (r.chat.sampling.max_tokens, r.chat.sampling.temperature) == (30, 0.0)
    assert R.translate({"model": "m", "input": "Hi"}).chat.messages == [{"role": "user", "content": "Hi"}]
    assert R.translate({"model": "m", "input": "Hi"}).chat.sampling.max_tokens == R.DEFAULT_MAX_OUTPUT_TOKENS


def test_responses_text_format_becomes_response_format():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}}
    assert R.response_format(fmt) == {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema,
                                                                             "strict": True}}
    assert R.response_format({"format": {"type": "json_object"}}) == {"type": "json_object"}
    assert R.response_format({"format": {"type": "text"}}) is None and R.response_format(None) is None


@pytest.mark.parametrize("body,param,needle", [
    ({"model": "m", "input": "hi", "previous_response_id": "resp_1"}, "previous_response_id", "keeps no responses"),
    ({"model": "m"}, "input", "'input' is required"),
    ({"model": "m", "input": "hi", "frobnicate": 1}, "frobnicate", "unknown parameter"),
    ({"model": "m", "input": "hi", "tools": [{"type": "web_search"}]}, "tools", "'web_search'"),
    ({"model": "m", "input": "hi", "max_output_tokens": 0}, "max_output_tokens", "at least 1"),
    ({"model": "m", "input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}},
     "text.format.schema", "schema"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input", "'input_image'"),
    ({"model": "m", "input": "hi", "tool_choice": "required"}, "tool_choice", "needs 'tools'"),
])
def test_responses_bad_bodies_name_the_parameter(body, param, needle):
    with pytest.raises(InvalidRequest) as e:
        R.translate(body)
    assert e.value.param == param and needle in str(e.value)


def test_responses_items_and_stream_events():
    it = R.Items()
    events = []
    for ev in (TextDelta("Hel"), TextDelta("lo"), ToolCallDelta(0, "call_9", "f", '{"x": 1}'), Finish("tool_calls")):
        events += it.add(ev)
    assert [e["type"] for e in events] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done"]
    assert events[4]["text"] == "Hello" and events[0]["item"]["status"] == "in_progress"
    msg, call = it.output
    assert msg["content"][0]["text"] == "Hello" and msg["status"] == "completed"
    assert (call["type"], call["call_id"], call["name"]) == ("function_call", "call_9", "f")
    assert call["arguments"] == '{"x": 1}'
    assert it.status == "completed"
    cut = R.Items()
    cut.add(TextDelta("partial"))
    cut.add(Finish("length"))
    assert cut.status == "incomplete" and cut.output[0]["status"] == "incomplete"
    body = R.response_json("resp_1", 1, {"model": "m"}, cut.output, cut.status,
                           R.usage_json({"prompt_tokens": 5, "completion_tokens": 2, "cached_tokens": 0}))
    assert body["incomplete_details"] == {"reason": "max_output_tokens"} and body["store"] is False
    assert body["usage"]["total_tokens"] == 7
