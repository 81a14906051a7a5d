"""/v1/responses driven by the official `openai` client's `responses.create` against a real peer: the
same greedy text as /v1/chat/completions (streamed and not), a forced function call, text.format."""

from __future__ import annotations

import json

import jsonschema
import pytest

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
SYSTEM = "You answer in one short sentence."
MSGS = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a large ocean."}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
           "required": ["city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def oa(api_peer):
    from openai import OpenAI

    return OpenAI(base_url=f"{api_peer.api}/v1", api_key="x", max_retries=0, timeout=300)


def test_responses_equal_chat_completions_streamed_and_not(oa):
    c = oa.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": SYSTEM}, *MSGS],
                                   temperature=0, max_tokens=20)
    want = c.choices[0].message.content
    items = [{"role": m["role"], "content": m["content"]} for m in MSGS]
    r = oa.responses.create(model=MODEL, instructions=SYSTEM, input=items, temperature=0, max_output_tokens=20,
                            store=True)
    assert r.object == "response" and r.id.startswith("resp_") and r.store is False
    assert r.output_text == want and [o.type for o in r.output] == ["message"]
    assert r.status == ("incomplete" if c.choices[0].finish_reason == "length" else "completed")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (c.usage.prompt_tokens, c.usage.completion_tokens)
    assert r.usage.total_tokens == c.usage.total_tokens

    events = list(oa.responses.create(model=MODEL, instructions=SYSTEM, input=items, temperature=0,
                                      max_output_tokens=20, stream=True))
    kinds = [e.type for e in events]
    last = "response.incomplete" if r.status == "incomplete" else "response.completed"
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          last]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want
    assert events[-1].response.output_text == want and events[-4].text == want

    # a plain string input is one user message
    one = oa.responses.create(model=MODEL, input="Name a large ocean.", temperature=0, max_output_tokens=8)
    c1 = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a large ocean."}],
                                    temperature=0, max_tokens=8)
    assert one.output_text == c1.choices[0].message.content


def test_forced_function_call_and_its_output(oa):
    tool = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
            "parameters": WEATHER, "strict": True}
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = oa.responses.create(model=MODEL, input=ask, tools=[tool], temperature=0, max_output_tokens=60,
                            tool_choice={"type": "function", "name": "get_weather"})
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id, r.output
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)

    events = list(oa.responses.create(model=MODEL, input=ask, tools=[tool], temperature=0, max_output_tokens=60,
                                      tool_choice="required", stream=True))
    done = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert done and events[-1].type == "response.completed"
    jsonschema.validate(json.loads(done[0].arguments), WEATHER)

    # the call and its output go back as items; the model answers in text
    follow = oa.responses.create(model=MODEL, tools=[tool], temperature=0, max_output_tokens=8, tool_choice="none",
                                 input=[*ask, {"type": "function_call", "call_id": calls[0].call_id,
                                               "name": "get_weather", "arguments": calls[0].arguments},
                                        {"type": "function_call_output", "call_id": calls[0].call_id,
                                         "output": "18 C, sunny"}])
    assert [o.type for o in follow.output] == ["message"] and follow.output_text


def test_text_format_json_schema_output_validates(oa):
    ocean = {"type": "string", "enum": ["Pacific", "Atlantic", "Indian", "Arctic"]}
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "oceans": {"type": "array", "maxItems": 2, "items": ocean}},
              "required": ["name", "oceans"], "additionalProperties": False}
    r = oa.responses.create(model=MODEL, input="List two oceans as JSON.", temperature=1, max_output_tokens=60,
                            text={"format": {"type": "json_schema", "name": "oceans", "schema": schema,
                                             "strict": True}})
    assert r.status == "completed", r
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


def test_stateless_and_bad_input_are_openai_shaped_400s(oa):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.create(model=MODEL, input="Hi", previous_response_id="resp_123")
    assert e.value.status_code == 400 and "keeps no responses" in e.value.message
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.create(model=MODEL, input=[{"role": "user", "content": [{"type": "input_image",
                                                                             "image_url": "http://x/y.png"}]}])
    assert "input_image" in e.value.message
    with pytest.raises(openai.NotFoundError):
        oa.responses.create(model="no-such-model", input="Hi")
