"""Tool calling without a ring: each family's parser (whole and streamed), the rendering of tools and
of a tool conversation, the forced-call grammar, and the checks of tools / tool_choice."""

from __future__ import annotations

import copy
import json

import pytest

from apps.openai_schema import ChatBody, InvalidRequest, parse
from apps.tools import (HERMES, LLAMA3, MISTRAL, StreamParser, ToolCall, detect_family, parse_text, plan_tools,
                        render)
from backends.tokenizer import Tokenizer

NAMES = {"get_weather", "add"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
                                     "days": {"type": "array", "items": {"type": "integer"}}},
    "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


def streamed(family: str, text: str, step: int = 1) -> tuple[str, list[ToolCall]]:
    p = StreamParser(family, NAMES)
    ev: list[str | ToolCall] = []
    for i in range(0, len(text), step):
        ev += p.push(text[i:i + step])
    ev += p.finish()
    return "".join(e for e in ev if isinstance(e, str)), [e for e in ev if isinstance(e, ToolCall)]


def calls(cs: list[ToolCall]) -> list[tuple[int, str, dict]]:
    return [(c.index, c.name, json.loads(c.arguments)) for c in cs]


CASES = [  # family, output, its text, its calls
    (HERMES, 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
     "Sure.", [(0, "get_weather", {"city": "Paris", "unit": "c"})]),
    (HERMES, '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n<tool_call>{"name": "add", '
             '"arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>\n',
     "", [(0, "add", {"a": 1, "b": 2}), (1, "add", {"a": 3, "b": 4})]),
    (HERMES, '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n', "", [(0, "add", {"a": 1, "b": 2})]),
    (HERMES, '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_c', "", [(0, "add", {"a": 1, "b": 2})]),
    (HERMES, 'I use <tool_call>{"name": "nope", "arguments": {}}</tool_call> here',
     'I use <tool_call>{"name": "nope", "arguments": {}}</tool_call> here', []),
    (HERMES, '<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call>', '<tool_call>{"name": "add", '
                                                                             '"arguments": {"a": 1,</tool_call>', []),
    (HERMES, "Plain text with < and <tool and a\n\n", "Plain text with < and <tool and a\n\n", []),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "f"}}', "",
     [(0, "get_weather", {"city": "Oslo", "unit": "f"})]),
    (LLAMA3, '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "add", "parameters": '
             '{"a": 5, "b": 6}}', "", [(0, "add", {"a": 1, "b": 2}), (1, "add", {"a": 5, "b": 6})]),
    (LLAMA3, '{"answer": 42}', '{"answer": 42}', []),
    (LLAMA3, 'The JSON is {"name": "add", "parameters": {}}', 'The JSON is {"name": "add", "parameters": {}}', []),
    (MISTRAL, '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 7, "b": 8}}]', "", [(0, "add", {"a": 7, "b": 8})]),
    (MISTRAL, '[{"name": "get_weather", "arguments": {"city": "Rome", "unit": "c"}}, {"name": "add", "arguments": '
              '{"a": 1, "b": 1}}]', "", [(0, "get_weather", {"city": "Rome", "unit": "c"}), (1, "add", {"a": 1, "b": 1})]),
    (MISTRAL, "[1] a footnote", "[1] a footnote", []),
]


@pytest.mark.parametrize("family, out, text, want", CASES)
def test_each_family_parser_finds_its_calls_whole_and_streamed(family, out, text, want):
    got_text, got = parse_text(family, out, NAMES)
    assert (got_text.strip(), calls(got)) == (text.strip(), want)
    for step in (1, 3, 7):
        s_text, s_calls = streamed(family, out, step)
        assert (s_text.strip(), calls(s_calls)) == (text.strip(), want), step
    if not want:  # text that is no call streams out unchanged
        assert streamed(family, out)[0] == out


def test_streamed_text_is_released_before_the_answer_ends():
    p = StreamParser(HERMES, NAMES)
    assert "".join(x for x in p.push("Hello there, friend") if isinstance(x, str)) == "Hello there, friend"
    assert p.push("<tool") == []  # may open a call: held
    assert p.push('_call>{"name": "add", "arguments": {"a": 1, "b": 2}}') == []
    ev = p.push("</tool_call>")
    assert [type(e) for e in ev] == [ToolCall] and p.calls == 1



def with_template(tokenizer: Tokenizer, template: str) -> Tokenizer:
    hf = copy.copy(tokenizer.hf)
    hf.chat_template = template
    return Tokenizer(hf, tokenizer.eos_ids)


QWEN_LIKE = ("{%- if tools %}<|im_start|>system\n# Tools\n<tools>{%- for t in tools %}\n{{ t | tojson }}"
             "{%- endfor %}\n</tools>\nanswer with <tool_call></tool_call><|im_end|>\n{%- endif %}"
             "{%- for m in messages %}{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}"
             "\n</tool_response><|im_end|>\n{%- elif m.tool_calls %}<|im_start|>assistant\n{%- for c in m.tool_calls %}"
             "<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}"
             "\n</tool_call>{%- endfor %}<|im_end|>\n{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
             "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
LLAMA_LIKE = ("{%- if tools %}<|start_header_id|>user<|end_header_id|>Given the following functions, respond with "
              "a JSON for a function call. {{ tools | tojson }}<|eot_id|>{%- endif %}{%- for m in messages %}"
              "<|start_header_id|>{{ m.role }}<|end_header_id|>{{ m.content }}<|eot_id|>{%- endfor %}"
              "<|python_tag|>")
MISTRAL_LIKE = "{%- for m in messages %}[INST]{{ m.content }}[/INST]{%- endfor %}{%- if tools %}[AVAILABLE_TOOLS]" \
               "{{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}[TOOL_CALLS]"


def test_the_family_comes_from_the_chat_template(tokenizer):
    assert detect_family(tokenizer) == HERMES and not tokenizer.supports_tools  # SmolLM2: no tools in it
    assert detect_family(with_template(tokenizer, QWEN_LIKE)) == HERMES
    assert detect_family(with_template(tokenizer, LLAMA_LIKE)) == LLAMA3
    assert detect_family(with_template(tokenizer, MISTRAL_LIKE)) == MISTRAL
    assert with_template(tokenizer, QWEN_LIKE).supports_tools


CONVERSATION = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
]


def text_of(tok: Tokenizer, ids: list[int]) -> str:
    return tok.hf.decode(ids)


def test_a_template_without_tools_gets_them_hermes_style_in_the_system_prompt(tokenizer):
    from apps.tools import normalise_messages

    plan = plan_tools([WEATHER, ADD], "auto", HERMES)
    t = text_of(tokenizer, render(tokenizer, normalise_messages(CONVERSATION), plan))
    system = t.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.") and "<tools>" in system and '"get_weather"' in system
    assert "<tool_call>" in system and "You are a helpful AI assistant" not in t
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}' \
           '\n</tool_call><|im_end|>' in t
    assert "<|im_start|>user\n<tool_response>\n21 degrees\n</tool_response><|im_end|>" in t
    assert t.endswith("<|im_start|>assistant\n")
    # tool_choice none: the model answers in text, the tools stay out of the prompt; the history still renders
    t = text_of(tokenizer, render(tokenizer, normalise_messages(CONVERSATION), plan_tools([WEATHER], "none", HERMES)))
    assert "<tools>" not in t and "<tool_response>\n21 degrees" in t


def test_a_template_with_tools_renders_them_itself(tokenizer):
    tok = with_template(tokenizer, QWEN_LIKE)
    t = text_of(tok, render(tok, CONVERSATION[1:], plan_tools([WEATHER], "auto", HERMES)))
    assert t.startswith("<|im_start|>system\n# Tools\n<tools>{\"type\": \"function\"")
    assert '"arguments": {"city": "Paris", "unit": "c"}}' in t  # arguments as an object, not escaped JSON text
    assert "<tool_response>\n21 degrees" in t


@pytest.mark.parametrize("family, good, bad", [
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "k"}}\n</tool_call>'),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c", "days": [1, 2]}}',
     '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    (MISTRAL, '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "f"}}]',
     '[{"name": "add", "arguments": {"a": 1, "b": 2}}]'),
])
def test_a_forced_call_grammar_takes_only_valid_calls_of_the_named_tool(tokenizer, family, good, bad):
    import llguidance

    from backends import constrain

    plan = plan_tools([WEATHER, ADD], {"type": "function", "function": {"name": "get_weather"}}, family)
    assert plan.forced
    grammar = constrain.lark_grammar(plan.grammar())
    constrain.check_grammar(grammar, tokenizer)

    def accepts(text: str) -> bool:
        m = llguidance.LLMatcher(constrain.ll_tokenizer(tokenizer), grammar)
        ids = tokenizer.encode(text, special=False)
        return m.validate_tokens(ids) == len(ids) and m.consume_tokens(ids) and m.is_accepting()

    assert accepts(good) and not accepts(bad)
    assert parse_text(family, good, NAMES)[1][0].name == "get_weather"


def test_required_allows_any_tool():
    import llguidance

    from backends import constrain

    g = plan_tools([WEATHER, ADD], "required", HERMES).grammar()
    assert '"add"' in g and '"get_weather"' in g
    assert constrain.lark_grammar(g) and llguidance.LLMatcher.validate_grammar(constrain.lark_grammar(g)) == ""


@pytest.mark.parametrize("tools, choice, message, param", [
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "'nope', which is not in 'tools'", "tool_choice"),
    (None, "required", "needs 'tools'", "tool_choice"),
    ([WEATHER], "sometimes", "'tool_choice' must be", "tool_choice"),
    ([{"type": "code_interpreter"}], "auto", "only function tools", "tools"),
    ([{"type": "function", "function": {"name": "a b"}}], "auto", "function.name must be", "tools"),
    ([WEATHER, WEATHER], "auto", "used twice", "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "auto", "JSON schema object", "tools"),
])
def test_bad_tools_and_tool_choice_are_400s_naming_the_parameter(tools, choice, message, param):
    with pytest.raises(InvalidRequest) as e:
        plan_tools(tools, choice, HERMES)
    assert message in str(e.value) and e.value.param == param


def body(**kw):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}


def test_the_chat_body_takes_tools_tool_messages_and_response_format():
    b = parse(ChatBody, body(messages=CONVERSATION, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                             response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}))
    ms = [m.for_template() for m in b.messages]
    assert ms[0]["role"] == "system" and ms[2]["content"] is None
    assert ms[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}
    assert ms[3] == {"role": "tool", "content": "21 degrees", "tool_call_id": "call_1"}
    assert b.tools == [WEATHER] and b.tool_choice == "required"


@pytest.mark.parametrize("kw, message, param", [
    (dict(messages=[{"role": "tool", "content": "x"}]), "tool_call_id is required", "messages"),
    (dict(messages=[{"role": "user"}]), "content is required", "messages"),
    (dict(messages=[{"role": "user", "content": "x", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]), "assistant messages only", "messages"),
    (dict(messages=[{"role": "assistant", "content": None, "tool_calls": [{}]}]), "tool_calls must be", "messages"),
    (dict(response_format={"type": "yaml"}), "'type' one of", "response_format"),
    (dict(response_format={"type": "json_schema"}), "needs 'json_schema'", "response_format"),
    (dict(tools="get_weather"), "must be a list", "tools"),
    (dict(functions=[{"name": "f"}]), "send 'tools'", "functions"),
])
def test_bad_tool_messages_and_formats_are_400s(kw, message, param):
    with pytest.raises(InvalidRequest) as e:
        parse(ChatBody, body(**kw))
    assert message in str(e.value) and e.value.param == param, str(e.value)


def test_mistral_templates_get_the_nine_character_call_ids_they_demand(tokenizer):
    tmpl = ("{%- for m in messages %}{%- if m.tool_calls %}{%- for c in m.tool_calls %}{%- if c.id | length != 9 %}"
            "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}"
            "[TOOL_CALLS][{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}, "
            "\"id\": \"{{ c.id }}\"}]{%- endfor %}{%- elif m.role == 'tool' %}[TOOL_RESULTS]{\"call_id\": "
            "\"{{ m.tool_call_id }}\", \"content\": {{ m.content | tojson }}}[/TOOL_RESULTS]{%- else %}"
            "[INST]{{ m.content }}[/INST]{%- endif %}{%- endfor %}{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}"
            "[/AVAILABLE_TOOLS]{%- endif %}")
    tok = with_template(tokenizer, tmpl)
    t = text_of(tok, render(tok, CONVERSATION[1:], plan_tools([WEATHER], "auto", MISTRAL)))
    ids = [t.split(key)[1][:9] for key in ('"id": "', '"call_id": "')]
    assert ids[0] == ids[1] and ids[0].isalnum() and "[AVAILABLE_TOOLS]" in t


class _Sched:
    def __init__(self) -> None:
        self.cancelled: list = []

    def cancel(self, r) -> None:
        self.cancelled.append(r)


def run_of(tokenizer, pieces: list[str], finish: str, plan, logprobs: int = -1):
    """A ChatRun over one real Request whose queue already holds the sampled pieces and the end."""
    from apps.chat import ChatRun
    from backends.generation import Delta, Generation
    from backends.sampling import SamplingParams
    from mesh.batching import Request

    gen = Generation("s", [1, 2, 3], SamplingParams(logprobs=logprobs), tokenizer, 8192)
    r = Request(gen)
    for i, p in enumerate(pieces):
        gen.tokens.append(i)
        r.queue.put_nowait(Delta(p, i, -0.5))
    gen.finish_reason = finish
    r.queue.put_nowait(None)
    return ChatRun(_Sched(), [r], 3, plan)  # type: ignore[arg-type]


def test_a_chat_run_turns_pieces_into_text_calls_and_the_finish_reason(tokenizer):
    import asyncio

    from apps.chat import Finish, TextDelta, ToolCallDelta
    from apps.openai_responses import ChatOutput

    plan = plan_tools([WEATHER], "auto", HERMES)
    pieces = ["Let me check.", "\n<tool", '_call>\n{"name": "get_weather", ', '"arguments": {"city": "Oslo", ',
              '"unit": "c"}}\n</tool_call>']

    async def events(run):
        return [e async for e in run.events(0)]

    ev = asyncio.run(events(run_of(tokenizer, pieces, "stop", plan)))
    assert [type(e) for e in ev] == [TextDelta, ToolCallDelta, Finish]
    assert ev[0].text == "Let me check." and ev[1].name == "get_weather" and ev[2].reason == "tool_calls"
    assert json.loads(ev[1].arguments) == {"city": "Oslo", "unit": "c"}

    run = run_of(tokenizer, pieces[1:], "stop", plan)
    final = asyncio.run(ChatOutput(run, tokenizer, "m").final())
    c = final["choices"][0]
    assert c["message"]["content"] is None and c["finish_reason"] == "tool_calls"
    assert c["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert final["usage"]["prompt_tokens"] == 3 and final["usage"]["completion_tokens"] == 4
    # cut short by max_tokens: the call made so far is kept, and the reason says length
    ev = asyncio.run(events(run_of(tokenizer, pieces[1:4], "length", plan)))
    assert [type(e) for e in ev] == [TextDelta, Finish] and ev[-1].reason == "length"
    # no tools: every piece passes through as it came, each with its token when logprobs are asked
    ev = asyncio.run(events(run_of(tokenizer, ["a", "", "<tool_call>"], "stop", plan_tools(None, None, HERMES), 0)))
    assert [(e.text, len(e.tokens)) for e in ev[:-1]] == [("a", 1), ("", 1), ("<tool_call>", 1)]
    assert ev[-1].reason == "stop"
