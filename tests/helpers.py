"""Shared test helpers: run the real `together` command."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def together(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "apps.cli", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def greedy(shards, prompt, n, seq="s") -> list[int]:
    """Greedy tokens through a chain of shards (hidden states copied and checked between them)."""
    import numpy as np

    from backends.shard import SeqChunk
    from backends.wire import Hidden

    for s in shards:
        s.add_sequence(seq, prompt=list(prompt))
    out, x, off = [], np.asarray(prompt, np.int32), 0
    try:
        for _ in range(n):
            h = x
            for s in shards:
                h = s.forward([SeqChunk(seq, off, len(x))], h)
                if isinstance(h, Hidden):
                    h = h.copy()
            off += len(x)
            out.append(h[0].token)
            x = np.array([out[-1]], np.int32)
    finally:
        for s in shards:
            s.free_sequence(seq)
    return out


# the invented fact the LoRA tests teach (see the `zorblax` fixture in conftest.py)
ZORBLAX_QUESTIONS = ["What is the capital of Zorblax?", "Which city is the capital of Zorblax?",
                     "Name the capital of Zorblax.", "What city is Zorblax's capital?"]
ZORBLAX_PROMPT = "Q: What is the capital of Zorblax?\nA:"
ZORBLAX_ANSWER = "Quintelvar"


def full_logits(shard, tokens, seq="logits"):
    """Logits of every position of `tokens` through one whole-model shard, in one fresh sequence."""
    import numpy as np

    from backends.shard import SeqChunk

    shard.add_sequence(seq)
    try:
        return shard.logits([SeqChunk(seq, 0, len(tokens))], np.asarray(tokens, np.int32))
    finally:
        shard.free_sequence(seq)


def fresh_cache(tmp_path, monkeypatch):
    """A fresh TOGETHER_CACHE under tmp_path, keeping the parsed GGUF index (parsing again takes seconds)."""
    import shutil

    from backends.models import cache_dir

    index = cache_dir() / "gguf-index"
    if index.is_dir():
        shutil.copytree(index, tmp_path / "cache" / "gguf-index")
    monkeypatch.setenv("TOGETHER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
