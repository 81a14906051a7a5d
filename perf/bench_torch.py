"""One torch peer against the runtimes a user already has, in one run, one compute thread each.

Contenders, timed round-robin (every round measures each once, medians reported):
- ours, default settings: a real `together join` process (`--threads 1`, layers 0-30) driven through
  the OpenAI API; on a CPU with native bfloat16 that is bfloat16 compute on packed int4 weights;
- ours with the other packed-weight kernel (`TOGETHER_KERNEL=q4|torch`: ours, kernels/q4.cpp, or torch's
  int4 kernel), the same way;
- ours, `--dtype float32`: the dense float32 path (the default before issue 13), same way;
- `transformers` `generate`, greedy, on the embedded model dequantized by transformers' own GGUF
  reader, in float32 and in bfloat16 (the best of the two is the target's yardstick);
- llama.cpp's `llama-bench` on the same GGUF (`-t 1`, pp512 and tg64), when `perf/llama_cpp.py` has
  built it (else that row is skipped).

Decode tok/s: a greedy stream of `--tokens` tokens with ignore_eos, (tokens - 1) over the time from
the first token to the last. Prefill tok/s: a 512-token prompt (token ids) over its time to first
token (ours through the API: HTTP, scheduling and the head included).

    .venv/bin/python perf/bench_torch.py [--tokens 64] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh.local import LocalMesh, http_json  # noqa: E402
from perf.bench_ring import PROMPT  # noqa: E402
from perf.llama_cpp import find_llama_bench  # noqa: E402

PREFILL = 512


class Runner(Protocol):
    format: str

    def decode(self, prompt: list[int], tokens: int) -> float: ...

    def prefill(self, prompt: list[int]) -> float: ...

    def close(self) -> None: ...


class Peer:
    """One `together join` peer holding every layer, with the API, measured through it."""

    def __init__(self, model: str, dtype: str, kernel: str | None = None):
        self.mesh = LocalMesh(model)
        env = {"TOGETHER_KERNEL": kernel} if kernel else None  # packed weights: torch's int4 kernel or our q4
        # no speculation and no prefix cache: the same prompt every round would be a cache hit, and llama-bench
        # and transformers draft nothing; this measures the peer's own per-token speed
        p = self.mesh.add("p", "--backend", "torch", "--dtype", dtype, "--no-mdns", "--layers", "0-30",
                          "--draft", "off", "--prefix-cache-memory", "0", api=True,
                          env=env)
        self.mesh.wait_ready(p, stages=1)
        _, view = http_json(f"{p.api}/v1/mesh")
        me = (view.get("peers") or [{}])[0]
        self.format = ", ".join(dict.fromkeys(x for x in (me.get("dtype"), me.get("weight_format")) if x)) or dtype
        from openai import OpenAI

        self.client = OpenAI(base_url=f"{p.api}/v1", api_key="x", max_retries=0, timeout=600)

    def _stream(self, prompt: list[int], max_tokens: int) -> tuple[float, list[float], int]:
        t0, times, n = time.perf_counter(), [], 0
        s = self.client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=max_tokens,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True},
                                           stream_options={"include_usage": True})
        for ch in s:
            if ch.choices and ch.choices[0].text:
                times.append(time.perf_counter())
            if ch.usage:
                n = ch.usage.completion_tokens
        return t0, times, n

    def decode(self, prompt: list[int], tokens: int) -> float:
        _, times, n = self._stream(prompt, tokens)
        return (n - 1) / (times[-1] - times[0])  # tokens from usage: a text chunk may hold several

    def prefill(self, prompt: list[int]) -> float:
        t0, times, _ = self._stream(prompt, 1)
        return len(prompt) / (times[0] - t0)

    def close(self) -> None:
        self.mesh.stop()


class HF:
    """transformers' LlamaForCausalLM on the embedded GGUF (its own dequantization), 1 thread."""

    def __init__(self, gguf: Path, dtype: str):
        import torch

        from backends.weights import open_checkpoint
        from perf.bench_core import load_transformers_gguf

        _, m = load_transformers_gguf(gguf, open_checkpoint(gguf), dtype)
        self.torch, self.model = torch, m
        self.format = dtype

    def _generate(self, prompt: list[int], n: int) -> float:
        ids = self.torch.tensor([prompt])
        t = time.perf_counter()
        with self.torch.inference_mode():
            self.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    def decode(self, prompt: list[int], tokens: int) -> float:
        return (tokens - 1) / (self._generate(prompt, tokens) - self._generate(prompt, 1))

    def prefill(self, prompt: list[int]) -> float:
        return len(prompt) / self._generate(prompt, 1)

    def close(self) -> None:
        self.model = None


class LlamaBench:
    """llama.cpp's llama-bench, one thread, the same file; one run per round."""

    format = "Q4_1 (as stored)"

    def __init__(self, exe: Path, gguf: Path):
        self.exe, self.gguf = exe, gguf
        self.last: dict = {}

    def _run(self, tokens: int) -> None:
        out = subprocess.run([str(self.exe), "-m", str(self.gguf), "-t", "1", "-p", str(PREFILL), "-n", str(tokens),
                              "-r", "1", "-o", "json"], capture_output=True, text=True, timeout=900, check=True)
        self.last = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in json.loads(out.stdout)}

    def decode(self, prompt: list[int], tokens: int) -> float:
        self._run(tokens)
        return float(self.last["tg"])

    def prefill(self, prompt: list[int]) -> float:
        return float(self.last["pp"])  # measured by the decode call of this round

    def close(self) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import torch
    import transformers

    from backends.models import resolve_model
    from backends.shard import default_dtype
    from backends.tokenizer import Tokenizer
    from backends.weights import open_checkpoint

    torch.set_num_threads(1)
    gguf = Path(a.model) if a.model else resolve_model("smollm2-135m")
    ck = open_checkpoint(gguf)
    tok = Tokenizer.from_checkpoint(ck)
    long = (tok.encode(PROMPT * 8) * 4)[:PREFILL]
    short = tok.encode("Count from one to one hundred.")
    load0 = os.getloadavg()[0]
    from backends.torch.quant import DEFAULT_KERNEL

    # the packed-weight kernel that is not the default, for comparison (perf/README.md: issue 13's q4 kernel)
    other = "TOGETHER_KERNEL=" + ("torch" if os.environ.get("TOGETHER_KERNEL", DEFAULT_KERNEL) == "q4" else "q4")
    makers: dict[str, Callable[[], Runner]] = {
        "ours, default": lambda: Peer(str(gguf), "auto"),
        f"ours, {other}": lambda: Peer(str(gguf), "auto", other.split("=")[1]),
        "ours, --dtype float32": lambda: Peer(str(gguf), "float32"),
        "transformers float32": lambda: HF(gguf, "float32"),
        "transformers bfloat16": lambda: HF(gguf, "bfloat16"),
    }
    if (exe := find_llama_bench()) is not None:
        makers["llama.cpp llama-bench"] = lambda: LlamaBench(exe, gguf)
    runners = {name: make() for name, make in makers.items()}
    res: dict[str, dict[str, list[float]]] = {n: {"decode": [], "prefill": []} for n in runners}
    try:
        for r in runners.values():  # warm-up
            r.decode(short, 8)
        for _ in range(a.rounds):
            for name, r in runners.items():
                res[name]["decode"].append(r.decode(short, a.tokens))
                res[name]["prefill"].append(r.prefill(long))
    finally:
        for r in runners.values():
            r.close()
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in res.items()}
    ours = med["ours, default"]
    print(f"\none torch peer vs its peers: smollm2-135m Q4_1, 1 compute thread each, {os.cpu_count()} cores, "
          f"default dtype here {default_dtype('torch', ck, 'cpu')}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'contender':<30}{'weights':<36}{'decode tok/s':>13}{'ours/it':>9}{'prefill512 tok/s':>18}{'ours/it':>9}")
    for name, m in med.items():
        fmt = runners[name].format
        print(f"{name:<30}{fmt:<36}{m['decode']:>13.1f}{ours['decode'] / m['decode']:>8.2f}x"
              f"{m['prefill']:>18.1f}{ours['prefill'] / m['prefill']:>8.2f}x")
    hf_best = max((n for n in med if n.startswith("transformers")), key=lambda n: med[n]["decode"])
    print(f"decode {a.tokens} tokens, median of {a.rounds} rounds. Targets: decode >= 1.25x {hf_best} "
          f"(best transformers); >= 0.8x llama.cpp tg; prefill >= 1.0x ours float32 and >= 1.5x llama.cpp pp512")
    if a.json:
        Path(a.json).write_text(json.dumps({"median": med, "runs": res}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
