"""`together demo`: a local mesh of three peers (MLX and torch) answering through the OpenAI API."""

from __future__ import annotations

import argparse
import sys
import time
import uuid

from backends.errors import TogetherError
from mesh.local import LocalMesh


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
    mesh = LocalMesh(str(path), mesh=f"demo-{uuid.uuid4().hex[:6]}")
    print(f"starting 3 peers of mesh {mesh.mesh!r} on 127.0.0.1 (logs in {mesh.dir})", file=sys.stderr)
    try:
        peers = []
        for i, backend in enumerate(backends):
            peers.append(mesh.add(f"{backend}-{i}", "--backend", backend, "--layers", f"{cuts[i]}-{cuts[i + 1]}",
                                  *(["--api-port", str(a.api_port)] if i == 0 and a.api_port else []),
                                  api=i == 0 and not a.api_port))
            print(f"  peer {i}: {backend}, layers [{cuts[i]}, {cuts[i + 1]})", file=sys.stderr)
        api = peers[0]  # the first peer serves the API
        assert api.api_port is not None
        try:  # whatever its shape: a peer that fails is named, and the others may cover its layers
            body = mesh.wait_complete(api, timeout=a.timeout)
        except RuntimeError as e:
            raise TogetherError(f"the ring did not come up; peer logs in {mesh.dir}:\n{e}") from None
        ring = " -> ".join(f"{s['name']}[{s['start']},{s['end']})" for s in body["ring"])
        print(f"ring ready: {ring}", file=sys.stderr)
        return _ask(api.api_port, a.prompt, a.max_tokens)
    finally:
        mesh.stop()
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
