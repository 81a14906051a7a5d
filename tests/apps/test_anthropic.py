"""/v1/messages and /v1/messages/count_tokens driven by the official `anthropic` client against a real
peer: the same greedy text as /v1/chat/completions, Anthropic's event order, tool use, error shapes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import jsonschema
import pytest

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
N = 24  # tokens of the greedy answers compared
GREEDY = {"temperature": 0}  # the client no longer has a temperature argument; the API still takes one
SYSTEM = "You answer in one short sentence."
MSGS = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is the largest ocean?"}]
WEATHER = {"name": "get_weather", "description": "The current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                            "required": ["city"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def client(api_peer):
    import anthropic

    return anthropic.Anthropic(base_url=api_peer.api, api_key="x", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def want(api_peer):
    """The greedy /v1/chat/completions answer to SYSTEM + MSGS: (text, finish_reason, usage)."""
    from openai import OpenAI

    oa = OpenAI(base_url=f"{api_peer.api}/v1", api_key="x", max_retries=0, timeout=300)
    r = oa.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": SYSTEM}, *MSGS],
                                   temperature=0, max_tokens=N)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage


def post(peer, path, data: bytes, headers=None) -> tuple[int, dict]:
    req = urllib.request.Request(f"{peer.api}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/json", "anthropic-version": "2023-06-01",
                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_messages_equal_chat_completions_streamed_and_not(client, want):
    want, finish, usage = want
    r = client.messages.create(model=MODEL, system=SYSTEM, messages=MSGS, max_tokens=N, extra_body=GREEDY)
    assert r.type == "message" and r.role == "assistant" and r.model == MODEL and r.id.startswith("msg_")
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == want
    assert r.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[finish] and r.stop_sequence is None
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == usage.prompt_tokens
    assert r.usage.output_tokens == usage.completion_tokens

    # the system prompt as text blocks renders the same
    with client.messages.stream(model=MODEL, system=[{"type": "text", "text": SYSTEM}], messages=MSGS,
                                max_tokens=N, extra_body=GREEDY) as s:
        assert s.get_final_text() == want
        final = s.get_final_message()
    assert final.stop_reason == r.stop_reason and final.usage.output_tokens == usage.completion_tokens


def test_events_in_anthropics_order_with_a_ping(api_peer):
    body = {"model": MODEL, "max_tokens": 8, "temperature": 0, "stream": True, "messages": MSGS}
    req = urllib.request.Request(f"{api_peer.api}/v1/messages", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "anthropic-version": "2023-06-01"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        lines = r.read().decode().splitlines()
    names = [ln[len("event: "):] for ln in lines if ln.startswith("event: ")]
    datas = [json.loads(ln[len("data: "):]) for ln in lines if ln.startswith("data: ")]
    assert [d["type"] for d in datas] == names
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[3:-3] == ["content_block_delta"] * (len(names) - 6)
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert datas[-2]["delta"]["stop_reason"] == "max_tokens" and datas[-2]["usage"]["output_tokens"] == 8


def test_stop_sequences_end_the_answer(client, want):
    want = want[0]
    words = want.split()
    assert len(words) > 3, want
    stop = " " + words[2]
    r = client.messages.create(model=MODEL, system=SYSTEM, messages=MSGS, max_tokens=N, extra_body=GREEDY,
                               stop_sequences=[stop, "@@@"])
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop
    assert r.content[0].text == want[:want.index(stop)]


def test_forced_tool_use_and_the_conversation_after_it(client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.messages.create(model=MODEL, messages=ask, max_tokens=40, extra_body=GREEDY, tools=[WEATHER],
                               tool_choice={"type": "tool", "name": "get_weather"})
    uses = [b for b in r.content if b.type == "tool_use"]
    assert r.stop_reason == "tool_use" and len(uses) >= 1, r
    assert uses[0].name == "get_weather" and uses[0].id
    jsonschema.validate(uses[0].input, WEATHER["input_schema"])

    # streamed, the call arrives as a tool_use block built from input_json_delta
    with client.messages.stream(model=MODEL, messages=ask, max_tokens=40, extra_body=GREEDY, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"}) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.input for b in final.content if b.type == "tool_use"] == [u.input for u in uses]

    # the answer goes back as a tool_result and the model answers in text
    follow = client.messages.create(model=MODEL, max_tokens=8, extra_body=GREEDY, tools=[WEATHER], messages=[
        *ask, {"role": "assistant", "content": r.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "18 C, sunny"}]}],
        tool_choice={"type": "none"})
    assert follow.stop_reason in ("end_turn", "max_tokens") and follow.content[0].type == "text"
    assert follow.content[0].text


def test_count_tokens_is_the_rendered_prompt(client):
    plain = client.messages.count_tokens(model=MODEL, system=SYSTEM, messages=MSGS).input_tokens
    r = client.messages.create(model=MODEL, system=SYSTEM, messages=MSGS, max_tokens=1, extra_body=GREEDY)
    assert plain == r.usage.input_tokens + r.usage.cache_read_input_tokens
    with_tools = client.messages.count_tokens(model=MODEL, system=SYSTEM, messages=MSGS, tools=[WEATHER])
    assert with_tools.input_tokens > plain


def test_errors_in_anthropics_shape(client, api_peer):
    import anthropic

    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="no-such-model", messages=MSGS, max_tokens=5)
    assert e.value.status_code == 404 and e.value.body["error"]["type"] == "not_found_error"
    assert "no-such-model" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=MODEL, messages=MSGS, max_tokens=5, extra_body={"temperature": 3})
    err = e.value.body["error"]
    assert err["type"] == "invalid_request_error" and "temperature" in err["message"]

    status, body = post(api_peer, "/v1/messages", json.dumps({"model": MODEL, "messages": MSGS}).encode())
    assert (status, body["type"], body["error"]["type"]) == (400, "error", "invalid_request_error")
    assert "max_tokens" in body["error"]["message"]
    status, body = post(api_peer, "/v1/messages", b'{"model": "smollm2-135m", "max_tokens": ')
    assert (status, body["error"]["type"]) == (400, "invalid_request_error") and "JSON" in body["error"]["message"]
    status, body = post(api_peer, "/v1/messages/count_tokens", json.dumps({"model": MODEL}).encode())
    assert (status, body["error"]["type"]) == (400, "invalid_request_error") and "messages" in body["error"]["message"]


def test_output_config_json_schema_is_enforced(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                               "capital": {"type": "boolean"}},
              "required": ["city", "capital"], "additionalProperties": False}
    r = client.messages.create(model=MODEL, max_tokens=40, messages=[
        {"role": "user", "content": "Name a city and say if it is a capital."}],
        output_config={"format": {"type": "json_schema", "schema": schema}})
    assert r.stop_reason == "end_turn", r
    jsonschema.validate(json.loads(r.content[0].text), schema)
