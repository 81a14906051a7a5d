"""The per-token price of structured output: decode tok/s with and without a JSON schema, at batch 1
and 8, on one torch shard of the embedded model in process (one compute thread), and the time the
grammar's mask and advance take per token.

Every round decodes each (batch, grammar) case once, round-robin: B sequences prefilled one by one,
then `--steps` greedy decode steps of all B together through `TorchShard.forward`, as a last stage
runs them; the constrained case carries a schema that keeps the answer going (an array of at least
64 small objects: keys, strings, integers, enums), every row its own matcher. Timed by this thread's
CPU time (the machines are shared; `--wall` for wall time); medians over the rounds. The mask table
replays a constrained answer through a fresh matcher: the bitmask fill plus its unpacking to a
boolean row (`Constraint.mask`) and `consume`, per token.

    .venv/bin/python perf/bench_constrain.py [--batches 1,8] [--steps 48] [--rounds 3] [--dtype auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backends.constrain import Constraint, json_schema_grammar, model_ll_tokenizer  # noqa: E402
from backends.models import resolve_model  # noqa: E402
from backends.sampling import SamplingParams  # noqa: E402
from backends.shard import SeqChunk, default_dtype  # noqa: E402
from backends.tokenizer import Tokenizer  # noqa: E402
from backends.torch.shard import TorchShard  # noqa: E402
from backends.weights import open_checkpoint  # noqa: E402

SCHEMA = {
    "type": "array", "minItems": 64,
    "items": {"type": "object", "additionalProperties": False, "required": ["name", "kind", "count"],
              "properties": {"name": {"type": "string", "maxLength": 24}, "kind": {"enum": ["cat", "dog", "bird"]},
                             "count": {"type": "integer"}}},
}
PROMPT = "List every animal in the shelter as JSON records with a name, a kind and a count."


def decode(shard: TorchShard, prompt: list[int], b: int, steps: int, grammar: str,
           clock: Callable[[], float]) -> tuple[float, list[int]]:
    """Aggregate decode tok/s of `b` greedy sequences decoded together for `steps` steps, and the
    first sequence's tokens."""
    ids = [f"s{i}" for i in range(b)]
    last, first = {}, []
    for i, s in enumerate(ids):  # prompts of different lengths: the batch's caches are ragged
        p = prompt + prompt[:3 * i]
        shard.add_sequence(s, SamplingParams(grammar=grammar), prompt=p)
        last[s] = shard.forward([SeqChunk(s, 0, len(p))], np.asarray(p, np.int32))[0].token
    first.append(last[ids[0]])
    t0 = clock()
    for _ in range(steps):
        chunks = [SeqChunk(s, shard.seqs[s].length, 1) for s in ids]
        out = shard.forward(chunks, np.array([last[s] for s in ids], np.int32))
        last = {o.seq_id: o.token for o in out}
        first.append(last[ids[0]])
    dt = clock() - t0
    for s in ids:
        shard.free_sequence(s)
    return b * steps / dt, first


def mask_times(ck, grammar: str, tokens: list[int]) -> tuple[list[float], list[float]]:
    """Seconds of `Constraint.mask` and `consume` for each token of a constrained answer, replayed."""
    c = Constraint(grammar, model_ll_tokenizer(ck), int(ck.config.vocab_size))
    masks, consumes = [], []
    for t in tokens:
        t0 = time.perf_counter()
        allowed = c.mask()
        t1 = time.perf_counter()
        assert allowed[t], "the replayed answer left its grammar"
        c.consume([t])
        masks.append(t1 - t0)
        consumes.append(time.perf_counter() - t1)
    return masks, consumes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--wall", action="store_true", help="time by the wall clock, not this thread's CPU time")
    args = ap.parse_args()
    torch.set_num_threads(1)
    clock = time.perf_counter if args.wall else time.thread_time
    ck = open_checkpoint(resolve_model("smollm2-135m", quiet=True))
    dtype = default_dtype("torch", ck, "cpu") if args.dtype == "auto" else args.dtype
    shard = TorchShard(ck, 0, ck.config.num_hidden_layers, dtype, threads=1)
    tok = Tokenizer.from_checkpoint(ck)
    prompt = tok.apply_chat([{"role": "user", "content": PROMPT}])
    grammar = json_schema_grammar(SCHEMA)
    batches = [int(b) for b in args.batches.split(",")]
    decode(shard, prompt, 1, 4, grammar, clock)  # warm-up: the matcher's tokenizer loads here
    decode(shard, prompt, 1, 4, "", clock)
    rates: dict[tuple[int, bool], list[float]] = {(b, g): [] for b in batches for g in (False, True)}
    answer: list[int] = []
    for _ in range(args.rounds):
        for b in batches:
            for g in (False, True):
                rate, toks = decode(shard, prompt, b, args.steps, grammar if g else "", clock)
                rates[(b, g)].append(rate)
                if g:
                    answer = toks
    print(f"# structured output on the embedded model: torch {dtype}, 1 thread, {args.steps} decode steps, "
          f"{'wall' if args.wall else 'CPU'} time, medians of {args.rounds}; llguidance "
          f"{_version('llguidance')}, torch {torch.__version__}")
    print(f"{'batch':>5} {'free tok/s':>11} {'schema tok/s':>13} {'schema/free':>12}")
    for b in batches:
        free, cons = statistics.median(rates[(b, False)]), statistics.median(rates[(b, True)])
        print(f"{b:>5} {free:>11.1f} {cons:>13.1f} {cons / free:>11.2f}x")
    masks, consumes = mask_times(ck, grammar, answer)
    ms, cs = np.array(masks) * 1e6, np.array(consumes) * 1e6
    print(f"\n# per token of a constrained answer ({len(answer)} tokens, vocab {ck.config.vocab_size}), microseconds")
    print(f"{'':>8} {'median':>8} {'p90':>8} {'max':>8}")
    for name, xs in (("mask", ms), ("consume", cs)):
        print(f"{name:>8} {np.median(xs):>8.1f} {np.percentile(xs, 90):>8.1f} {xs.max():>8.1f}")
    text = tok.decode(answer)
    print(f"\n# the constrained answer begins: {text[:100]!r}")
    return 0


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


if __name__ == "__main__":
    sys.exit(main())
