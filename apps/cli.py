"""The `together` command line."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Callable

from backends.errors import TogetherError

if TYPE_CHECKING:
    from backends.sampling import SamplingParams

DRAFT_TOKENS = 8  # --draft-tokens: the most tokens a sequence drafts per trip around the ring


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (embedded), a local HF/MLX dir or .gguf, or an HF hub id (join: A,B "
                        "serves the first of these whose ring in the mesh lacks layers)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="compute dtype (auto: float16 on MLX, float32 on torch CPU, bfloat16 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="compute threads for this process")
    p.add_argument("--device", default="auto",
                   help="torch device: auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda[:N] or mps; "
                        "MLX picks Metal or its CPU by itself")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(a: argparse.Namespace) -> SamplingParams:
    from backends.sampling import SamplingParams

    return SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                          repetition_penalty=a.repetition_penalty, seed=a.seed,
                          max_tokens=a.max_tokens, stop=list(a.stop)).validate()


def cmd_generate(a: argparse.Namespace) -> int:
    from backends.generation import check_prompt
    from backends.lora import open_adapter
    from backends.models import resolve_model
    from backends.pipeline import Pipeline, SliceSpec, parse_shards
    from backends.shard import available_backends
    from backends.speculation import make_drafter
    from backends.tokenizer import Tokenizer
    from backends.weights import open_checkpoint

    params = _sampling(a)
    if a.draft_tokens < 0:
        raise TogetherError(f"--draft-tokens must be >= 0, got {a.draft_tokens}")
    ck = open_checkpoint(resolve_model(a.model))  # a bad --model is an error before any framework imports
    backend = a.backend or (available_backends() or ["torch"])[0]
    n = ck.config.num_hidden_layers
    slices = parse_shards(a.shards, n, backend) if a.shards else [SliceSpec(backend, 0, n)]
    adapters = [open_adapter(a.adapter)] if a.adapter else []
    tok = Tokenizer.from_checkpoint(ck)
    if a.raw:
        prompt = tok.encode(a.prompt)
    else:
        msgs = ([{"role": "system", "content": a.system}] if a.system else []) + \
               [{"role": "user", "content": a.prompt}]
        prompt = tok.apply_chat(msgs)
    check_prompt(len(prompt), ck.config.max_position_embeddings)
    t = time.perf_counter()
    pipe = Pipeline.load(ck, slices, dtype=a.dtype, threads=a.threads, device=a.device)
    for ad in adapters:
        pipe.load_adapter(ad)
    drafter = make_drafter(a.draft, ck, tok, backend=slices[-1].backend, dtype=a.dtype, device=a.device,
                           threads=a.threads) if a.draft_tokens else None
    load_s = time.perf_counter() - t
    stats: dict = {}
    use = adapters[0].name if adapters else ""
    try:
        for d in pipe.generate(prompt, params, tok, stats, adapter=use, draft=drafter,
                               draft_tokens=a.draft_tokens):
            sys.stdout.write(d.text)
            sys.stdout.flush()
    finally:
        pipe.close()  # stops tensor-parallel workers (they also exit when this process does)
        if drafter is not None:
            drafter.close()
    sys.stdout.write("\n")
    sys.stdout.flush()
    split = ",".join(f"{s.backend}:{s.start}-{s.end}" + (f"*{s.tp}" if s.tp > 1 else "")
                     for s in slices) + (f"+{use}" if use else "")
    print(f"[{split}] load {load_s:.1f}s | prompt {stats['prompt_tokens']} tok, "
          f"{stats['prompt_tokens'] / max(stats['prefill_s'], 1e-9):.1f} tok/s | "
          f"generated {stats['generated_tokens']} tok, "
          f"{max(stats['generated_tokens'] - 1, 0) / max(stats['decode_s'], 1e-9):.1f} tok/s | "
          f"finish: {stats['finish_reason']}{_draft_stats(a.draft if drafter else 'off', stats)}",
          file=sys.stderr)
    return 0


def _draft_stats(draft: str, stats: dict) -> str:
    """The stats line's speculation part: drafts accepted and tokens per step."""
    if draft.lower() == "off":
        return " | draft off"
    rate = stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0
    per = (stats["generated_tokens"] - 1) / max(stats["steps"], 1)
    return (f" | draft {draft}: accepted {stats['accepted']}/{stats['drafted']} ({rate:.0%}), "
            f"{per:.2f} tok/step")


def cmd_join(a: argparse.Namespace) -> int:
    import asyncio

    from apps.join import run_join

    code = asyncio.run(run_join(a))
    # the peer has left and closed everything: end the process now, without the interpreter's teardown (a
    # garbage collection over torch's and transformers' objects: seconds before a stopped peer is gone)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_status(a: argparse.Namespace) -> int:
    import asyncio

    from apps.join import run_status

    return asyncio.run(run_status(a))


def cmd_demo(a: argparse.Namespace) -> int:
    from apps.demo import run_demo

    return run_demo(a)


def cmd_fetch(a: argparse.Namespace) -> int:
    from backends.models import resolve_model

    print(resolve_model(a.model, quiet=a.quiet))
    return 0


def _add_mesh_key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh-key", default=None,
                   help="shared secret every peer of the mesh must hold: signs every message and encrypts "
                        "the ring (visible in ps: prefer TOGETHER_MESH_KEY or --mesh-key-file)")
    p.add_argument("--mesh-key-file", default=None, metavar="PATH", help="read the mesh key from this file")


def _resolve_keys(a: argparse.Namespace) -> None:
    """Keys from the flag, else the file, else the environment, so they need not show in ps."""
    from mesh.auth import read_key

    for name, env in (("mesh_key", "TOGETHER_MESH_KEY"), ("api_key", "TOGETHER_API_KEY")):
        if hasattr(a, name):
            setattr(a, name, read_key(getattr(a, name), getattr(a, f"{name}_file", None), env,
                                      "--" + name.replace("_", "-")))


def _add_join_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    j = sub.add_parser("join", help="join (or start) a mesh and serve some of the model's layers")
    _add_model_args(j)
    j.add_argument("--backend", choices=["auto", "mlx", "torch"], default="auto")
    j.add_argument("--host", default="",
                   help="the one address to listen on and advertise (default: every interface; mDNS "
                        "advertises this machine's LAN addresses)")
    j.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    j.add_argument("--api-port", type=int, default=None, help="serve the OpenAI API on this port")
    j.add_argument("--api-host", default="127.0.0.1")
    j.add_argument("--api-key", default=None,
                   help="require this bearer token on the API (visible in ps: prefer TOGETHER_API_KEY or "
                        "--api-key-file)")
    j.add_argument("--api-key-file", default=None, metavar="PATH", help="read the API key from this file")
    j.add_argument("--cors-origin", default=None, help="allow browser calls from this origin (off by default)")
    j.add_argument("--max-kv-tokens", type=int, default=1 << 20,
                   help="cap on KV-cache tokens admitted at once (also bounded by the ring's memory)")
    j.add_argument("--cpus", default=None, metavar="LIST",
                   help="pin this peer's compute to these CPU cores, e.g. 0 or 2-3 (Linux; --threads defaults "
                        "to their number): peers sharing one machine each take their own cores, or the OS "
                        "moves their compute threads between cores and each move starts on cold caches")
    j.add_argument("--micro-batches", type=int, default=0, metavar="N",
                   help="frames of this API peer in the ring at once, each carrying its own group of the "
                        "running sequences (default 0: one per stage, so every stage has work)")
    j.add_argument("--prefill-chunk", type=int, default=512, metavar="TOKENS",
                   help="prompt tokens per frame: a long prompt goes in chunks between decode steps")
    j.add_argument("--draft", default="lookup", metavar="off|lookup|MODEL",
                   help="speculative decoding on this API peer: drafts verified by the ring several "
                        "tokens per trip (the answer is unchanged); lookup (default) drafts from n-grams of "
                        "the prompt and the text so far, MODEL (a name or path as --model takes, with the "
                        "same tokenizer) runs a draft model here, off turns it off")
    j.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS, metavar="K",
                   help=f"the most tokens a sequence drafts per trip (default {DRAFT_TOKENS}; each "
                        f"sequence drafts fewer, down to none, where its drafts are rejected)")
    j.add_argument("--prefix-cache-memory", default=None, metavar="SIZE",
                   help="memory this peer's stage keeps of computed prompts' KV, so that requests sharing a "
                        "prefix (a system prompt, a chat's history) skip its prefill, e.g. 512MB (default: "
                        "1/8 of --max-memory or of the memory offered, at most 1GiB; 0: off)")
    j.add_argument("--seq-lease", type=float, default=60.0, metavar="SECONDS",
                   help="free a sequence's caches when no frame of it came for this long (its API peer is gone)")
    j.add_argument("--mesh", default="default", help="mesh name: peers of other meshes are ignored")
    _add_mesh_key_args(j)
    j.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                   help="a peer to contact directly (where multicast is blocked)")
    j.add_argument("--no-mdns", action="store_true", help="do not use mDNS (use --peer)")
    j.add_argument("--name", default="", help="display name of this peer")
    j.add_argument("--max-memory", default=None, help="memory this peer offers, e.g. 2GB")
    j.add_argument("--layers", default=None, metavar="START-END", help="claim exactly these layers")
    j.add_argument("--wire-dtype", default=None, choices=["float32", "float16", "bfloat16"])
    j.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="also serve this LoRA adapter (repeatable); requests pick it with "
                        "model=MODEL+NAME")
    j.add_argument("--settle", type=float, default=2.0, help="seconds to look for peers first")
    j.add_argument("--tp-group", default="", metavar="NAME",
                   help="serve one stage together with the other peers of this tensor-parallel group")
    j.add_argument("--tp-size", type=int, default=None, metavar="N",
                   help="peers in the --tp-group, at least 2 (default 2)")
    j.add_argument("--placement", choices=["measured", "memory"], default="measured",
                   help="how the coordinator splits peers that start together: measured (default: by their "
                        "measured speeds and links, see `together plan`) or memory (by free memory alone)")
    j.add_argument("--link-delay-ms", type=float, default=0.0, metavar="MS",
                   help="test only: every message this peer sends to another peer arrives MS ms later "
                        "(order and throughput kept), to imitate a slow link")
    j.add_argument("--weight-faults", default="", help=argparse.SUPPRESS)  # test only: mesh.weights.Faults
    j.set_defaults(func=cmd_join)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="together", description="A peer-to-peer LLM inference mesh.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text in this process (optionally split into slices)")
    _add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--system", default=None, help="system prompt (chat mode)")
    g.add_argument("--backend", choices=["mlx", "torch"], default=None)
    g.add_argument("--shards", default=None,
                   help="e.g. mlx:0-12,torch:12-30; torch:12-30*2 serves a slice with a "
                        "tensor-parallel group of 2 local processes")
    g.add_argument("--raw", action="store_true", help="no chat template: continue the prompt as is")
    g.add_argument("--adapter", default=None, metavar="PATH",
                   help="answer with this LoRA adapter (a `together lora` output directory)")
    g.add_argument("--draft", default="lookup", metavar="off|lookup|MODEL",
                   help="speculative decoding: drafted tokens verified several per step (the answer is "
                        "unchanged); lookup (default) drafts from n-grams of the prompt and the text so far, "
                        "MODEL (a name or path as --model takes, same tokenizer) runs a draft model, off")
    g.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS, metavar="K",
                   help=f"the most tokens drafted per step (default {DRAFT_TOKENS}; fewer, down to none, "
                        f"where drafts are rejected)")
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    _add_join_parser(sub)

    st = sub.add_parser("status", help="show a mesh's peers, layers and coordinator")
    st.add_argument("--peer", required=True, metavar="HOST:PORT")
    _add_mesh_key_args(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    d = sub.add_parser("demo", help="start a local three-peer mesh (MLX + torch) and ask it a question")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--prompt", default="In two sentences, why can several laptops serve a model "
                                        "none of them could hold alone?")
    d.add_argument("--max-tokens", type=int, default=96)
    d.add_argument("--api-port", type=int, default=None)
    d.add_argument("--timeout", type=float, default=180)
    d.set_defaults(func=cmd_demo)

    from apps.lora import add_parser as add_lora

    add_lora(sub)

    from apps.plan import add_parser as add_plan

    add_plan(sub)

    f = sub.add_parser("fetch", help="fetch a model into the cache and print its path")
    f.add_argument("--model", default="smollm2-135m")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=cmd_fetch)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with contextlib.suppress(AttributeError, ValueError, OSError):  # no SIGUSR1 (Windows), no real stderr
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every thread's stack
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    func: Callable[[argparse.Namespace], int] = a.func
    try:
        _resolve_keys(a)
        return func(a)
    except TogetherError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
