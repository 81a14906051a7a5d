"""Structured output through a real two-peer ring and the official `openai` client: concurrent
requests with different JSON schemas (one frame batches them on the last stage) all validate, greedy
constrained output equals the one-process answer, and a schema that cannot compile is a 400 that
names the problem."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.backends.test_constrain import FLAGS, PLACE, POINT
from tests.mesh.cluster import two_peer_ring

pytestmark = pytest.mark.slow
QUESTION = "Describe something as JSON."


@pytest.fixture(scope="module")
def oa(embedded_path):
    with two_peer_ring(str(embedded_path)) as c:
        yield openai.OpenAI(base_url=f"{c.peers['a'].api}/v1", api_key="x", max_retries=0, timeout=120)


def rf(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def ask(oa, schema: dict, **kw) -> str:
    r = oa.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": QUESTION}],
                                   response_format=rf(schema), max_tokens=120, **kw)
    assert r.choices[0].finish_reason == "stop"
    return r.choices[0].message.content or ""


def test_concurrent_requests_with_different_schemas_all_validate(oa):
    jobs = list(zip((POINT, PLACE, FLAGS, POINT), range(4)))  # PERSON, the long one: tests/backends
    with ThreadPoolExecutor(len(jobs)) as ex:
        texts = list(ex.map(lambda j: ask(oa, j[0], temperature=1.0, seed=j[1]), jobs))
    for (schema, _), text in zip(jobs, texts):
        jsonschema.validate(json.loads(text), schema)


def test_greedy_constrained_output_equals_one_process(oa, embedded, tokenizer):
    from backends.constrain import json_schema_grammar
    from backends.pipeline import Pipeline, SliceSpec
    from backends.sampling import SamplingParams

    pipe = Pipeline.load(embedded, [SliceSpec("torch", 0, 30)], dtype="float32", threads=1)
    prompt = tokenizer.apply_chat([{"role": "user", "content": QUESTION}])
    params = SamplingParams(max_tokens=120, grammar=json_schema_grammar(POINT))
    alone = "".join(d.text for d in pipe.generate(prompt, params, tokenizer))
    assert ask(oa, POINT, temperature=0) == alone
    jsonschema.validate(json.loads(alone), POINT)


def test_a_schema_that_cannot_compile_is_a_400(oa):
    with pytest.raises(openai.BadRequestError, match="Unknown format: weird"):
        ask(oa, {"type": "string", "format": "weird"})
