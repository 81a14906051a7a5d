"""Speculative decoding in one process (`Pipeline.generate`, what `together generate` runs): decode
tokens/s of one stream with and without drafts, on the same loaded model, interleaved, in one run.

For each split (default torch:0-30 and mlx:0-30 of the embedded model, its default dtype, one thread)
and prompt (an edit whose answer copies its text; a code change), the same greedy request runs
without drafts, with prompt lookup (AdaptiveK, timed: the default) and with a fixed k (`--fixed`),
after a warm-up, `--rounds` times each, alternating; the median decode tokens/s, its ratio to no
drafts, the drafts accepted, the tokens per step and whether the text is the same are printed.
`--self` adds the embedded model drafting for itself (acceptance ~100 %; in one process it costs as
much as it saves: this records the acceptance). The ring's benchmark is perf/bench_spec.py.

    .venv/bin/python perf/bench_spec_local.py [--splits torch:0-30,mlx:0-30] [--tokens 100] [--rounds 3]
                                              [--fixed 6] [--self] [--prompts edit,code]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.models import resolve_model  # noqa: E402
from backends.pipeline import Pipeline, parse_shards  # noqa: E402
from backends.sampling import SamplingParams  # noqa: E402
from backends.speculation import PromptLookup, make_drafter  # noqa: E402
from backends.tokenizer import Tokenizer  # noqa: E402
from backends.weights import open_checkpoint  # noqa: E402

PROMPTS = {
    "edit": "Rewrite the following paragraph, replacing every 'cat' with 'dog'. Keep everything else exactly "
            "the same.\n\nThe cat sat on the warm windowsill every morning, watching the birds in the garden "
            "below. When the sun rose higher, the cat stretched, yawned, and jumped down to the kitchen floor, "
            "where its bowl of food was waiting. After eating, the cat wandered into the living room and curled "
            "up on the sofa for a long nap.",
    "code": "Add a docstring to this Python function and return the whole function:\n\ndef moving_average("
            "values, window):\n    if window <= 0:\n        raise ValueError('window must be positive')\n    out "
            "= []\n    total = 0.0\n    for i, v in enumerate(values):\n        total += v\n        if i >= "
            "window:\n            total -= values[i - window]\n        if i >= window - 1:\n            "
            "out.append(total / window)\n    return out",
}


def run(pipe, tok, prompt, params, how) -> tuple[float, dict, list[int]]:
    draft, k, adaptive = how
    stats: dict = {}
    toks = [d.token for d in pipe.generate(prompt, params, tok, stats, draft=draft, draft_tokens=k,
                                           adaptive=adaptive)]
    return (stats["generated_tokens"] - 1) / max(stats["decode_s"], 1e-9), stats, toks


def bench(split: str, ck, tok, args) -> list[tuple]:
    pipe = Pipeline.load(ck, parse_shards(split, ck.config.num_hidden_layers, "torch"), threads=args.threads)
    hows = {"off": (None, 0, True), "lookup": (PromptLookup(), args.fixed, True),
            f"lookup k={args.fixed}": (PromptLookup(), args.fixed, False)}
    if args.self:
        hows["itself"] = (make_drafter("smollm2-135m", ck, tok, backend=split.split(":")[0],
                                       threads=args.threads), args.fixed, True)
    rows = []
    try:
        for name in args.prompts.split(","):
            text = PROMPTS[name]
            prompt = tok.apply_chat([{"role": "user", "content": text}])
            params = SamplingParams(max_tokens=args.tokens)
            got: dict[str, list] = {h: [] for h in hows}
            for r in range(args.rounds + 1):  # round 0 warms up
                for h, how in hows.items():
                    res = run(pipe, tok, prompt, params, how)
                    if r:
                        got[h].append(res)
            base = statistics.median(t for t, _, _ in got["off"])
            for h, res in got.items():
                tps, st, toks = statistics.median(t for t, _, _ in res), res[-1][1], res[-1][2]
                acc = f"{st['accepted']}/{st['drafted']}" if st["drafted"] else "-"
                rows.append((split, name, h, st["generated_tokens"], f"{tps:.1f}", f"{tps / base:.2f}x", acc,
                             f"{(st['generated_tokens'] - 1) / max(st['steps'], 1):.2f}",
                             "yes" if toks == got["off"][-1][2] else "NO"))
    finally:
        pipe.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--splits", default="torch:0-30,mlx:0-30",
                    help="whole-model specs, comma-separated; separate by ';' when a spec has several slices "
                         "(e.g. 'mlx:0-15,torch:15-30;torch:0-30')")
    ap.add_argument("--prompts", default=",".join(PROMPTS), help=f"some of {', '.join(PROMPTS)}")
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fixed", type=int, default=6, help="the most drafts per step (and the fixed k row)")
    ap.add_argument("--self", action="store_true", help="also the embedded model drafting for itself")
    args = ap.parse_args()
    ck = open_checkpoint(resolve_model("smollm2-135m", quiet=True))
    tok = Tokenizer.from_checkpoint(ck)
    splits = args.splits.split(";") if ";" in args.splits else args.splits.split(",")
    rows = [r for s in splits for r in bench(s, ck, tok, args)]
    print("| split | prompt | draft | tokens | decode tok/s | vs off | accepted/drafted | tok/step | same text |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")
    return 0 if all(r[-1] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
