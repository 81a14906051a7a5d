"""Continuous batching: aggregate decode tokens/s at 1, 4, 8 and 16 concurrent streams, on one
peer and on a two-peer ring (127.0.0.1), with time to first token p50/p90, in one run. The ring keeps
one frame per stage in flight (micro-batches: the streams split into two groups); `--one-frame` adds
the ring with a single frame in flight (`--micro-batches 1`, as before micro-batches) for comparison.

The ring's layers are split as the coordinator splits them (`--split measured`, the default: this
host's `measure_speed` through `placement.split_proportional`, the last stage's head counted), or in
half (`--split even`), or at a given layer (`--split 17`); `--split` takes several, one ring each.
Every peer runs with the same `--draft` (default off: batching, not speculation, is measured here, and
lookup drafts change the positions per frame with the text) and `--prefix-cache-memory` (default 0).

    .venv/bin/python perf/bench_batching.py [--backend torch] [--dtype auto] [--tokens 48]
                                            [--streams 1,4,8,16] [--rounds 2] [--one-frame]
                                            [--split measured,even] [--draft off] [--prefix-cache-memory 0]
                                            [--micro-batches 0,3] [--peer-frames 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh.local import LocalMesh, own_cpu  # noqa: E402

TOPICS = ["cats", "the moon", "bread", "rivers", "chess", "winter", "bees", "trains", "paper", "music",
          "glass", "salt", "clouds", "maps", "tea", "bridges"]


def pct(xs: list[float], q: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(q * len(ys)))]


def measure(api: str, streams: int, tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{api}/v1", api_key="x", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, float, float, int]:
        t0 = time.perf_counter()
        first, n = None, 0
        s = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": f"Tell me about {TOPICS[i % 16]}."}],
            temperature=0, max_tokens=tokens, stream=True, extra_body={"ignore_eos": True},
            stream_options={"include_usage": True})
        for c in s:
            if c.usage:
                n = c.usage.completion_tokens
            elif c.choices and c.choices[0].delta.content and first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        return t0, first or end, end, n

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(streams) as ex:
        res = list(ex.map(one, range(streams)))
    return rates(res, time.perf_counter() - t)


def rates(res: list[tuple[float, float, float, int]], wall: float) -> dict:
    """Of streams run side by side, each (start, first token, end, tokens): the decode rate (each
    stream's tokens after its first over the time from its first to its end, summed: they decode side
    by side), the wall-clock rate (all tokens over `wall`, the prompts' prefill included) and TTFT."""
    ttft = [(f - s) * 1000 for s, f, _, _ in res]
    decode = sum((n - 1) / (e - f) for _, f, e, n in res if n > 1 and e > f)
    return {"streams": len(res), "tokens": sum(n for *_, n in res), "wall_s": wall,
            "agg_tps": sum(n for *_, n in res) / wall, "decode_tps": decode,
            "ttft_p50_ms": pct(ttft, 0.5), "ttft_p90_ms": pct(ttft, 0.9)}


def thread_seconds(pids: list[int]) -> dict[tuple[int, str], float]:
    """CPU seconds of every thread of these processes (Linux /proc; {} elsewhere)."""
    out: dict[tuple[int, str], float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            out[(pid, task.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def busy(before: dict[tuple[int, str], float], after: dict[tuple[int, str], float], pids: list[int],
         wall: float) -> list[float]:
    """Per process, its busiest thread's share of `wall` between two `thread_seconds`: a peer's compute
    thread, i.e. how much of the time its stage computed (the rest it waited for frames, or on a host
    busy with other work, for a core)."""
    return [max((after[k] - before.get(k, 0.0) for k in after if k[0] == pid), default=0.0) / wall
            for pid in pids]


def measured_cut(model: str, backend: str, dtype: str) -> int:
    """Where the coordinator cuts a two-peer ring of this host's peers: each peer's start-up measure
    (backends/measure.py, one thread) through `placement.split_proportional`, the head counted."""
    from backends.measure import measure_speed
    from backends.weights import open_checkpoint
    from mesh.placement import split_proportional

    ck = open_checkpoint(model)
    sp = measure_speed(backend, ck, dtype, threads=1)
    n = ck.config.num_hidden_layers
    stages = split_proportional(n, 1, 0, [("a", 1 << 40, sp.layer_ms, sp.head_ms),
                                          ("b", 1 << 40, sp.layer_ms, sp.head_ms)])
    print(f"measured: {sp.layer_ms:.2f} ms/layer, head {sp.head_ms:.2f} ms ({sp.dtype} {sp.weight_format}): "
          f"cut at {stages[0][2]} of {n}", flush=True)
    return stages[0][2]


def ring_setups(splits: list[str], cut: int, n: int, micro_batches: int | list[int] = 0, one_frame: bool = False,
                peer_frames: list[int] | None = None) -> tuple[dict[str, int], dict[str, tuple[list[int], int]]]:
    """The two-peer rings' cuts by `--split` name (measured: `cut`, even: half, or a layer) and every
    configuration to run: name -> (layer cuts, --micro-batches), one peer first; a ring for each cut and
    each of `micro_batches` (0: one frame per stage), and one peer with each of `peer_frames` frames."""
    cuts = {s: cut if s == "measured" else n // 2 if s == "even" else int(s) for s in splits}
    if not all(0 < c < n for c in cuts.values()):
        raise SystemExit(f"--split: every cut must leave both peers layers of [0, {n})")
    mbs = [micro_batches] if isinstance(micro_batches, int) else micro_batches
    setups = {"one peer": ([0, n], 0)}
    for f in peer_frames or []:
        setups[f"one peer, {f} frames"] = ([0, n], f)
    for c in cuts.values():
        for mb in mbs:
            name = f"ring [0,{c}) [{c},{n})" if len(cuts) > 1 else "two-peer ring"
            setups[name + (f", {mb} frames" if len(mbs) > 1 and mb else "")] = ([0, c, n], mb)
    if one_frame:
        setups["ring, 1 frame"] = ([0, next(iter(cuts.values())), n], 1)
    return cuts, setups


def peer_args(draft: str, prefix_cache_memory: str) -> tuple[str, ...]:
    """What every peer of every configuration joins with, so that one peer and the ring compare like
    with like ('default' leaves the peers' own prefix cache)."""
    return ("--draft", draft, *(() if prefix_cache_memory == "default" else
                                ("--prefix-cache-memory", prefix_cache_memory)))


def start(model: str, backend: str, dtype: str, cuts: list[int], micro_batches: int = 0,
          extra: tuple[str, ...] = (), pin: bool = True) -> tuple[LocalMesh, str]:
    """A ring of peers holding [cuts[i], cuts[i+1]) (one compute thread each, stage i's on core i with
    `pin`), warmed up; (its mesh, its API URL)."""
    stages = len(cuts) - 1
    mesh = LocalMesh(model)
    try:
        api = None
        for i in range(stages):
            p = mesh.add(f"s{i}", "--backend", backend, "--dtype", dtype, "--no-mdns", "--settle", "0.5",
                         "--layers", f"{cuts[i]}-{cuts[i + 1]}", *(["--peer", api.address] if api else []),
                         "--micro-batches", str(micro_batches), *extra, api=i == 0, threads=1,
                         cpus=own_cpu(i) if pin else None)
            api = api or p
        assert api is not None
        mesh.wait_ready(api, stages=stages)
        measure(api.api, 2, 8)  # warm-up
        return mesh, api.api
    except BaseException:
        mesh.stop()
        raise


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each row shows its best")
    ap.add_argument("--one-frame", action="store_true",
                    help="also run the two-peer ring with one frame in flight (--micro-batches 1)")
    ap.add_argument("--streams", default="1,4,8,16")
    ap.add_argument("--split", default="measured",
                    help="the two-peer ring's cut: measured (as the coordinator places), even, or a layer; "
                         "several, comma-separated, one ring each")
    ap.add_argument("--micro-batches", default="0",
                    help="the two-peer rings' --micro-batches (0: one frame per stage); several, comma-separated, "
                         "one ring each")
    ap.add_argument("--peer-frames", default="",
                    help="also one peer with this many frames in flight (its --micro-batches); comma-separated")
    ap.add_argument("--draft", default="off", help="every peer's --draft (off, lookup)")
    ap.add_argument("--prefix-cache-memory", default="0",
                    help="every peer's --prefix-cache-memory ('default': the peers' own default)")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="each peer's compute thread on a core of its own (--cpus; default), or wherever the OS puts it")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from backends.models import resolve_model
    from backends.weights import open_checkpoint

    model = str(resolve_model("smollm2-135m"))
    streams = [int(x) for x in a.streams.split(",")]
    load0 = os.getloadavg()[0]
    n = open_checkpoint(model).config.num_hidden_layers
    splits = a.split.split(",")
    cut = measured_cut(model, a.backend, a.dtype) if "measured" in splits else n // 2
    mbs = [int(x) for x in a.micro_batches.split(",")]
    cuts, setups = ring_setups(splits, cut, n, mbs, a.one_frame, [int(x) for x in a.peer_frames.split(",") if x])
    extra = peer_args(a.draft, a.prefix_cache_memory)
    meshes: dict[str, tuple[LocalMesh, str]] = {}
    runs: dict[str, dict[int, list[dict]]] = {name: {k: [] for k in streams} for name in setups}
    try:
        for name, (cs, mb) in setups.items():
            meshes[name] = start(model, a.backend, a.dtype, cs, mb, extra, a.pin)
        for _ in range(a.rounds):  # interleaved: a shared machine's load falls on every configuration alike
            for k in streams:
                for name, (mesh, url) in meshes.items():
                    pids = [q.proc.pid for q in mesh.peers.values()]
                    t0, t = thread_seconds(pids), time.perf_counter()
                    r = measure(url, k, a.tokens)
                    r["busy"] = busy(t0, thread_seconds(pids), pids, time.perf_counter() - t)
                    runs[name][k].append(r)
    finally:
        for mesh, _ in meshes.values():
            mesh.stop()
    # the best round of each: the one least disturbed by whatever else the machine ran
    results = {name: [max(rs[k], key=lambda r: r["decode_tps"]) for k in streams] for name, rs in runs.items()}
    print(f"\ncontinuous batching: smollm2-135m, {a.backend} {a.dtype}, {a.tokens} tokens per stream (greedy), "
          f"best of {a.rounds} interleaved rounds, 1 compute thread per peer, {os.cpu_count()} cores, "
          f"load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}; draft {a.draft}, prefix cache {a.prefix_cache_memory} "
          f"on every peer; ring cut {', '.join(f'{s}={c}' for s, c in cuts.items())}, micro-batches "
          f"{a.micro_batches if a.micro_batches != '0' else 'one per stage'}, "
          f"{'stage i computing on core i (--cpus)' if a.pin else 'compute threads not pinned'}, TOGETHER_KERNEL={os.environ.get('TOGETHER_KERNEL', 'default')}")
    w = max(15, *(len(name) + 1 for name in results))
    print("decode tok/s: the streams' own decode rates (after their first token) summed; the ratios are of it; "
          "wall tok/s: all tokens over the wall time, prefill included; busy: each peer's compute "
          "thread's CPU share of the wall time, first stage first (the rest it waited for frames, or for a core)")
    print(f"{'config':<{w}}{'streams':>8}{'decode tok/s':>13}{'vs 1 stream':>13}{'vs one peer':>13}{'wall tok/s':>12}"
          f"{'TTFT p50 ms':>13}{'TTFT p90 ms':>13}  busy")
    one = {r["streams"]: r["decode_tps"] for r in results["one peer"]}
    for name, rows in results.items():
        base = rows[0]["decode_tps"]
        for r in rows:
            print(f"{name:<{w}}{r['streams']:>8}{r['decode_tps']:>13.1f}{r['decode_tps'] / base:>12.2f}x"
                  f"{r['decode_tps'] / one[r['streams']]:>12.2f}x{r['agg_tps']:>12.1f}"
                  f"{r['ttft_p50_ms']:>13.0f}{r['ttft_p90_ms']:>13.0f}  "
                  f"{' '.join(f'{b:.0%}' for b in r.get('busy', []))}")
    print("targets: one peer 8 streams >= 3x its single stream; two-peer ring 8 streams >= 1.6x one peer "
          "8 streams; two-peer ring 1 stream >= 0.9x one peer")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
