"""What the mesh key costs per hop: one Frame of hidden states on a long-lived Forward stream to a
gRPC server on 127.0.0.1 and its Ack back, timed per frame, for each payload size, in one run:

- open:  no mesh key (plaintext, nothing signed)
- hmac:  the key's call and message MACs (every Frame sealed and checked), no TLS
- tls:   what a keyed mesh runs: mutual TLS on the key's certificates plus the MACs

Payloads: a decode step of 1 and 8 sequences and a 128-token prefill chunk of SmolLM2-135M's hidden
size in float32. The table shows p50 per hop and the ratio to the open mesh.

    .venv/bin/python perf/bench_tls.py [--frames 300] [--hidden 576]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import AsyncIterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from mesh.auth import CHANNEL_OPTIONS, add_port, client_interceptors, make_channel, make_server  # noqa: E402
from protos import together_pb2 as pb  # noqa: E402
from protos import together_pb2_grpc as pbg  # noqa: E402

KEY = "bench mesh key"
MODES = ("open", "hmac", "tls")


class Echo(pbg.TogetherServicer):
    async def Forward(self, request_iterator: AsyncIterator[pb.Frame], context) -> AsyncIterator[pb.Ack]:  # type: ignore[no-untyped-def]
        async for _ in request_iterator:
            yield pb.Ack()


async def hop_times(mode: str, tokens: int, hidden: int, frames: int) -> list[float]:
    key = None if mode == "open" else KEY
    server = make_server(key)
    pbg.add_TogetherServicer_to_server(Echo(), server)
    port = add_port(server, "127.0.0.1:0", key if mode == "tls" else None)
    await server.start()
    address = f"127.0.0.1:{port}"
    if mode == "hmac":  # the MACs without TLS: a plaintext channel that still signs
        ch = grpc.aio.insecure_channel(address, options=list(CHANNEL_OPTIONS), interceptors=client_interceptors(KEY, "bench"))
    else:
        ch = make_channel(address, key, "bench")
    try:
        frame = pb.Frame(frame_id=1, epoch=1, origin="bench", dtype="float32", shape=[tokens, hidden],
                         seqs=[pb.SeqEntry(seq_id="s", offset=0, length=tokens)], data=bytes(4 * tokens * hidden))
        call = pbg.TogetherStub(ch).Forward()
        times = []
        for i in range(frames + 20):  # the first 20 warm up (connection, TLS session)
            t = time.perf_counter()
            await call.write(frame)
            await call.read()
            if i >= 20:
                times.append(time.perf_counter() - t)
        await call.done_writing()
        return times
    finally:
        await ch.close()
        await server.stop(None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=576)
    a = ap.parse_args()
    rows = []
    for tokens in (1, 8, 128):
        p50 = {m: statistics.median(asyncio.run(hop_times(m, tokens, a.hidden, a.frames))) * 1e3 for m in MODES}
        rows.append((tokens, 4 * tokens * a.hidden, p50))
    print(f"hop p50 (ms) of one Frame + Ack on 127.0.0.1, {a.frames} frames each, hidden {a.hidden} float32")
    print(f"{'tokens':>6} {'bytes':>8} " + " ".join(f"{m:>8}" for m in MODES) + f" {'hmac/open':>10} {'tls/open':>9}")
    for tokens, nbytes, p in rows:
        print(f"{tokens:>6} {nbytes:>8} " + " ".join(f"{p[m]:>8.3f}" for m in MODES)
              + f" {p['hmac'] / p['open']:>10.2f} {p['tls'] / p['open']:>9.2f}")


if __name__ == "__main__":
    main()
