"""Start real `together join` processes on 127.0.0.1 and wait for their ring."""

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

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeerProc:
    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict | None = None):
        self.name = name
        self.port = free_port()
        self.api_port: int | None = None
        if "--api-port" in args:
            self.api_port = int(args[args.index("--api-port") + 1])
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")
        e = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
        e.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "apps.cli", "join", "--name", name, "--port", str(self.port),
             "--threads", "1", *args],
            cwd=ROOT, env=e, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class Cluster:
    """A set of peers of one mesh (a random mesh name, so tests never see each other)."""

    def __init__(self, model: str, mesh_key: str | None = None):
        self.model = model
        self.mesh = f"test-{uuid.uuid4().hex[:8]}"
        self.mesh_key = mesh_key
        self.dir = Path(tempfile.mkdtemp(prefix="together-cluster-"))
        self.peers: dict[str, PeerProc] = {}

    def add(self, name: str, *args: str, api: bool = False, mesh: str | None = None,
            key: str | None = "same") -> PeerProc:
        a = ["--model", self.model, "--mesh", mesh or self.mesh, *args]
        k = self.mesh_key if key == "same" else key
        if k:
            a += ["--mesh-key", k]
        if api:
            a += ["--api-port", str(free_port())]
        p = PeerProc(name, a, self.dir)
        self.peers[name] = p
        return p

    def health(self, peer: PeerProc) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{peer.api_port}/health", timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
        except (urllib.error.URLError, ConnectionError, OSError):
            return 0, {}

    def wait_ready(self, peer: PeerProc, timeout: float = 180, stages: int | None = None) -> dict:
        deadline = time.time() + timeout
        body: dict = {}
        while time.time() < deadline:
            for p in self.peers.values():
                if p.proc.poll() is not None and p.proc.returncode not in (0, None) and p is peer:
                    raise AssertionError(f"{p.name} exited {p.proc.returncode}:\n{p.log()}")
            code, body = self.health(peer)
            if code == 200 and (stages is None or len(body["ring"]) == stages):
                return body
            time.sleep(0.5)
        logs = "\n".join(f"--- {p.name}\n{p.log()[-3000:]}" for p in self.peers.values())
        raise AssertionError(f"ring not ready after {timeout}s: {body}\n{logs}")

    def status(self, peer: PeerProc):
        from protos import together_pb2 as pb

        import asyncio

        from mesh.auth import make_channel
        from protos import together_pb2_grpc as pbg

        async def go():
            ch = make_channel(peer.address, self.mesh_key, "test")
            try:
                return await pbg.TogetherStub(ch).Status(pb.StatusRequest(), timeout=5)
            finally:
                await ch.close()

        return asyncio.run(go())

    def stop(self) -> None:
        for p in self.peers.values():
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGINT)
        for p in self.peers.values():
            p.stop()
