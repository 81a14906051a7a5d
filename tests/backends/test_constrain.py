"""Structured output on the last slice (backends/constrain.py): grammars compile or fail with a clear
message; generation under a JSON schema, a regex or a Lark grammar always matches it, sampled at
temperature 1, with different grammars (and none) in one batch, on torch and MLX last slices, with
speculation (seeded output equal with and without drafts) and after a replay on a new path."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from backends.constrain import (GrammarError, check_grammar, json_object_grammar, json_schema_grammar,
                                lark_grammar, regex_grammar, response_format_grammar)
from backends.pipeline import Pipeline, SliceSpec
from backends.sampling import SamplingParams
from backends.shard import LayerShard, Sample, SeqChunk
from backends.wire import Hidden

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
POINT = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
         "required": ["x", "y"], "additionalProperties": False}
PLACE = {"type": "object", "properties": {"address": PERSON["properties"]["address"],
                                         "tags": PERSON["properties"]["tags"]},
         "required": ["address", "tags"], "additionalProperties": False}
FLAGS = {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4}


@pytest.fixture(scope="module")
def torch_pipe(embedded):
    return Pipeline.load(embedded, [SliceSpec("torch", 0, 30)], dtype="float32", threads=1)


@pytest.fixture(scope="module")
def mlx_pipe(embedded):
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    # MLX on a CPU is slow: a short MLX last slice behind torch (the last slice sees hidden states only)
    return Pipeline.load(embedded, [SliceSpec("torch", 0, 26), SliceSpec("mlx", 26, 30)], dtype="float32",
                         threads=1)


def chat(tokenizer, text: str) -> list[int]:
    """A short raw prompt (no chat template: every prompt is prefilled on its own, so few tokens keep
    the tests fast; the grammar shapes the answer anyway)."""
    return tokenizer.encode(f"Q: {text}\nA:")


def run_batch(shards: list[LayerShard], reqs: list[tuple[list[int], SamplingParams]], eos: set[int],
              max_new: int) -> list[list[int]]:
    """Every request decoded together, one frame per step (prompts first, each its own chunk), as the
    mesh scheduler batches them; each ends at a stop token, or after max_new or its max_tokens tokens."""
    ids = [f"b{i}" for i in range(len(reqs))]
    for sid, (prompt, params) in zip(ids, reqs):
        for sh in shards:
            sh.add_sequence(sid, params, prompt)
    out: dict[str, list[int]] = {sid: [] for sid in ids}
    pos = {sid: len(p) for sid, (p, _) in zip(ids, reqs)}
    cap = {sid: min(max_new, params.max_tokens) for sid, (_, params) in zip(ids, reqs)}
    chunks = [SeqChunk(sid, 0, len(p)) for sid, (p, _) in zip(ids, reqs)]
    x = np.concatenate([np.asarray(p, np.int32) for p, _ in reqs])
    try:
        while chunks:
            for s in _step(shards, chunks, x):
                out[s.seq_id].append(s.token)
            live = [sid for sid in ids if out[sid][-1] not in eos and len(out[sid]) < cap[sid]]
            chunks = [SeqChunk(sid, pos[sid], 1) for sid in live]
            x = np.asarray([out[sid][-1] for sid in live], np.int32)
            for sid in live:
                pos[sid] += 1
    finally:
        for sid in ids:
            for sh in shards:
                sh.free_sequence(sid)
    return [out[sid] for sid in ids]


def _step(shards: list[LayerShard], chunks: list[SeqChunk], x: np.ndarray) -> list[Sample]:
    h: np.ndarray | Hidden | list[Sample] = x
    for sh in shards:
        assert not isinstance(h, list)
        h = sh.forward(chunks, h)
        if isinstance(h, Hidden):
            h = h.copy()
    assert isinstance(h, list)
    return h


def text_of(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([t for t in ids if t not in tokenizer.eos_ids])


# ---- grammars


def test_bad_grammars_name_the_problem(tokenizer):
    with pytest.raises(GrammarError, match="Invalid type: strin"):
        json_schema_grammar({"type": "strin"})
    with pytest.raises(GrammarError, match="Unknown format: weird"):
        json_schema_grammar({"type": "string", "format": "weird"})
    json_schema_grammar({"type": "string", "format": "weird"}, strict=False)  # non-strict ignores it
    with pytest.raises(GrammarError, match="/defs/x' does not exist"):
        json_schema_grammar({"$ref": "#/defs/x"})
    with pytest.raises(GrammarError, match="look-around"):
        regex_grammar("(?<=a)b")
    with pytest.raises(GrammarError, match="unclosed group"):
        regex_grammar("a(b")
    with pytest.raises(GrammarError, match='unknown name: "foo"'):
        lark_grammar("start: foo")
    with pytest.raises(GrammarError, match="must be an object"):
        json_schema_grammar([1, 2])  # type: ignore[arg-type]
    with pytest.raises(GrammarError, match="unknown response_format type 'xml'"):
        response_format_grammar({"type": "xml"})
    with pytest.raises(GrammarError, match="needs a \"json_schema\" object"):
        response_format_grammar({"type": "json_schema"})
    with pytest.raises(GrammarError, match="cannot compile the grammar"):
        check_grammar('{"grammars": [{"lark_grammar": "start: nope"}]}', tokenizer)
    check_grammar(json_schema_grammar(PERSON), tokenizer)


def test_response_format_kinds(tokenizer):
    assert response_format_grammar(None) == "" and response_format_grammar({"type": "text"}) == ""
    kinds = {
        "json_object": ({"type": "json_object"}, '{"a": [1, 2]}', '[1, 2]'),
        "json_schema": ({"type": "json_schema", "json_schema": {"name": "p", "schema": POINT, "strict": True}},
                        '{"x": 1, "y": -2}', '{"x": 1}'),
        "regex": ({"type": "regex", "regex": r"[0-9]{3}-[a-z]+"}, "123-abc", "12-abc"),
        "grammar": ({"type": "grammar", "grammar": 'start: "yes" | "no" | %json{"type": "integer"}'},
                    "42", "maybe"),
    }
    for kind, (rf, good, bad) in kinds.items():
        g = response_format_grammar(rf)
        check_grammar(g, tokenizer)
        assert is_complete_answer(g, tokenizer, good), (kind, good)
        assert not is_complete_answer(g, tokenizer, bad), (kind, bad)
    assert json_object_grammar() == response_format_grammar({"type": "json_object"})


def is_complete_answer(grammar: str, tokenizer, text: str) -> bool:
    """Whether the grammar allows each token of `text` in turn and then the end of the answer."""
    from backends.constrain import Constraint, ll_tokenizer

    c = Constraint(grammar, ll_tokenizer(tokenizer), len(tokenizer.hf))
    for t in tokenizer.encode(text, special=False):
        if not c.mask()[t]:
            return False
        c.consume([t])
    return bool(c.mask()[sorted(tokenizer.eos_ids)[0]])


# ---- generation


@pytest.mark.slow  # seconds of model time; runs in make test
def test_json_schema_sampled_at_temperature_1_always_validates(torch_pipe, tokenizer):
    asks = ["a user record", "an admin called Ada", "a guest from Oslo", "someone aged 99", "a child",
            "my neighbour", "a user with two tags", "the CEO", "a person in Lima", "a robot",
            "a user from zip 90210", "an old friend", "a guest with no tags", "a cat owner", "a pilot",
            "the first user", "a user named Bo", "a teenager in Rome", "a new admin", "anyone at all"]
    g = json_schema_grammar(PERSON)
    reqs = [(chat(tokenizer, f"Describe {ask} as JSON."), SamplingParams(temperature=1.0, seed=seed,
             max_tokens=120, grammar=g)) for seed, ask in enumerate(asks)]
    outs = run_batch(torch_pipe.shards, reqs, tokenizer.eos_ids, 120)
    texts = [text_of(tokenizer, o) for o in outs]
    for o, t in zip(outs, texts):
        assert o[-1] in tokenizer.eos_ids, t  # the grammar completed and the answer ended there
        jsonschema.validate(json.loads(t), PERSON)
    assert len(set(texts)) > 10  # 20 prompts sampled, not one answer forced 20 times


def test_a_batch_mixes_grammars_and_free_rows(torch_pipe, tokenizer):
    prompt = chat(tokenizer, "Answer with JSON.")
    free = chat(tokenizer, "What is 2+2?")
    schemas = [PERSON, POINT, FLAGS]
    reqs = [(prompt, SamplingParams(temperature=0.8, seed=i, grammar=json_schema_grammar(s)))
            for i, s in enumerate(schemas)]
    reqs.append((free, SamplingParams(max_tokens=6)))
    outs = run_batch(torch_pipe.shards, reqs, tokenizer.eos_ids, 80)
    for s, o in zip(schemas, outs):
        jsonschema.validate(json.loads(text_of(tokenizer, o)), s)
    # the free row is not masked: its first token is the one it draws alone (its prompt runs in its
    # own chunk either way), and it is no JSON
    alone = run_batch(torch_pipe.shards, [(free, SamplingParams())], tokenizer.eos_ids, 1)
    assert outs[3][0] == alone[0][0] and not text_of(tokenizer, outs[3]).lstrip().startswith(("{", "["))


def test_regex_and_lark(torch_pipe, tokenizer):
    prompt = chat(tokenizer, "Give a product code.")
    rx = r"[A-Z]{3}-[0-9]{4}"
    lark = 'start: "Answer: " ("yes" | "no") " because " /[a-z ]{1,30}/ "."'
    reqs = [(prompt, SamplingParams(temperature=1.0, seed=s, grammar=regex_grammar(rx))) for s in range(3)]
    reqs += [(prompt, SamplingParams(temperature=1.0, seed=s, grammar=lark_grammar(lark))) for s in range(3)]
    outs = [text_of(tokenizer, o) for o in run_batch(torch_pipe.shards, reqs, tokenizer.eos_ids, 40)]
    for t in outs[:3]:
        assert re.fullmatch(rx, t), t
    for t in outs[3:]:
        assert re.fullmatch(r"Answer: (yes|no) because [a-z ]{1,30}\.", t), t


@pytest.mark.slow  # seconds of model time; runs in make test
def test_mlx_whole_model(embedded, tokenizer):
    """A first-and-last MLX slice computes each decode step ahead from the token it is drawing; a
    constrained row's next mask needs that token, so only the free row steps ahead."""
    pytest.importorskip("mlx_lm")
    pipe = Pipeline.load(embedded, [SliceSpec("mlx", 0, 30)], dtype="float32")
    prompt = chat(tokenizer, "Give me a point as JSON.")
    reqs = [(prompt, SamplingParams(temperature=1.0, seed=s, grammar=json_schema_grammar(s_)))
            for s, s_ in enumerate([POINT, FLAGS])]
    reqs.append((prompt, SamplingParams(max_tokens=12)))
    outs = run_batch(pipe.shards, reqs, tokenizer.eos_ids, 40)
    for s, o in zip([POINT, FLAGS], outs):
        jsonschema.validate(json.loads(text_of(tokenizer, o)), s)
    assert pipe.shards[0].ahead_used > 0  # type: ignore[attr-defined]


class Reference:
    """Drafts taken from a known answer, every other trip's second one made wrong (a token the
    grammar refuses, or merely another one), so verification accepts, rejects and rolls back."""

    def __init__(self, prompt: list[int], answer: list[int]):
        self.n, self.answer, self.trips = len(prompt), answer, 0

    def propose_many(self, wants: dict[str, tuple[list[int], int]]) -> dict[str, list[int]]:
        out = {}
        for sid, (tokens, k) in wants.items():
            d = list(self.answer[len(tokens) - self.n:len(tokens) - self.n + k])
            self.trips += 1
            if self.trips % 2 == 0 and len(d) > 1:
                d[1] = (d[1] + 7) % 49152
            out[sid] = d
        return out

    def free(self, seq_id: str) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.slow  # seconds of model time; runs in make test
@pytest.mark.parametrize("which", ["torch", "mlx"])
def test_drafts_do_not_change_a_seeded_constrained_answer(which, request, tokenizer):
    pipe = request.getfixturevalue(f"{which}_pipe")
    prompt = chat(tokenizer, "A place as JSON, please.")
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=60, grammar=json_schema_grammar(PLACE))

    def answer(draft=None) -> tuple[list[int], dict]:
        stats: dict = {}
        ids = [d.token for d in pipe.generate(prompt, params, tokenizer, stats=stats, draft=draft,
                                              draft_tokens=4, adaptive=False)]
        return ids, stats

    plain, _ = answer()
    drafted, stats = answer(Reference(prompt, plain))
    assert drafted == plain
    assert 0 < stats["accepted"] < stats["drafted"]  # both paths ran
    jsonschema.validate(json.loads(text_of(tokenizer, plain)), PLACE)


def test_a_replay_resumes_the_grammar_where_the_sequence_stood(torch_pipe, tokenizer):
    """A sequence re-prefilled with prompt + output on a new path (`generated`) continues exactly as
    the undisturbed one: its matcher consumed the output it had produced."""
    prompt = chat(tokenizer, "A user record as JSON.")
    params = SamplingParams(temperature=1.0, seed=9, grammar=json_schema_grammar(PERSON))
    cut = 12
    (whole,) = run_batch(torch_pipe.shards, [(prompt, params)], tokenizer.eos_ids, cut + 12)
    (sh,) = torch_pipe.shards
    history = prompt + whole[:cut]
    sh.add_sequence("replay", params, history, generated=cut)
    try:
        got = [s.token for s in sh.forward([SeqChunk("replay", 0, len(history))], np.asarray(history, np.int32))]
        while got[-1] not in tokenizer.eos_ids and len(got) < len(whole) - cut:
            (s,) = sh.forward([SeqChunk("replay", len(history) + len(got) - 1, 1)], np.asarray(got[-1:], np.int32))
            got.append(s.token)
    finally:
        sh.free_sequence("replay")
    assert whole[cut:] == got
    with pytest.raises(GrammarError, match="breaks the grammar"):  # output the grammar never allowed
        sh.add_sequence("bad", params, prompt + tokenizer.encode("hello", special=False), generated=1)
    assert not sh.has_sequence("bad")
