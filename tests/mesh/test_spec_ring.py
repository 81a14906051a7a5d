"""Speculative decoding across real rings (`together join` processes, the official `openai` client):
a mixed torch + MLX ring drafting with prompt lookup (the default), and one peer drafting with a
draft model (the embedded model drafting for itself). Every answer is the one without speculation."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest

from mesh.local import http_json
from tests.mesh.cluster import Cluster

pytestmark = pytest.mark.slow
TEXT = ("The lighthouse keeper climbed the stairs every evening at dusk. He lit the lamp, wound the clockwork, "
        "and watched the ships pass the rocks. One night a storm broke the glass, and he repaired it by hand "
        "before the morning boats came home.")
EDIT = f"Fix the grammar of this text and write it out again:\n\n{TEXT}"  # the answer copies the text
PLAIN = "List three colours:"


def random_adapter(path: Path) -> Path:
    """A LoRA adapter of q_proj on the embedded model's last ten layers (on both peers), random: its
    answers differ."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    save_file({f"model.layers.{n}.self_attn.q_proj.{ab}": (0.3 * rng.standard_normal(shape)).astype(np.float32)
               for n in range(20, 30) for ab, shape in (("lora_a", (576, 4)), ("lora_b", (4, 576)))},
              str(path.mkdir(parents=True) or path / "adapters.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 10, "lora_parameters": {"rank": 4, "scale": 2.0}}))
    return path


def ask(cl: openai.OpenAI, prompt: str, n: int = 40, model: str = "smollm2-135m", draft: bool = True,
        **kw: object) -> str:
    r = cl.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=kw.pop("temperature", 0),
                              extra_body={"draft": draft}, **kw)  # type: ignore[call-overload]
    return r.choices[0].text


def speculation(api: str) -> dict:
    _, mesh = http_json(f"{api}/v1/mesh")
    return mesh["scheduler"]["speculation"]


def test_a_mixed_ring_answers_the_same_with_prompt_lookup(embedded_path, tmp_path) -> None:
    adapter = random_adapter(tmp_path / "rnd")
    c = Cluster(str(embedded_path))
    try:
        t = c.add("t", "--backend", "torch", "--dtype", "float32", "--no-mdns", "--layers", "0-28",
                  "--adapter", f"rnd={adapter}", api=True)
        c.add("m", "--backend", "mlx", "--dtype", "float32", "--no-mdns", "--layers", "28-30",
              "--peer", t.address, "--adapter", f"rnd={adapter}")
        c.wait_ready(t, stages=2)
        cl = openai.OpenAI(base_url=f"{t.api}/v1", api_key="x", max_retries=0, timeout=300)
        assert speculation(t.api)["draft"] == "lookup"  # on by default

        # each request alone without drafts, then all of them in one batch with drafts: a greedy edit
        # (drafted), one whose drafter finds little, one on an adapter, a seeded sampled one
        seeded = dict(temperature=0.8, top_p=0.95, seed=5)
        jobs = {"edit": (EDIT, "smollm2-135m", {}), "plain": (PLAIN, "smollm2-135m", {}),
                "adapter": (EDIT, "smollm2-135m+rnd", {}), "seeded": (EDIT, "smollm2-135m", seeded)}
        alone = {k: ask(cl, p, model=m, draft=False, **dict(kw)) for k, (p, m, kw) in jobs.items()}
        assert "lighthouse keeper" in alone["edit"] and alone["adapter"] != alone["edit"]
        assert speculation(t.api)["drafted_tokens"] == 0
        with ThreadPoolExecutor(4) as ex:
            got = dict(zip(jobs, ex.map(lambda pmk: ask(cl, pmk[0], model=pmk[1], **dict(pmk[2])), jobs.values())))
        assert got == alone
        spec = speculation(t.api)
        assert spec["accepted_tokens"] > 10 and spec["acceptance"] > 0.3, spec

        metrics = openai.DefaultHttpxClient().get(f"{t.api}/metrics").text
        drafted = next(float(ln.split()[-1]) for ln in metrics.splitlines()
                       if ln.startswith("together_spec_drafted_tokens_total"))
        assert drafted >= speculation(t.api)["drafted_tokens"] > 0
        assert "together_spec_acceptance_rate" in metrics
    finally:
        c.stop()


def test_one_peer_with_a_draft_model_answers_the_same(embedded_path) -> None:
    c = Cluster(str(embedded_path))
    try:
        p = c.add("p", "--backend", "torch", "--dtype", "float32", "--no-mdns", "--draft", str(embedded_path),
                  "--draft-tokens", "4", api=True)
        c.wait_ready(p, stages=1)
        cl = openai.OpenAI(base_url=f"{p.api}/v1", api_key="x", max_retries=0, timeout=300)
        assert speculation(p.api)["draft"] == str(embedded_path)
        for prompt in (EDIT, PLAIN):
            assert ask(cl, prompt, n=32) == ask(cl, prompt, n=32, draft=False)
        spec = speculation(p.api)
        # the model drafting for itself: (nearly) every draft holds
        assert spec["drafted_tokens"] > 0 and spec["acceptance"] > 0.9, spec
    finally:
        c.stop()
