"""Ports: a peer given a port another process listens on is told it is taken (gRPC's default SO_REUSEPORT
would let both listen, the kernel splitting connections between them), and the test harness never hands
out one port twice (peers started at one instant once collided that way)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from backends.net import free_port
from mesh.auth import make_server
from mesh.tls import add_port

ROOT = Path(__file__).resolve().parents[2]


def test_a_second_server_on_a_taken_port_gets_no_port_open_or_keyed():
    async def main(key: str | None) -> int:
        first = make_server(key)
        port = add_port(first, "127.0.0.1:0", key)
        await first.start()
        try:
            return add_port(make_server(key), f"127.0.0.1:{port}", key)
        finally:
            await first.stop(None)

    assert asyncio.run(main(None)) == 0
    assert asyncio.run(main("k" * 32)) == 0


def test_join_on_a_taken_port_says_so_and_exits(tmp_path):
    async def hold_and_join() -> subprocess.CompletedProcess[str]:
        first = make_server(None)
        port = add_port(first, "127.0.0.1:0", None)
        await first.start()
        try:
            return await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "apps.cli", "join", "--model", "smollm2-135m", "--no-mdns",
                                 "--host", "127.0.0.1", "--port", str(port), "--backend", "torch"],
                cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        finally:
            await first.stop(None)

    r = asyncio.run(hold_and_join())
    assert r.returncode == 2 and "pick another --port" in r.stderr, r.stderr[-2000:]


def test_free_ports_are_never_handed_out_twice():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
