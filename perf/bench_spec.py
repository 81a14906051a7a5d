"""Speculative decoding across the ring: decode tokens/s of one stream with and without drafts, in one run.

Two-peer rings of real `together join` processes on 127.0.0.1 (torch, one compute thread each, layers
split in half), driven through the OpenAI API: prompt lookup (the default `--draft lookup`) on an edit
prompt whose answer copies its text, on plain loopback and with `--link-delay-ms` on every peer (a
slow link's trip); and a draft model on the API peer (the embedded model drafting for itself, and a
smaller random model with the same tokenizer, whose drafts fail: k falls to 0). Each ring answers the
same request with drafts and without (the request's `draft: false`), interleaved, so the ratio is
measured on one ring at one moment; the answers must be equal. Decode tokens/s = (tokens - 1) / (time
of the last text chunk - time of the first), tokens from usage.

    .venv/bin/python perf/bench_spec.py [--tokens 96] [--rounds 3] [--delay-ms 2] [--only lookup,delay,self,random]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh.local import LocalMesh, http_json  # noqa: E402

TEXT = ("The lighthouse keeper climbed the stairs every evening at dusk. He lit the lamp, wound the clockwork, "
        "and watched the ships pass the rocks. One night a storm broke the glass, and he repaired it by hand "
        "before the morning boats came home. In the spring the town painted the tower white again, and the "
        "children who climbed it counted the steps aloud.")
EDIT = f"Fix the grammar of this text and write it out again:\n\n{TEXT}\n"


def random_draft_model(model: str) -> str:
    """A 2-layer random-weight Llama with the embedded model's tokenizer and vocabulary (its drafts are
    wrong), in a temporary HF directory."""
    import numpy as np
    from safetensors.numpy import save_file

    from backends.tokenizer import Tokenizer
    from backends.weights import open_checkpoint

    ck = open_checkpoint(model)
    out = Path(tempfile.mkdtemp(prefix="together-draft-")) / "random-2l"
    out.mkdir(parents=True)
    Tokenizer.from_checkpoint(ck).hf.save_pretrained(str(out))
    c = ck.config
    h, inter, heads, kv, layers, vocab = 128, 256, 4, 2, 2, c.vocab_size
    cfg = {"model_type": "llama", "hidden_size": h, "intermediate_size": inter, "num_attention_heads": heads,
           "num_key_value_heads": kv, "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": True}
    rng = np.random.default_rng(0)
    w = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    for n in range(layers):
        p = f"model.layers.{n}."
        hd = h // heads
        for m, shape in {"self_attn.q_proj": (heads * hd, h), "self_attn.k_proj": (kv * hd, h),
                         "self_attn.v_proj": (kv * hd, h), "self_attn.o_proj": (h, heads * hd),
                         "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}.items():
            w[p + m + ".weight"] = shape
        w[p + "input_layernorm.weight"] = w[p + "post_attention_layernorm.weight"] = (h,)
    save_file({k: (np.ones(s) if k.endswith("norm.weight") else 0.05 * rng.standard_normal(s)).astype(np.float32)
               for k, s in w.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


class Ring:
    """A two-peer ring kept up for the whole run (rounds interleave across rings)."""

    def __init__(self, name: str, model: str, dtype: str, api_args: list[str], both: list[str]) -> None:
        # api_args: the API peer's (its --draft); both: every peer's (the link delay)
        from openai import OpenAI

        self.name, self.mesh = name, LocalMesh(model)
        try:
            a = self.mesh.add("a", "--backend", "torch", "--dtype", dtype, "--no-mdns", "--settle", "0.5",
                              "--layers", "0-15", *api_args, *both, api=True)
            self.mesh.add("b", "--backend", "torch", "--dtype", dtype, "--no-mdns", "--settle", "0.5",
                          "--layers", "15-30", "--peer", a.address, *both)
            self.mesh.wait_ready(a, stages=2)
        except BaseException:
            self.mesh.stop()
            raise
        self.api = a
        self.client = OpenAI(base_url=f"{a.api}/v1", api_key="x", max_retries=0, timeout=600)
        self.tps: dict[bool, list[float]] = {True: [], False: []}
        self.texts: dict[bool, set[str]] = {True: set(), False: set()}
        self.stream(True, 8)  # warm up both paths
        self.stream(False, 8)

    def stream(self, draft: bool, tokens: int) -> float:
        t0 = time.perf_counter()
        times, n, text = [], 0, []
        s = self.client.completions.create(model="smollm2-135m", prompt=EDIT, max_tokens=tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True, "draft": draft})
        for ch in s:
            if ch.choices and ch.choices[0].text:
                times.append(time.perf_counter())
                text.append(ch.choices[0].text)
            if ch.usage:
                n = ch.usage.completion_tokens
        if tokens > 8:
            self.texts[draft].add("".join(text))
        return (n - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else n / (times[-1] - t0)

    def round(self, tokens: int) -> None:
        for d in (False, True):
            self.tps[d].append(self.stream(d, tokens))

    def result(self) -> dict:
        _, mesh = http_json(f"{self.api.api}/v1/mesh")
        spec = mesh.get("scheduler", {}).get("speculation", {})
        off, on = statistics.median(self.tps[False]), statistics.median(self.tps[True])
        return {"name": self.name, "off_tps": off, "on_tps": on, "ratio": on / off,
                "acceptance": spec.get("acceptance"), "drafted": spec.get("drafted_tokens"),
                "accepted": spec.get("accepted_tokens"), "same": self.texts[True] == self.texts[False]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--delay-ms", type=float, default=2.0)
    ap.add_argument("--only", default="lookup,delay,self,random")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from backends.models import resolve_model

    model = a.model or str(resolve_model("smollm2-135m"))
    want = a.only.split(",")
    setups: dict[str, tuple[str, list[str], list[str]]] = {
        "lookup": ("prompt lookup", [], []),
        "delay": (f"prompt lookup, +{a.delay_ms:g} ms/hop", [], ["--link-delay-ms", str(a.delay_ms)]),
        "self": ("draft model: itself", ["--draft", model], []),
        "random": ("draft model: random 2-layer", ["--draft", random_draft_model(model)] if "random" in want else [],
                   [])}
    load0 = os.getloadavg()[0]
    rings: list[Ring] = []
    try:
        for key in want:
            name, api_args, both = setups[key]
            rings.append(Ring(name, model, a.dtype, api_args, both))
        for _ in range(a.rounds):  # interleaved: each round measures every ring, off then on
            for r in rings:
                r.round(a.tokens)
        rows = [r.result() for r in rings]
    finally:
        for r in rings:
            r.mesh.stop()
    print(f"\nspeculative decoding, two-peer torch ring (0-15, 15-30) on 127.0.0.1: smollm2-135m, dtype {a.dtype}, "
          f"1 compute thread per peer, {os.cpu_count()} cores, load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'ring':<34}{'off tok/s':>11}{'on tok/s':>10}{'on vs off':>11}{'accepted':>10}{'drafted':>9}"
          f"{'acceptance':>12}{'same text':>11}")
    for r in rows:
        acc = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "-"
        print(f"{r['name']:<34}{r['off_tps']:>11.2f}{r['on_tps']:>10.2f}{r['ratio']:>10.2f}x{r['accepted'] or 0:>10}"
              f"{r['drafted'] or 0:>9}{acc:>12}{'yes' if r['same'] else 'NO':>11}")
    print(f"one greedy stream of {a.tokens} tokens (ignore_eos) on an edit prompt, median of {a.rounds} interleaved "
          f"rounds; targets: prompt lookup >= 1.8x, with +2 ms per hop >= 2.5x")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
