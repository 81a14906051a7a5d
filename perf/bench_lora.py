"""LoRA training speed: `together lora` beside `mlx_lm.lora` on the same model, data and settings.

Both train the embedded SmolLM2-135M as QLoRA (the Q4_1 GGUF converted once to an MLX directory,
4-bit layers kept packed) in separate processes, one after the other, repeated; each reports
tokens/s per report window (the first window, which includes compilation, is dropped), the MLX
allocator's peak and the process's peak RSS. Prints one table with ours/theirs ratios.
Run: `.venv/bin/python perf/bench_lora.py [--iters 12] [--batch-size 2] [--rounds 2]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Both contenders train through mlx_lm.tuner.trainer.train; this wrapper runs one of them as
# __main__ with a callback spliced into that function, so both report the same numbers (the
# trainer's own tokens/s and MLX peak memory per report window), plus the peak at exit.
SPY = """
import atexit, json, runpy, sys
import mlx.core as mx
import mlx_lm.tuner.trainer as T
from mlx_lm.tuner.callbacks import TrainingCallback
orig = T.train
def train(*a, training_callback=None, **k):
    class Spy(TrainingCallback):
        def on_train_loss_report(self, info):
            print("TRAIN_INFO " + json.dumps(info), file=sys.stderr, flush=True)
            if training_callback is not None:
                training_callback.on_train_loss_report(info)
        def on_val_loss_report(self, info):
            if training_callback is not None:
                training_callback.on_val_loss_report(info)
    return orig(*a, training_callback=Spy(), **k)
T.train = train
atexit.register(lambda: print(f"MLX_PEAK {mx.get_peak_memory()}", file=sys.stderr, flush=True))
mod = sys.argv[1]
sys.argv = [mod] + sys.argv[2:]
runpy.run_module(mod, run_name="__main__")
"""
TOPICS = ["lighthouses", "tides", "bread", "bridges", "owls", "glaciers", "violins", "comets"]


def make_data(d: Path, n: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        recs.append({"messages": [
            {"role": "user", "content": f"Tell me one fact about {t} (#{i})."},
            {"role": "assistant", "content": f"Here is fact number {i} about {t}: it is a fine thing "
                                             f"to learn about {t} on a quiet afternoon."}]})
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))


def run(cmd: list[str]) -> tuple[str, float, int]:
    """stderr+stdout, wall seconds and peak RSS (bytes) of one training process."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         stdin=subprocess.DEVNULL, env=dict(os.environ, TOKENIZERS_PARALLELISM="false",
                                                            PYTHONPATH=str(ROOT)))
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return out, time.perf_counter() - t, usage.ru_maxrss * 1024


def parse(kind: str, out: str) -> dict:
    rows = [json.loads(m) for m in re.findall(r"^TRAIN_INFO (.*)$", out, re.M)]
    if len(rows) < 2:
        sys.exit(f"could not read the {kind} training reports:\n{out[-3000:]}")
    peak = re.search(r"MLX_PEAK (\d+)", out)
    return {"tok_s": statistics.mean(r["tokens_per_second"] for r in rows[1:]),
            "final_loss": rows[-1]["train_loss"], "first_loss": rows[0]["train_loss"],
            "mlx_peak": int(peak.group(1)) if peak else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--records", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()

    import mlx.core as mx
    import mlx_lm

    from apps.lora import mlx_model_dir

    model = mlx_model_dir("smollm2-135m")
    load0 = os.getloadavg()
    t0 = time.time()
    common = ["--iters", str(a.iters), "--batch-size", str(a.batch_size), "--learning-rate", "1e-4",
              "--max-seq-length", "128", "--val-batches", "1"]
    results: dict[str, list[dict]] = {"ours": [], "mlx_lm": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_data(data, a.records)
        for r in range(a.rounds):
            for kind in ("ours", "mlx_lm") if r % 2 == 0 else ("mlx_lm", "ours"):
                out_dir = Path(tmp) / f"{kind}-{r}"
                if kind == "ours":
                    cmd = [sys.executable, "-c", SPY, "apps.cli", "lora", "--data", str(data), *common,
                           "--layers", str(a.layers), "--rank", str(a.rank), "--report-every", "2",
                           "--save-every", str(a.iters), "--val-every", str(a.iters * 10),
                           "--adapter-path", str(out_dir)]
                else:
                    cfg = Path(tmp) / "mlx_lm.yaml"
                    cfg.write_text(f"lora_parameters: {{rank: {a.rank}, scale: 20.0, dropout: 0.0}}\n")
                    cmd = [sys.executable, "-c", SPY, "mlx_lm", "lora", "--train", "--model", str(model),
                           "--data", str(data), *common, "--num-layers", str(a.layers), "-c", str(cfg),
                           "--steps-per-report", "2", "--steps-per-eval", str(a.iters * 10),
                           "--save-every", str(a.iters), "--adapter-path", str(out_dir)]
                out, wall, rss = run(cmd)
                res = parse(kind, out)
                res.update(wall=wall, rss=rss)
                results[kind].append(res)
                print(f"  round {r + 1} {kind}: {res['tok_s']:.1f} tok/s, loss {res['first_loss']:.3f} -> "
                      f"{res['final_loss']:.3f}, MLX peak {res['mlx_peak'] / 1e9:.2f} GB, "
                      f"RSS {rss / 1e9:.2f} GB, {wall:.0f} s", file=sys.stderr, flush=True)

    def best(kind: str, key: str, fn=max):
        return fn(x[key] for x in results[kind])

    load1 = os.getloadavg()
    print(f"LoRA training: smollm2-135m QLoRA (Q4_1 layers packed, float32 compute) on "
          f"{mx.default_device()}, mlx {mx.__version__}, mlx_lm {mlx_lm.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"settings: {a.iters} iters, batch {a.batch_size}, rank {a.rank}, last {a.layers} layers, "
          f"{a.records} chat records; best of {a.rounds} round(s); load avg {load0[0]:.2f} -> "
          f"{load1[0]:.2f}; wall {time.time() - t0:.0f} s")
    head = f"{'contender':<16}{'train tok/s':>12}{'MLX peak GB':>13}{'peak RSS GB':>13}{'final loss':>12}"
    print(head)
    print("-" * len(head))
    for kind, label in (("ours", "together lora"), ("mlx_lm", "mlx_lm.lora")):
        print(f"{label:<16}{best(kind, 'tok_s'):>12.1f}{best(kind, 'mlx_peak', min) / 1e9:>13.3f}"
              f"{best(kind, 'rss', min) / 1e9:>13.3f}{best(kind, 'final_loss', min):>12.3f}")
    ratio = best("ours", "tok_s") / best("mlx_lm", "tok_s")
    print(f"ratio (ours/theirs): tokens/s {ratio:.2f}x, MLX peak "
          f"{best('ours', 'mlx_peak', min) / max(best('mlx_lm', 'mlx_peak', min), 1):.2f}x, peak RSS "
          f"{best('ours', 'rss', min) / best('mlx_lm', 'rss', min):.2f}x; target: tokens/s >= 1.00x: "
          f"{'met' if ratio >= 1.0 else 'not met'} (run-to-run noise here is a few %)")


if __name__ == "__main__":
    main()
