"""`together demo`: a local mesh of three peers (MLX and torch) answering through the OpenAI API."""

from __future__ import annotations

import argparse
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

from backends.errors import TogetherError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(api_port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/health", timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except OSError:
        return 0, {}


def run_demo(a: argparse.Namespace) -> int:
    from backends.models import resolve_model
    from backends.shard import available_backends

    path = resolve_model(a.model)
    have = available_backends()
    n = 30 if a.model == "smollm2-135m" else None
    if n is None:
        from backends.weights import open_checkpoint

        n = open_checkpoint(path).config.num_hidden_layers
    cuts = [0, n // 3, 2 * n // 3, n]
    backends = ["mlx", "torch", "mlx"] if {"mlx", "torch"} <= set(have) else [have[0]] * 3
    mesh = f"demo-{uuid.uuid4().hex[:6]}"
    logs = Path(tempfile.mkdtemp(prefix="together-demo-"))
    api_port = a.api_port or _free_port()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    procs: list[subprocess.Popen] = []
    print(f"starting 3 peers of mesh {mesh!r} on 127.0.0.1 (logs in {logs})", file=sys.stderr)
    try:
        for i, backend in enumerate(backends):
            cmd = [sys.executable, "-m", "apps.cli", "join", "--model", str(path), "--mesh", mesh,
                   "--backend", backend, "--name", f"{backend}-{i}", "--layers",
                   f"{cuts[i]}-{cuts[i + 1]}", "--threads", "1"]
            if i == 0:
                cmd += ["--api-port", str(api_port)]
            log = open(logs / f"peer{i}.log", "w")
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env))
            print(f"  peer {i}: {backend}, layers [{cuts[i]}, {cuts[i + 1]})", file=sys.stderr)
        deadline = time.time() + a.timeout
        while True:
            code, body = _health(api_port)
            if code == 200:
                break
            dead = [p for p in procs if p.poll() is not None]
            if dead or time.time() > deadline:
                tail = "".join((logs / f"peer{i}.log").read_text()[-1500:] for i in range(3))
                raise TogetherError(f"the ring did not come up ({body.get('missing') or 'no answer'})"
                                    f"; peer logs in {logs}:\n{tail}")
            time.sleep(0.5)
        ring = " -> ".join(f"{s['name']}[{s['start']},{s['end']})" for s in body["ring"])
        print(f"ring ready: {ring}", file=sys.stderr)
        return _ask(api_port, a.prompt, a.max_tokens)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        print("all peers stopped", file=sys.stderr)


def _ask(api_port: int, prompt: str, max_tokens: int) -> int:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key="local", max_retries=0)
    print(f"\n> {prompt}\n", flush=True)
    t0 = time.perf_counter()
    first = None
    n = 0
    usage = None
    stream = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                if first is None:
                    first = time.perf_counter()
                print(ch.delta.content, end="", flush=True)
    t1 = time.perf_counter()
    n = usage.completion_tokens if usage else 0
    print("\n", flush=True)
    decode = (n - 1) / (t1 - first) if first and n > 1 and t1 > first else 0.0
    print(f"{n} tokens in {t1 - t0:.1f} s: first token after {((first or t1) - t0) * 1000:.0f} ms, "
          f"then {decode:.1f} tokens/s through the ring", flush=True)
    return 0
