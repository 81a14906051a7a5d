"""Measured links against what the link is, in one run: two network namespaces joined by a bridge
(tests/mesh/netns.py; needs root), the sender's egress shaped with `tc htb` to each of --rates and
both ends given the test-only link delay (`--link-delay-ms`, as `together join` does). Peer A
measures peer B with `mesh.linkprobe` (the real Probe RPC on a keyed channel: mutual TLS and seals),
beside a raw TCP transfer of the same bytes over the same link (the link's plain capacity, same
formula: bits / (time - a one-byte round trip)). Prints per setting the configured rate and delay,
our RTT and Mbit/s, raw TCP's, and ours / configured and ours / raw TCP.

    .venv/bin/python perf/bench_links.py [--rates 0,200,50,10] [--delays 0,20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEY = "bench links key"
GRPC_PORT, TCP_PORT = 7430, 7431
HIDDEN = 576  # SmolLM2's: the probe is hidden x 4 bytes x 128 tokens, as a peer of the embedded model sends


# ---------------------------------------------------------------- inside the namespaces

async def serve(delay_ms: float) -> None:
    """Peer B: a real Servicer answering probes (with the delay), and a raw TCP sink."""
    from mesh.auth import add_port, make_server
    from mesh.linkprobe import LinkProber
    from mesh.links import Peers
    from mesh.servicer import Servicer
    from mesh.view import PlanView
    from protos import together_pb2 as pb
    from protos import together_pb2_grpc as pbg

    view = PlanView("b", "b", "0.0.0.0", 30)
    prober = LinkProber(view, Peers(KEY, "b"), HIDDEN, delay_ms / 1000)
    server = make_server(KEY)
    servicer = Servicer(KEY, 30, 0.0, view, None, None, None, None, status=pb.StatusReply,
                        prober=prober)
    pbg.add_TogetherServicer_to_server(servicer, server)
    add_port(server, f"0.0.0.0:{GRPC_PORT}", KEY)
    await server.start()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:  # each request: 8-byte length, then that many bytes; answered with one byte
            while True:
                await reader.readexactly(int.from_bytes(await reader.readexactly(8), "big"))
                writer.write(b"k")
                await writer.drain()
        except asyncio.IncompleteReadError:  # the measuring side closed the connection
            pass
        writer.close()

    tcp = await asyncio.start_server(sink, "0.0.0.0", TCP_PORT)
    print("ready", flush=True)
    async with tcp:
        await tcp.serve_forever()


async def measure(host: str, delay_ms: float, repeat: int) -> None:
    """Peer A: the probe's measurements and raw TCP's, printed as JSON."""
    from mesh.linkprobe import LinkProber
    from mesh.links import Peers
    from mesh.view import PlanView

    view = PlanView("a", "a", "0.0.0.0", 30)
    links = Peers(KEY, "a", delay_s=delay_ms / 1000)
    prober = LinkProber(view, links, HIDDEN, delay_ms / 1000)
    ours = []
    await prober.measure("b", f"{host}:{GRPC_PORT}")  # warm: TLS handshake, channel
    for _ in range(repeat):
        st = await prober.measure("b", f"{host}:{GRPC_PORT}")
        assert st is not None
        ours.append((st.rtt_ms, st.mbps))
    await links.close()
    raw = [tcp_transfer(host, prober.probe_bytes) for _ in range(repeat)]
    print(json.dumps({"bytes": prober.probe_bytes, "ours": ours, "raw": raw}))


def tcp_transfer(host: str, n: int) -> tuple[float, float]:
    """(RTT ms, Mbit/s) of a plain TCP connection: a one-byte round trip, then n bytes and the ack."""
    with socket.create_connection((host, TCP_PORT), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def once(size: int) -> float:
            t = time.perf_counter()
            s.sendall(size.to_bytes(8, "big") + bytes(size))
            assert s.recv(1) == b"k"
            return time.perf_counter() - t

        once(1)
        rtt = min(once(1) for _ in range(4))
        best = min(once(n) for _ in range(2))
    return rtt * 1000, n * 8 / 1e6 / max(best - rtt, 1e-5)


# ---------------------------------------------------------------- the run

def shape(ns: str, rate_mbit: int) -> None:
    subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", "eth0", "root"], capture_output=True)
    if rate_mbit:
        for cmd in (["qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10"],
                    ["class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb", "rate",
                     f"{rate_mbit}mbit", "ceil", f"{rate_mbit}mbit"]):
            subprocess.run(["tc", "-n", ns, *cmd], check=True, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="0,200,50,10", help="htb rates in Mbit/s (0: unshaped)")
    ap.add_argument("--delays", default="0,20", help="--link-delay-ms of both ends")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--measure", default="", help=argparse.SUPPRESS)
    ap.add_argument("--delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        return asyncio.run(serve(a.delay_ms))
    if a.measure:
        return asyncio.run(measure(a.measure, a.delay_ms, a.repeat))

    from tests.mesh.netns import NetnsMesh

    rates = [int(x) for x in a.rates.split(",")]
    delays = [float(x) for x in a.delays.split(",")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rows = []
    with NetnsMesh(2, model="-") as net:
        for delay in delays:
            srv = subprocess.Popen(["ip", "netns", "exec", net.ns[1], sys.executable, __file__, "--serve",
                                    "--delay-ms", str(delay)], stdout=subprocess.PIPE, text=True, env=env)
            try:
                assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
                for rate in rates:
                    shape(net.ns[0], rate)
                    out = subprocess.run(["ip", "netns", "exec", net.ns[0], sys.executable, __file__, "--measure",
                                          net.host(1), "--delay-ms", str(delay), "--repeat", str(a.repeat)],
                                         capture_output=True, text=True, env=env, timeout=300)
                    if out.returncode:
                        raise SystemExit(out.stderr[-3000:])
                    rows.append((rate, delay, json.loads(out.stdout)))
            finally:
                srv.kill()
                srv.wait()
    report(rows, a.repeat)


def report(rows: list[tuple[int, float, dict]], repeat: int) -> None:
    print(f"probe: {rows[0][2]['bytes']} bytes (hidden {HIDDEN} x 4 B x 128 tokens), medians of {repeat}; "
          f"cpu {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
    head = ("htb rate", "delay/end", "our RTT", "raw RTT", "our Mbit/s", "raw Mbit/s", "ours/rate", "ours/raw")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for rate, delay, r in rows:
        o_rtt = statistics.median(x[0] for x in r["ours"])
        o_mb = statistics.median(x[1] for x in r["ours"])
        r_rtt = statistics.median(x[0] for x in r["raw"])
        r_mb = statistics.median(x[1] for x in r["raw"])
        print(f"| {f'{rate} Mbit/s' if rate else 'none'} | {delay:.0f} ms | {o_rtt:.2f} ms | {r_rtt:.2f} ms | "
              f"{o_mb:.0f} | {r_mb:.0f} | {f'{o_mb / rate:.2f}' if rate else '-'} | {o_mb / r_mb:.2f} |")


if __name__ == "__main__":
    main()
