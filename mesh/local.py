"""Start `together join` processes on this host and wait for their ring (demo, tests, benchmarks)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

from backends.net import free_port

ROOT = Path(__file__).resolve().parents[1]


def wait_port(host: str, port: int, timeout: float = 120) -> None:
    """Until something listens on host:port (a peer's gRPC server is up), at most `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)


def http_json(url: str, timeout: float = 2.0, api_key: str | None = None) -> tuple[int, dict[str, Any]]:
    """(status, body) of a GET; status 0 when nothing answers."""
    try:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {}
    except (OSError, ValueError):
        return 0, {}


def own_cpu(i: int) -> str | None:
    """The --cpus of a harness's peer i: one core of this host each, in turn (None where threads cannot be
    pinned). Peers sharing a host's cores run faster each on its own core: unpinned, the OS moves their
    compute threads between cores and every move starts on cold caches (perf/bench_batching.py --no-pin)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return str(cpus[i % len(cpus)])


class PeerProc:
    """One `together join` child process, logging to a file."""

    def __init__(self, name: str, args: list[str], log_dir: Path, threads: int = 1, host: str = "127.0.0.1",
                 port: int | None = None, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        # prefix: e.g. ("ip", "netns", "exec", NS) to run the peer inside a network namespace;
        # env: more environment (e.g. its own TOGETHER_CACHE)
        self.name, self.host = name, host
        self.port = port or free_port()
        self.api_port = int(args[args.index("--api-port") + 1]) if "--api-port" in args else None
        self.api_key = args[args.index("--api-key") + 1] if "--api-key" in args else None
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")
        e = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        # several peers share this host's cores: one compute thread each unless told otherwise
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "apps.cli", "join", "--name", name, "--port", str(self.port),
             "--threads", str(threads), *args],
            cwd=ROOT, env=e, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def api(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class PeerGroup:
    """`together join` processes started on this host by one harness: their readiness, logs and stop."""

    ready_timeout = 240.0  # seconds wait_ready waits unless told otherwise
    poll_s = 0.2  # between two /health asks while waiting (a ring is ready ~poll_s / 2 before it is seen)

    def __init__(self) -> None:
        self.peers: dict[str, PeerProc] = {}

    def health(self, peer: PeerProc) -> tuple[int, dict[str, Any]]:
        return http_json(f"{peer.api}/health", api_key=peer.api_key)

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name} ({p.address})\n{p.log()[-tail:]}" for p in self.peers.values())

    def wait_ready(self, peer: PeerProc, timeout: float | None = None, stages: int | None = None,
                   want: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """Poll `peer`'s /health until its ring is complete (of `stages` stages; `want(body)` true);
        a peer that exits, or a ring not ready in time, raises with the peers' logs."""
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.time() + timeout
        body: dict[str, Any] = {}
        while time.time() < deadline:
            if peer.proc.poll() is not None:
                raise RuntimeError(f"{peer.name} exited {peer.proc.returncode}:\n{peer.log()[-4000:]}")
            code, body = self.health(peer)
            if code == 200 and (stages is None or len(body.get("ring", [])) == stages) \
                    and (want is None or want(body)):
                return body
            time.sleep(self.poll_s)
        raise RuntimeError(f"ring not ready after {timeout:.0f}s: {body}\n{self.logs()}")

    def wait_complete(self, peer: PeerProc, timeout: float) -> dict[str, Any]:
        """Poll `peer`'s /health until its ring is complete and every stage ready, whatever its shape.
        Any peer of the group that exits meanwhile is an error naming it, with the end of its log."""
        deadline = time.time() + timeout
        body: dict[str, Any] = {}
        while time.time() < deadline:
            for p in self.peers.values():
                if p.proc.poll() is not None:
                    tail = "\n".join(p.log().splitlines()[-15:])
                    raise RuntimeError(f"peer {p.name} exited with status {p.proc.returncode}; the end of its "
                                       f"log ({p.log_path}):\n{tail}")
            code, body = self.health(peer)
            if code == 200 and body.get("ring") and all(s.get("ready") for s in body["ring"]):
                return body
            time.sleep(self.poll_s)
        raise RuntimeError(f"the ring was not complete after {timeout:.0f} s "
                           f"({body.get('missing') or 'the API did not answer'}):\n{self.logs(1500)}")

    def stop(self) -> None:
        """SIGINT every peer at once (they leave in parallel), then wait for each."""
        peers = list(self.peers.values())
        for p in peers:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGINT)
        for p in peers:
            p.stop()


class LocalMesh(PeerGroup):
    """Peers of one mesh on this host, under a random mesh name unless one is given."""

    def __init__(self, model: str, mesh: str | None = None, mesh_key: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.mesh = mesh or f"local-{uuid.uuid4().hex[:8]}"
        self.mesh_key = mesh_key
        self.dir = Path(tempfile.mkdtemp(prefix="together-mesh-"))

    def add(self, name: str, *args: str, api: bool = False, mesh: str | None = None,
            key: str | None = "same", threads: int = 1, env: dict[str, str] | None = None,
            cpus: str | None = None) -> PeerProc:
        # peers of one host talk over loopback: their mDNS never leaves this machine; cpus: its --cpus
        a = ["--host", "127.0.0.1", "--model", self.model, "--mesh", mesh or self.mesh, *args,
             *(("--cpus", cpus) if cpus else ())]
        k = self.mesh_key if key == "same" else key
        if k:
            a += ["--mesh-key", k]
        if api:
            a += ["--api-port", str(free_port())]
        p = PeerProc(name, a, self.dir, threads=threads, env=env)
        self.peers[name] = p
        return p
