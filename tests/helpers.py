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


def random_llama(path: Path, *, hidden: int, intermediate: int, heads: int, kv_heads: int, layers: int, vocab: int,
                 head_dim: int | None = None, tied: bool = True, biases: bool = False, seed: int = 0,
                 scale: float = 0.1, bias_scale: float = 0.3, norm_noise: float | None = 0.1,
                 **config: object) -> Path:
    """A random Llama checkpoint in `path` (model.safetensors + config.json), for tests that need a
    small model of a given shape. Weights are `scale` x N(0, 1) (biases on every projection with
    `biases`: `bias_scale` x N(0, 1)); RMSNorm weights 1 + `norm_noise` x N(0, 1), or exactly one with
    None. Tensors are drawn in a fixed order from `seed`, so one set of arguments is one model.
    `config` adds keys to config.json as they are (rms_norm_eps, rope_theta, attention_bias, ...)."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    hd = head_dim or hidden // heads
    cfg: dict[str, object] = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
                              "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                              "num_hidden_layers": layers, "vocab_size": vocab, "tie_word_embeddings": tied}
    if head_dim:
        cfg["head_dim"] = head_dim
    cfg.update(config)
    w = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tied:
        w["lm_head.weight"] = (vocab, hidden)
    for n in range(layers):
        p = f"model.layers.{n}."
        for m, (o, i) in {"self_attn.q_proj": (heads * hd, hidden), "self_attn.k_proj": (kv_heads * hd, hidden),
                          "self_attn.v_proj": (kv_heads * hd, hidden), "self_attn.o_proj": (hidden, heads * hd),
                          "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
                          "mlp.down_proj": (hidden, intermediate)}.items():
            w[p + m + ".weight"] = (o, i)
            if biases:
                w[p + m + ".bias"] = (o,)
        w[p + "input_layernorm.weight"] = w[p + "post_attention_layernorm.weight"] = (hidden,)
    rng = np.random.default_rng(seed)

    def draw(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name.endswith("norm.weight"):
            return np.ones(shape) if norm_noise is None else 1.0 + norm_noise * rng.standard_normal(shape)
        return (bias_scale if name.endswith(".bias") else scale) * rng.standard_normal(shape)

    arrays = {k: draw(k, s).astype(np.float32) for k, s in w.items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg))
    return path
