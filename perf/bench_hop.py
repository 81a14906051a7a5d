"""Where a hop's time goes: the per-frame costs of one hop of the ring, piece by piece, in one run.

1. In-process costs of one Frame of hidden states (1 and 8 tokens of SmolLM2's 576, float32 and
   bfloat16): building the message, protobuf encode and decode, the seal of a keyed mesh (sending:
   what `mesh.links` does; receiving: the server's check on the raw bytes, then the parse), the
   receiver's `Hidden` check, the sender's step again with its caches cold (after 64 MB read, as a
   stage's compute streams its weights through them: what a hop pays right after a compute), and
   the hand-off to the compute thread and back: a one-thread
   executor (what `Stage.call` was before issue 13's hop work), a bare thread fed by a queue, and
   `mesh.stage.ComputeThread` (what a stage runs now).
2. The wire between two real processes on 127.0.0.1: this process sends Frames on a long-lived
   Forward stream with `mesh.links` (the mesh's own sender: seals and TLS with a key), a server
   process answers each with a Result on a Deliver stream back to this process's server, as a last
   stage does; one hop is half the round trip. The server answers from its grpc.aio handler ("loop"),
   after a hop to a one-thread executor as a stage did before ("executor"), after a hop to the
   stage's own `ComputeThread` ("thread"), from a grpc sync server's handler thread ("sync", open
   mesh only), and after 10 ms of CPU work on the ComputeThread, the time subtracted ("after
   compute": what a hop costs once a stage has computed, threads asleep).
   Not measured here: a model's compute and the stage's frame checks (bench_ring.py has the whole).

    .venv/bin/python perf/bench_hop.py [--frames 300] [--quick] [--modes loop,executor,thread,sync,compute]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from backends.wire import Hidden  # noqa: E402
from mesh.auth import CHANNEL_OPTIONS, SEAL_LEN, SERVER_OPTIONS, MeshKeyVerifier, add_port, make_server  # noqa: E402
from mesh.links import Peers  # noqa: E402
from mesh.seal import sealed, sealed_bytes  # noqa: E402
from mesh.stage import ComputeThread  # noqa: E402
from protos import together_pb2 as pb  # noqa: E402
from protos import together_pb2_grpc as pbg  # noqa: E402

KEY = "bench mesh key"
HIDDEN = 576
FORWARD = "/together.Together/Forward"
COMPUTE_S = 0.010


@functools.cache
def entries(tokens: int) -> list[pb.SeqEntry]:
    return [pb.SeqEntry(seq_id=os.urandom(8).hex(), offset=200, length=1) for _ in range(tokens)]


def frame(tokens: int, dtype: str, data: bytes | None = None) -> pb.Frame:
    size = {"float32": 4, "bfloat16": 2}[dtype] * tokens * HIDDEN
    return pb.Frame(frame_id=1 << 40, epoch=3, origin="127.0.0.1:50000", dtype=dtype, shape=[tokens, HIDDEN],
                    data=data if data is not None else bytes(size), hop_ms=[1.5], seqs=entries(tokens))


def pct(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return xs[len(xs) // 2] * 1e6, xs[int(len(xs) * 0.9)] * 1e6


def timed(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t)
    return pct(xs)


# ---------------------------------------------------------------- 1. in-process

def in_process(n: int) -> list[tuple[str, str, tuple[float, float]]]:
    rows = []
    flush = np.ones(64 << 20, np.uint8)  # more than the caches hold: reading it evicts the sender's code and data
    key = KEY.encode()
    for dtype in ("float32", "bfloat16"):
        for tokens in (1, 8):
            out = np.random.default_rng(0).standard_normal((tokens, HIDDEN)).astype(np.float32)
            buf = out if dtype == "float32" else (out.view(np.uint32) >> 16).astype(np.uint16)
            payload = memoryview(buf).cast("B")
            f = frame(tokens, dtype, bytes(payload))
            raw = f.SerializeToString()
            verifier = MeshKeyVerifier(key)
            sealed_raws = iter([sealed_bytes(key, FORWARD, "bench", f) for _ in range(2 * n)])

            def receive(view: bool) -> None:
                r = next(sealed_raws)
                assert verifier.verify_seal(FORWARD, "bench", r) is None
                pb.Frame.FromString(memoryview(r)[:-SEAL_LEN] if view else r[:-SEAL_LEN])

            def send_before(k: bytes | None) -> None:  # copy into a Frame, seal (parse), encode again
                m = frame(tokens, dtype, bytes(payload))
                (sealed(k, FORWARD, "bench", m) if k else m).SerializeToString()

            def send_now(k: bytes | None) -> None:  # the header encoded, the payload appended, sealed once
                sealed_bytes(k, FORWARD, "bench", frame(tokens, dtype, b""), payload)

            def send_cold() -> None:
                flush.sum()
                t = time.perf_counter()
                send_now(None)
                took.append(time.perf_counter() - t)

            what = f"{tokens} tok {dtype}"
            took: list[float] = []
            for _ in range(max(50, n // 20)):
                send_cold()
            rows += [
                (what, "encode (SerializeToString)", timed(f.SerializeToString, n)),
                (what, "decode (FromString)", timed(lambda: pb.Frame.FromString(raw), n)),
                (what, "send open, before: copy + encode", timed(lambda: send_before(None), n)),
                (what, "send open, now: header + payload", timed(lambda: send_now(None), n)),
                (what, "  the same, caches cold (64 MB read first)", pct(took)),
                (what, "send keyed, before: + seal, parse, encode", timed(lambda: send_before(key), n)),
                (what, "send keyed, now: + seal once", timed(lambda: send_now(key), n)),
                (what, "receive keyed, before: check, copy, parse", timed(lambda: receive(False), n)),
                (what, "receive keyed, now: check, parse a view", timed(lambda: receive(True), n)),
                (what, "Hidden from the frame", timed(lambda: Hidden(f.data, f.dtype, tuple(f.shape)), n)),
            ]
    rows += [("-", "executor hand-off and back (before)", asyncio.run(executor_hop(n))),
             ("-", "dedicated thread + queue and back", asyncio.run(thread_hop(n))),
             ("-", "ComputeThread and back (Stage.call now)", asyncio.run(compute_thread_hop(n)))]
    return rows


async def executor_hop(n: int) -> tuple[float, float]:
    loop, ex, xs = asyncio.get_running_loop(), ThreadPoolExecutor(1), []
    for _ in range(n):
        t = time.perf_counter()
        await loop.run_in_executor(ex, int)
        xs.append(time.perf_counter() - t)
    ex.shutdown()
    return pct(xs)


async def compute_thread_hop(n: int) -> tuple[float, float]:
    ct, xs = ComputeThread(), []
    for _ in range(n):
        t = time.perf_counter()
        await ct.submit(int)
        xs.append(time.perf_counter() - t)
    ct.close()
    return pct(xs)


async def thread_hop(n: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    q: queue.SimpleQueue[asyncio.Future[int] | None] = queue.SimpleQueue()

    def worker() -> None:
        while (fut := q.get()) is not None:
            loop.call_soon_threadsafe(fut.set_result, int())

    th = threading.Thread(target=worker, daemon=True)
    th.start()
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        fut: asyncio.Future[int] = loop.create_future()
        q.put(fut)
        await fut
        xs.append(time.perf_counter() - t)
    q.put(None)
    th.join()
    return pct(xs)


# ---------------------------------------------------------------- 2. two processes

def burn(seconds: float) -> None:
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        sum(range(500))


def serve(port: int, back: str, mode: str, key: str | None) -> None:
    """The far side: a server that answers each Frame with a Result on Deliver to `back`."""
    if mode == "sync":
        return serve_sync(port, back)
    ex, ct = ThreadPoolExecutor(1), ComputeThread()

    class Far(pbg.TogetherServicer):
        async def Forward(self, request_iterator: AsyncIterator[pb.Frame], context: Any) -> None:
            peers = Peers(key, "far")
            loop = asyncio.get_running_loop()
            async for f in request_iterator:
                if mode == "executor":
                    await loop.run_in_executor(ex, int)
                elif mode == "thread":
                    await ct.submit(int)
                elif mode == "compute":
                    await ct.submit(lambda: burn(COMPUTE_S))
                await peers.stream(back, "Deliver").send(pb.Result(frame_id=f.frame_id, hop_ms=[0.1]))

    async def main() -> None:
        server = make_server(key)
        pbg.add_TogetherServicer_to_server(Far(), server)
        add_port(server, f"127.0.0.1:{port}", key)
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def serve_sync(port: int, back: str) -> None:
    from concurrent import futures

    results: queue.SimpleQueue[pb.Result] = queue.SimpleQueue()

    def outgoing() -> Iterator[pb.Result]:
        while True:
            yield results.get()

    class Far(pbg.TogetherServicer):
        def Forward(self, request_iterator: Iterator[pb.Frame], context: Any) -> Iterator[pb.Ack]:
            channel = grpc.insecure_channel(back, options=list(CHANNEL_OPTIONS))
            call = pbg.TogetherStub(channel).Deliver(outgoing())  # held: a dropped call is cancelled
            for f in request_iterator:
                results.put(pb.Result(frame_id=f.frame_id, hop_ms=[0.1]))
            call.cancel()
            return iter(())

    server = grpc.server(futures.ThreadPoolExecutor(4), options=list(SERVER_OPTIONS))
    pbg.add_TogetherServicer_to_server(Far(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


async def round_trips(far: str, key: str | None, tokens: int, frames: int, compute: float) -> tuple[float, float]:
    pending: dict[int, asyncio.Future[pb.Result]] = {}

    class Near(pbg.TogetherServicer):
        async def Deliver(self, request_iterator: AsyncIterator[pb.Result], context: Any) -> None:
            async for r in request_iterator:
                pending.pop(r.frame_id).set_result(r)

    server = make_server(key)
    pbg.add_TogetherServicer_to_server(Near(), server)
    add_port(server, "127.0.0.1:50702", key)
    await server.start()
    peers = Peers(key, "near")
    loop, xs = asyncio.get_running_loop(), []
    f = frame(tokens, "float32")
    try:
        for i in range(frames + 20):  # the first 20 warm up (connection, TLS)
            f.frame_id = i
            fut = pending[i] = loop.create_future()
            t = time.perf_counter()
            await peers.stream(far, "Forward").send(f)
            await fut
            if i >= 20:
                xs.append((time.perf_counter() - t - compute) / 2)
    finally:
        await peers.close()
        await server.stop(None)
    return pct(xs)


def two_processes(mode: str, key: str | None, tokens: int, frames: int) -> tuple[float, float]:
    far = subprocess.Popen([sys.executable, __file__, "--serve", mode, *(["--key", key] if key else [])],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert far.stdout is not None and far.stdout.readline().strip() == "ready"
        compute = COMPUTE_S if mode == "compute" else 0.0
        return asyncio.run(round_trips("127.0.0.1:50701", key, tokens, frames, compute))
    finally:
        far.kill()
        far.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="a third of the frames")
    ap.add_argument("--modes", default="loop,executor,thread,sync,compute", help="which far sides to time")
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--key", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(50701, "127.0.0.1:50702", a.serve, a.key)
        return 0
    n = a.frames // 3 if a.quick else a.frames
    load0 = os.getloadavg()[0]
    rows = in_process(max(n, 200) * 5)
    print(f"\nhop costs in one process, p50/p90 us, hidden {HIDDEN}, {os.cpu_count()} cores, load avg {load0:.1f}")
    print(f"{'frame':<18}{'step':<44}{'p50 us':>9}{'p90 us':>9}")
    for what, step, (p50, p90) in rows:
        print(f"{what:<18}{step:<44}{p50:>9.1f}{p90:>9.1f}")
    wire = []
    for mode in a.modes.split(","):
        for keyed in (False, True):
            if mode == "sync" and keyed:
                continue  # the mesh key's interceptors are grpc.aio's
            for tokens in ((1,) if mode == "compute" else (1, 8)):
                frames = max(30, n // 3) if mode == "compute" else n
                wire.append((mode, "keyed" if keyed else "open", tokens,
                             two_processes(mode, KEY if keyed else None, tokens, frames)))
    print(f"\none hop between two processes on 127.0.0.1 (half a Frame -> Result round trip), float32, "
          f"load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'far side answers from':<24}{'mesh':<7}{'tokens':>7}{'p50 us':>9}{'p90 us':>9}")
    names = {"loop": "its grpc.aio handler", "executor": "a one-thread executor", "thread": "its ComputeThread",
             "sync": "a grpc sync thread",
             "compute": "after 10 ms compute"}
    for mode, mesh, tokens, (p50, p90) in wire:
        print(f"{names[mode]:<24}{mesh:<7}{tokens:>7}{p50:>9.0f}{p90:>9.0f}")
    print("target: a hop's overhead p50 < 300 us (bench_ring.py measures it inside a real ring)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
