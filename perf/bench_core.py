"""Core benchmark: our MLX and torch backends and a mixed two-slice split against their peers.

    .venv/bin/python perf/bench_core.py [--quick] [--models embedded,llama1b] [--threads N]
                                        [--tokens N] [--prompt N] [--repeats N] [--dtype D]
                                        [--only mlx,torch,split] [--json PATH]

Contenders, per model, each loaded alone (and freed before the next), warmed up, then timed:
  together mlx     one MLXShard 0-N, our greedy loop (prompt chunk, then one token per step); the
                   shard computes each decode step ahead asynchronously, as mlx_lm does
  together mlx sync  the same with the step ahead off (each step evaluated before it returns)
  mlx_lm           mlx_lm.generate.generate_step on the same weights (the converted MLX dir of the
                   GGUF; the same safetensors dir for the synthetic model), same dtype
  together torch   one TorchShard 0-N, the same loop
  transformers     LlamaForCausalLM.generate (greedy, use_cache=True) on the same weights and dtype
  together split   Pipeline mlx:0-N/2 + torch:N/2-N, hidden states through the wire codec
Prefill tok/s = prompt tokens / time to the first generated token (call to first token);
decode tok/s = (tokens - 1) / time from the first to the last generated token; cpu ms/tok = the
process's CPU time (all threads) over the same span per token, steadier than wall time when other
processes share the cores (the cpu time ratio is theirs/ours: above 1, ours spends less). EOS is ignored
everywhere: every contender produces exactly --tokens tokens. With --repeats > 1 the best run
of each metric is kept (these machines are shared; the best run is the one least disturbed).
The embedded model's contenders are loaded together and timed round-robin; the 1B model's are
loaded one at a time (each is ~5 GB in float32).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

# -------------------------------------------------------------------------------- models

LLAMA1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000,
    eos_token_id=128001, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)
# defaults (prompt tokens, decode tokens, repeats); --quick halves the token counts.
# The 1B prompt is short because MLX's CPU build does dense float32 matmuls through the reference
# (netlib) BLAS at ~2 GFLOP/s: a 128-token prefill of a 1.2B model takes ~2.5 minutes there.
DEFAULTS = {"embedded": (128, 128, 2), "llama1b": (32, 32, 1)}
TEXT = (
    "The history of the lighthouse begins in the ancient world, where fires were lit on hilltops "
    "to guide ships into harbour. The most famous of these was the Pharos of Alexandria, built in "
    "the third century BC on a small island off the coast of Egypt. It stood for more than a "
    "thousand years and was counted among the seven wonders of the ancient world. Later towers "
    "used candles, then oil lamps with reflectors, and in the nineteenth century the Fresnel lens "
    "made it possible to send a beam of light many miles out to sea. Keepers lived in the towers "
    "with their families, trimming the wicks, winding the clockwork that turned the lens, and "
    "writing the weather into the log every few hours. Today almost every lighthouse is automatic, "
    "and many of the old keepers' cottages have become museums or holiday homes."
)


def bench_dir() -> Path:
    from backends.models import cache_dir

    d = cache_dir() / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def make_llama1b() -> Path:
    """A Llama-3.2-1B-shaped checkpoint with random bf16 weights, created once and cached."""
    out = bench_dir() / "llama-1b-random"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return legacy_rope_keys(out)
    import torch
    import transformers

    log(f"creating the random Llama-3.2-1B-shaped checkpoint in {out} (once)")
    cfg = transformers.LlamaConfig(**LLAMA1B)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.generation_config.eos_token_id = None
    tmp = out.with_name(out.name + ".tmp")
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    del model
    gc.collect()
    tmp.rename(out)
    return legacy_rope_keys(out)


def legacy_rope_keys(path: Path) -> Path:
    """transformers 5 saves rope_theta and the llama3 scaling only under "rope_parameters", which
    mlx_lm 0.32 ignores (it would run rope_theta 10000 unscaled: another model). The hub's
    Llama-3.2-1B config.json has the top-level rope_theta/rope_scaling keys; add them likewise."""
    f = path / "config.json"
    d = json.loads(f.read_text())
    rope = d.get("rope_parameters") or {}
    if "rope_scaling" not in d and rope:
        d["rope_theta"] = rope.get("rope_theta", LLAMA1B["rope_theta"])
        d["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        f.write_text(json.dumps(d, indent=2) + "\n")
    return path


def mlx_dir_for(gguf: Path, dtype: str) -> Path:
    """The GGUF converted to an mlx-community dir (dense parts in float16 or float32), cached."""
    from backends.convert import gguf_to_mlx

    dense = dtype if dtype in ("float16", "float32") else "float32"
    out = bench_dir() / f"{gguf.stem}-mlx-{dense}"
    if not (out / "config.json").exists():
        log(f"converting {gguf.name} to an MLX dir ({dense}) in {out} (once)")
        gguf_to_mlx(gguf, out, dtype=dense, tokenizer=False)
    return out


# -------------------------------------------------------------------------------- utilities

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def free_memory() -> None:
    gc.collect()
    try:
        import mlx.core as mx

        mx.clear_cache()
    except Exception:
        pass


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def environment(args) -> dict:
    import mlx.core as mx
    import torch
    import transformers
    from importlib.metadata import version

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    blas = "?"
    try:
        libs = Path(mx.__file__).resolve().parent.parent / "mlx_cpu.libs"
        found = sorted(libs.glob("libblas*")) if libs.exists() else []
        if found:
            # a ~700 KB libblas is the netlib reference build: single-threaded, unblocked sgemm
            ref = found[0].stat().st_size < 2_000_000
            blas = f"bundled {found[0].name.split('-')[0]}{' (netlib reference)' if ref else ''}"
        elif mx.metal.is_available():
            blas = "Accelerate"
        else:
            blas = "system"
    except Exception:
        pass
    return {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "cpu_affinity": affinity,
        "mem_total_gb": round(mem_total_gb(), 1), "python": platform.python_version(),
        "platform": platform.platform(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "mlx": version("mlx"), "mlx_lm": version("mlx_lm"), "transformers": transformers.__version__,
        "mlx_device": str(mx.default_device()), "mlx_metal": bool(mx.metal.is_available()),
        "mlx_cpu_blas": blas, "loadavg_start": loadavg(),
    }


# -------------------------------------------------------------------------------- runners
# each runner: (prompt ids, n tokens) -> (prefill_s, decode_s, tokens)


def ours_runner(pipe):
    from backends.sampling import SamplingParams
    from backends.shard import SeqChunk

    def run(prompt: list[int], n: int):
        seq = "bench"
        t0 = time.perf_counter()
        pipe.add(seq, SamplingParams(), prompt)
        try:
            (s,) = pipe.step([SeqChunk(seq, 0, len(prompt))], np.asarray(prompt, np.int32))
            t1, c1 = time.perf_counter(), time.process_time()
            toks = [s.token]
            for i in range(n - 1):
                (s,) = pipe.step([SeqChunk(seq, len(prompt) + i, 1)], np.array([toks[-1]], np.int32))
                toks.append(s.token)
            t2, c2 = time.perf_counter(), time.process_time()
        finally:
            pipe.free(seq)
        return t1 - t0, t2 - t1, toks, c2 - c1

    return run


def mlx_lm_runner(model):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    def run(prompt: list[int], n: int):
        t0 = time.perf_counter()
        gen = generate_step(mx.array(prompt), model, max_tokens=n)
        toks, t1 = [], None
        for y, _ in gen:
            toks.append(int(y))
            if t1 is None:
                t1, c1 = time.perf_counter(), time.process_time()
        t2, c2 = time.perf_counter(), time.process_time()
        mx.synchronize()
        return t1 - t0, t2 - t1, toks, c2 - c1

    return run


def transformers_runner(model):
    import torch
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times, self.cpu = [], []

        def put(self, value):
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())

        def end(self):
            pass

    model.generation_config.eos_token_id = None  # fixed token counts: never stop on EOS

    def run(prompt: list[int], n: int):
        ids = torch.tensor([prompt], dtype=torch.long)
        cfg = GenerationConfig(max_new_tokens=n, do_sample=False, use_cache=True, eos_token_id=None,
                               pad_token_id=0, temperature=None, top_p=None, top_k=None)
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg,
                                 streamer=clock)
        toks = out[0, len(prompt):].tolist()
        assert len(toks) == n, f"transformers generated {len(toks)} tokens, expected {n}"
        # times[0]: the prompt handed to the streamer; times[1]: the first token; times[-1]: the last
        return (clock.times[1] - t0, clock.times[-1] - clock.times[1], toks,
                clock.cpu[-1] - clock.cpu[1])

    return run


# -------------------------------------------------------------------------------- loaders
# each loader returns (runner, handle to drop)


def load_ours(ck, slices, dtype, threads, ahead=True):
    from backends.pipeline import Pipeline, SliceSpec

    pipe = Pipeline.load(ck, [SliceSpec(b, s, e) for b, s, e in slices], dtype=dtype, threads=threads)
    if not ahead:  # the synchronous path: each step evaluated, nothing computed ahead
        for sh in pipe.shards:
            sh.speculate = False
    return ours_runner(pipe), pipe


def load_mlx_lm(path: Path, dtype: str):
    import mlx.core as mx
    from mlx_lm.utils import load_model

    from backends.mlx.shard import MX_DTYPES

    model, _ = load_model(path)
    model.set_dtype(MX_DTYPES[dtype])  # floating parameters only; packed quantized weights stay
    mx.eval(model.parameters())
    return mlx_lm_runner(model), model


def load_transformers_gguf(gguf: Path, ck, dtype: str):
    """As tests/backends/test_torch_backend.py: transformers' own GGUF reader and dequantization."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        ref = LlamaForCausalLM(LlamaConfig(**ck.config.to_hf_dict()))
    sd = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=ref)["tensors"]
    ref.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()}, strict=False, assign=True)
    ref.tie_weights()
    ref.model.rotary_emb = type(ref.model.rotary_emb)(ref.config)
    ref.to(getattr(torch, dtype)).eval()
    return transformers_runner(ref), ref


def load_transformers_dir(path: Path, dtype: str):
    import torch
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()
    return transformers_runner(ref), ref


# -------------------------------------------------------------------------------- benchmark


def measure(group: list[tuple[str, object]], prompt: list[int], n: int, warm: tuple[int, int],
            repeats: int) -> list[dict]:
    """Load the contenders of a group together, warm each up, then time them round-robin (so that
    a burst of load from other processes hits all of them alike), and free them."""
    loaded = []
    try:
        for name, loader in group:
            log(f"  {name}: loading")
            t = time.perf_counter()
            run, handle = loader()
            loaded.append([name, run, handle, time.perf_counter() - t, []])
            log(f"  {name}: loaded in {loaded[-1][3]:.1f}s; warm-up ({warm[0]} prompt + {warm[1]} tokens)")
            run(prompt[:warm[0]], warm[1])
        for r in range(repeats):
            for item in loaded:
                name, run = item[0], item[1]
                pre, dec, toks, cpu = run(prompt, n)
                item[4].append({"prefill_s": pre, "decode_s": dec, "tokens": toks, "decode_cpu_s": cpu})
                log(f"  {name}: run {r + 1}: prefill {len(prompt) / pre:.1f} tok/s, "
                    f"decode {(n - 1) / dec:.2f} tok/s")
        out = []
        for name, _, _, load_s, runs in loaded:
            out.append({"contender": name, "load_s": load_s, "prompt_tokens": len(prompt),
                        "decode_tokens": n,
                        "prefill_tps": len(prompt) / min(x["prefill_s"] for x in runs),
                        "decode_tps": (n - 1) / min(x["decode_s"] for x in runs),
                        # CPU time of the whole process (every thread) per decoded token: less
                        # sensitive than wall time to other processes on a shared machine
                        "decode_cpu_ms": 1000 * min(x["decode_cpu_s"] for x in runs) / (n - 1),
                        "tokens": runs[-1]["tokens"],
                        "runs": [{k: x[k] for k in ("prefill_s", "decode_s", "decode_cpu_s")} for x in runs]})
        return out
    finally:
        loaded.clear()
        free_memory()


def bench_model(key: str, args, threads: int) -> dict:
    import mlx.core as mx

    from backends.models import resolve_model
    from backends.shard import default_dtype
    from backends.weights import open_checkpoint

    p_default, n_default, rep_default = DEFAULTS[key]
    P = args.prompt or (p_default // 2 if args.quick else p_default)
    N = args.tokens or (n_default // 2 if args.quick else n_default)
    repeats = args.repeats or (1 if args.quick else rep_default)

    if key == "embedded":
        path = resolve_model("smollm2-135m", quiet=True)
        label = "smollm2-135m"
    else:
        path = make_llama1b()
        label = "llama1b-random"
    ck = open_checkpoint(path)
    L = ck.config.num_hidden_layers
    half = L // 2
    # MLX: float16 on Metal, float32 on a CPU (its half kernels crawl there); torch: float32 on CPU
    mdt = args.dtype if args.dtype != "auto" else default_dtype("mlx", ck)
    tdt = args.dtype if args.dtype != "auto" else "float32"
    sdt = args.dtype if args.dtype != "auto" else "float32"

    if key == "embedded":
        from backends.tokenizer import Tokenizer

        tok = Tokenizer.from_checkpoint(ck)
        ids = tok.encode(TEXT)
        while len(ids) < P:
            ids = ids + ids
        prompt = ids[:P]
        mlx_path = mlx_dir_for(path, mdt)
        warm = (P, 4)
    else:
        prompt = np.random.default_rng(0).integers(0, ck.config.vocab_size, P).tolist()
        mlx_path = path
        warm = (min(P, 8), 2)  # MLX's CPU prefill is slow here; the warm-up only needs each op once

    log(f"{label}: {L} layers, prompt {P} tokens, {N} decode tokens, {repeats} run(s) each")
    C = [
        ("together mlx", mdt, lambda: load_ours(ck, [("mlx", 0, L)], mdt, threads)),
        ("together mlx sync", mdt, lambda: load_ours(ck, [("mlx", 0, L)], mdt, threads, ahead=False)),
        ("mlx_lm", mdt, lambda: load_mlx_lm(mlx_path, mdt)),
        ("together torch", tdt, lambda: load_ours(ck, [("torch", 0, L)], tdt, threads)),
        ("transformers", tdt, (lambda: load_transformers_gguf(path, ck, tdt)) if key == "embedded"
         else (lambda: load_transformers_dir(path, tdt))),
        (f"together split mlx:0-{half}+torch:{half}-{L}", sdt,
         lambda: load_ours(ck, [("mlx", 0, half), ("torch", half, L)], sdt, threads)),
    ]
    keep = {"mlx": C[:3], "torch": C[3:5], "split": C[5:]}
    C = [c for part in args.only.split(",") for c in keep[part.strip()]]
    # the embedded model is small: all five load at once and run interleaved; the 1B model is
    # ~5 GB per float32 copy, so its contenders load (and are freed) one at a time
    groups = [C] if key == "embedded" else [[c] for c in C]
    rows = []
    for g in groups:
        rows += measure([(name, loader) for name, _, loader in g], prompt, N, warm, repeats)
    for r, (_, dt, _) in zip(rows, C):
        r["dtype"] = dt
    by = {r["contender"]: r for r in rows}

    def ratio(a, b, k):
        return by[a][k] / by[b][k]

    pairs = [p for p in [("together mlx", "mlx_lm"), ("together mlx sync", "mlx_lm"),
                         ("together torch", "transformers")] if p[0] in by]
    for a, b in pairs:
        by[a]["vs"] = {b: {"prefill": ratio(a, b, "prefill_tps"), "decode": ratio(a, b, "decode_tps"),
                           "cpu": ratio(b, a, "decode_cpu_ms")}}
    checks = greedy_checks(by, pairs, min(32, N))
    result = {"model": label, "path": str(path), "prompt_tokens": P, "decode_tokens": N,
              "repeats": repeats, "rows": rows, "checks": checks, "random_weights": key != "embedded"}
    if not rows[-1]["contender"].startswith("together split"):
        return result
    split = rows[-1]
    singles = ["together mlx", "together torch"]
    if any(s not in by for s in singles):
        return result
    split["vs"] = {s: {"prefill": ratio(split["contender"], s, "prefill_tps"),
                       "decode": ratio(split["contender"], s, "decode_tps")} for s in singles}
    # layer-weighted estimate: half the layers at each single backend's per-token time
    est = {k: 1.0 / (0.5 / by["together mlx"][k] + 0.5 / by["together torch"][k])
           for k in ("prefill_tps", "decode_tps")}
    split["vs"]["half+half estimate"] = {"prefill": split["prefill_tps"] / est["prefill_tps"],
                                         "decode": split["decode_tps"] / est["decode_tps"]}
    slower = min(singles, key=lambda s: by[s]["decode_tps"])
    split["slower_single"] = slower
    split["within_5pct_of_slower"] = split["decode_tps"] >= 0.95 * by[slower]["decode_tps"]

    result["checks"] = greedy_checks(by, pairs + [(split["contender"], s) for s in singles[::-1]],
                                     min(32, N))
    return result


def greedy_checks(by: dict, pairs: list[tuple[str, str]], K: int) -> list[dict]:
    checks = []
    for a, b in pairs:
        ta, tb = by[a]["tokens"][:K], by[b]["tokens"][:K]
        first = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
        checks.append({"ours": a, "reference": b, "tokens": K, "equal": ta == tb,
                       "first_mismatch": first})
    return checks


# -------------------------------------------------------------------------------- report


def fmt_ratio(v: dict | None, k: str) -> str:
    if not v:
        return ""
    return "; ".join(f"{x[k]:.2f}x vs {name}" for name, x in v.items())


def report(res: dict) -> str:
    lines = []
    name_w = max(len(r["contender"]) for r in res["rows"]) + 2
    model_w = max(len(res["model"]), 5) + 2
    head = (f"{'model':<{model_w}}{'dtype':<9}{'contender':<{name_w}}{'prefill tok/s':>14}"
            f"{'decode tok/s':>14}{'cpu ms/tok':>12}  {'prefill ratio':<22}decode ratio (cpu time ratio)")
    lines += [head, "-" * len(head)]
    for r in res["rows"]:
        vs = r.get("vs")
        if vs and len(vs) > 1:
            pre = "see below"
            dec = "see below"
        else:
            pre, dec = fmt_ratio(vs, "prefill"), fmt_ratio(vs, "decode")
            if vs:
                dec += "".join(f" ({x['cpu']:.2f}x)" for x in vs.values())
        lines.append(f"{res['model']:<{model_w}}{r['dtype']:<9}{r['contender']:<{name_w}}"
                     f"{r['prefill_tps']:>14.1f}{r['decode_tps']:>14.2f}{r['decode_cpu_ms']:>12.1f}  "
                     f"{pre:<22}{dec}")
    s = res["rows"][-1]
    if "slower_single" in s:
        lines.append("split (ours/theirs, tok/s ratios):")
        for name, x in s["vs"].items():
            lines.append(f"  vs {name:<20} prefill {x['prefill']:.2f}x  decode {x['decode']:.2f}x")
        lines.append(f"  target: decode within 5% of the slower single backend ({s['slower_single']}): "
                     f"{'met' if s['within_5pct_of_slower'] else 'NOT met'}")
    lines.append(f"prompt {res['prompt_tokens']} tokens, {res['decode_tokens']} decode tokens, "
                 f"best of {res['repeats']} run(s); load s: "
                 + ", ".join(f"{r['contender'].split(' mlx:')[0]} {r['load_s']:.1f}" for r in res["rows"]))
    tag = " (random weights: informational)" if res["random_weights"] else ""
    for c in res["checks"]:
        extra = "" if c["equal"] else f" (first mismatch at token {c['first_mismatch']})"
        lines.append(f"greedy check{tag}: {c['ours']} vs {c['reference']}, first {c['tokens']} "
                     f"tokens: {'equal' if c['equal'] else 'UNEQUAL'}{extra}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="halve the token counts, one run each")
    ap.add_argument("--models", default="embedded,llama1b", help="embedded,llama1b")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--tokens", type=int, default=0, help="decode tokens (default 128 embedded, 32 1B)")
    ap.add_argument("--prompt", type=int, default=0, help="prompt tokens (default 128 embedded, 32 1B)")
    ap.add_argument("--repeats", type=int, default=0, help="timed runs per contender (best kept)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                    help="compute dtype of every contender (auto: float32 on CPU, MLX float16 on Metal)")
    ap.add_argument("--only", default="mlx,torch,split",
                    help="contender groups to run: mlx (ours, mlx_lm), torch (ours, transformers), "
                         "split (needs mlx and torch for its ratios); default all")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = ap.parse_args()
    if not set(p.strip() for p in args.only.split(",")) <= {"mlx", "torch", "split"}:
        ap.error(f"--only {args.only!r}: expected a comma-separated subset of mlx,torch,split")

    import torch

    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in DEFAULTS:
            ap.error(f"unknown model {m!r} (expected embedded or llama1b)")
    env = environment(args)
    log(f"load average at start: {env['loadavg_start']}")
    results = [bench_model(m, args, args.threads) for m in models]
    env["loadavg_end"] = loadavg()
    env["wall_s"] = round(time.perf_counter() - T0, 1)

    print(f"environment: {env['cpu']}, {env['cpu_count']} CPUs ({env['cpu_affinity']} usable), "
          f"{env['mem_total_gb']} GiB RAM; torch {env['torch']} ({env['torch_threads']} threads), "
          f"mlx {env['mlx']} on {env['mlx_device']} (CPU BLAS: {env['mlx_cpu_blas']}), "
          f"mlx_lm {env['mlx_lm']}, transformers {env['transformers']}, python {env['python']}")
    print(f"load average (1/5/15 min): start {env['loadavg_start']}, end {env['loadavg_end']}; "
          f"wall {env['wall_s']}s")
    busy = float(env["loadavg_start"].split()[0]) if env["loadavg_start"] != "?" else 0.0
    if busy + args.threads > (env["cpu_affinity"] or 1) + 0.5:
        print(f"WARNING: other processes were busy (1-min load {busy:.2f} on {env['cpu_affinity']} "
              f"CPUs) and torch runs {args.threads} threads: OpenMP threads that wait on a "
              f"preempted peer make torch many times slower; compare ratios, not absolutes")
    print()
    for res in results:
        print(report(res) + "\n")
    if args.json:
        for res in results:
            for r in res["rows"]:
                r["tokens"] = r["tokens"][:64]
        Path(args.json).write_text(json.dumps({"environment": env, "models": results}, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
