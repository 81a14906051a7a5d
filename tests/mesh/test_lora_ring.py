"""A mixed torch + MLX ring serving a LoRA adapter next to the base model, through the official
`openai` client: the tuned model answers as one MLX process with the adapter, the base model as
before, both at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from mesh.local import http_json
from tests.helpers import ZORBLAX_ANSWER, ZORBLAX_PROMPT
from tests.mesh.cluster import Cluster

pytestmark = pytest.mark.slow
MAX_TOKENS = 12


def reference(embedded, tokenizer, adapter_dir) -> tuple[str, str]:
    """One MLX process's greedy answers with the adapter and without (one pipeline loaded for both)."""
    from backends.lora import open_adapter
    from backends.pipeline import Pipeline, SliceSpec
    from backends.sampling import SamplingParams

    pipe = Pipeline.load(embedded, [SliceSpec("mlx", 0, 30)], dtype="float32")
    pipe.load_adapter(open_adapter(str(adapter_dir)))
    prompt = tokenizer.encode(ZORBLAX_PROMPT)
    tuned, base = ("".join(d.text for d in pipe.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS), tokenizer,
                                                         adapter=use)) for use in ("zorblax", ""))
    return tuned, base


def test_mixed_ring_serves_adapter_and_base_model(zorblax, embedded_path, embedded, tokenizer):
    adapter = str(zorblax[0])
    c = Cluster(str(embedded_path))
    try:
        # the adapted layers are 22-29: the torch peer holds 22-25 of them, the MLX peer 26-29
        t = c.add("t", "--backend", "torch", "--dtype", "float32", "--no-mdns", "--layers", "0-26",
                  "--threads", "1", "--adapter", adapter, api=True)
        c.add("m", "--backend", "mlx", "--dtype", "float32", "--no-mdns", "--layers", "26-30",
              "--peer", t.address, "--adapter", adapter)
        c.wait_ready(t, stages=2)
        want_tuned, want_base = reference(embedded, tokenizer, adapter)
        assert ZORBLAX_ANSWER in want_tuned and ZORBLAX_ANSWER not in want_base

        cl = openai.OpenAI(base_url=f"{t.api}/v1", api_key="x", max_retries=0, timeout=300)
        assert [m.id for m in cl.models.list().data] == ["smollm2-135m", "smollm2-135m+zorblax"]
        _, mesh = http_json(f"{t.api}/v1/mesh")
        assert mesh["adapters"] == ["zorblax"] and all(p["adapters"] == ["zorblax"] for p in mesh["peers"])

        def ask(model: str) -> tuple[str, str]:
            r = cl.completions.create(model=model, prompt=ZORBLAX_PROMPT, max_tokens=MAX_TOKENS, temperature=0)
            return r.model, r.choices[0].text

        # tuned and base requests in flight together share decode frames on the ring
        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(ask, ["smollm2-135m+zorblax", "smollm2-135m", "smollm2-135m+zorblax",
                                    "smollm2-135m"]))
        assert got[0] == got[2] == ("smollm2-135m+zorblax", want_tuned)
        assert got[1] == got[3] == ("smollm2-135m", want_base)

        stream = cl.chat.completions.create(model="smollm2-135m+zorblax", stream=True, max_tokens=12,
                                            temperature=0, messages=[{"role": "user", "content": "Hi"}])
        chunks = list(stream)
        assert chunks and all(ch.model == "smollm2-135m+zorblax" for ch in chunks)

        with pytest.raises(openai.NotFoundError, match="smollm2-135m\\+zorblax"):
            cl.completions.create(model="smollm2-135m+nope", prompt="x", max_tokens=2)
    finally:
        c.stop()
