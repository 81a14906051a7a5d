"""Where a ring's frame time goes, segment by segment: a two-peer ring on 127.0.0.1 (one compute thread
each, the API peer holding [0, cut)), every peer run with TOGETHER_TRACE (mesh/trace.py), driven
through the OpenAI API with 1 and then N concurrent greedy streams; prints, per segment of a frame's
round trip (the scheduler's launch, each stage's hand-off to its compute thread, compute, hand-back to
the event loop, building and sending the message, the wire, the origin's delivery, the scheduler's
next launch), its p50 and mean in microseconds. The peers share one clock (CLOCK_MONOTONIC). A stage's
`sent` is its write's completion, which can come after the receiver has the message (a mean below zero).

    .venv/bin/python perf/trace_ring.py [--cut 19] [--streams 1,8] [--tokens 48] [--dtype auto]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.bench_batching import measure  # noqa: E402

# a frame's way round a two-peer ring, as its events are named on the API peer (a) and the other (b)
PATH = ["a:launch", "a:submit", "a:cstart", "a:cend", "a:resume", "a:sent", "b:submit", "b:cstart", "b:cend",
        "b:resume", "b:sent", "a:deliver", "a:back"]
WHAT = {"a:launch": "scheduler -> stage 0 (task hand-offs)", "a:submit": "loop -> compute thread",
        "a:cstart": "compute", "a:cend": "compute thread -> loop", "a:resume": "build + send the Frame",
        "a:sent": "wire + receive", "b:submit": "loop -> compute thread", "b:cstart": "compute",
        "b:cend": "compute thread -> loop", "b:resume": "build + send the Result", "b:sent": "wire + receive",
        "a:deliver": "origin -> scheduler task"}


def read(folder: Path, names: dict[int, str]) -> dict[int, dict[str, int]]:
    """frame id -> {"<peer>:<event>": ns} from the peers' trace files (`names`: pid -> a or b)."""
    out: dict[int, dict[str, int]] = collections.defaultdict(dict)
    for f in folder.glob("*.log"):
        who = names.get(int(f.stem))
        if who is None:
            continue
        for line in f.read_text().splitlines():
            t, ev, fid = line.split()
            out[int(fid)][f"{who}:{ev}"] = int(t)
    return out


def segments(frames: dict[int, dict[str, int]]) -> tuple[dict[str, list[float]], list[float]]:
    """Each segment's durations (us) over the frames that went the whole way, and the scheduler's gap from
    a frame's return to the next frame's launch (us; one stream: its next token)."""
    seg: dict[str, list[float]] = collections.defaultdict(list)
    for e in frames.values():
        if all(k in e for k in PATH):
            for x, y in zip(PATH, PATH[1:]):
                seg[x].append((e[y] - e[x]) / 1e3)
            seg["total"].append((e["a:back"] - e["a:launch"]) / 1e3)
    backs = sorted(e["a:back"] for e in frames.values() if "a:back" in e)
    launches = sorted(e["a:launch"] for e in frames.values() if "a:launch" in e)
    relaunch = []
    for b in backs:  # the first launch after each return
        nxt = next((t for t in launches if t >= b), None)
        if nxt is not None:
            relaunch.append((nxt - b) / 1e3)
    return seg, relaunch


def table(streams: int, seg: dict[str, list[float]], relaunch: list[float]) -> None:
    print(f"\n{streams} stream(s): {len(seg.get('total', []))} frames")
    print(f"{'segment':<50}{'p50 us':>9}{'mean us':>9}")
    for k in PATH[:-1]:
        if seg.get(k):
            print(f"{k + ' ' + WHAT[k]:<50}{statistics.median(seg[k]):>9.0f}{statistics.mean(seg[k]):>9.0f}")
    if seg.get("total"):
        print(f"{'launch -> back (round trip)':<50}{statistics.median(seg['total']):>9.0f}"
              f"{statistics.mean(seg['total']):>9.0f}")
    if relaunch:
        print(f"{'back -> next launch (scheduler, SSE)':<50}{statistics.median(relaunch):>9.0f}"
              f"{statistics.mean(relaunch):>9.0f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cut", type=int, default=19)
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="a's compute thread on core 0 and b's on core 1 (--cpus; default), or unpinned")
    a = ap.parse_args()
    from backends.models import resolve_model
    from mesh.local import LocalMesh, own_cpu

    model = str(resolve_model("smollm2-135m"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        mesh = LocalMesh(model)
        try:
            env = {"TOGETHER_TRACE": str(folder)}
            pa = mesh.add("a", "--backend", "torch", "--dtype", a.dtype, "--no-mdns", "--settle", "0.5",
                          "--layers", f"0-{a.cut}", "--draft", "off", "--prefix-cache-memory", "0", api=True, env=env,
                          cpus=own_cpu(0) if a.pin else None)
            pb_ = mesh.add("b", "--backend", "torch", "--dtype", a.dtype, "--no-mdns", "--settle", "0.5",
                           "--layers", f"{a.cut}-30", "--peer", pa.address, "--draft", "off",
                           "--prefix-cache-memory", "0", env=env, cpus=own_cpu(1) if a.pin else None)
            mesh.wait_ready(pa, stages=2)
            names = {pa.proc.pid: "a", pb_.proc.pid: "b"}
            measure(pa.api, 2, 8)  # warm-up
            print(f"two-peer ring [0,{a.cut}) [{a.cut},30), torch {a.dtype}, {a.tokens} tokens per stream, "
                  f"1 compute thread per peer, {'pinned to cores 0 and 1' if a.pin else 'not pinned'}")
            for k in (int(x) for x in a.streams.split(",")):
                for f in folder.glob("*.log"):
                    f.write_text("")  # the peers append (O_APPEND): what the last run wrote goes
                r = measure(pa.api, k, a.tokens)
                seg, relaunch = segments(read(folder, names))
                table(k, seg, relaunch)
                print(f"decode {r['decode_tps']:.1f} tok/s")
        finally:
            mesh.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
