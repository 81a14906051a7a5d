"""What this peer's host offers the mesh: free memory, a quick speed estimate, open files."""

from __future__ import annotations

import os
import time

import numpy as np

from backends.weights import Checkpoint


def open_fds() -> int:
    """Open file descriptors of this process (Status reports them: a leak shows)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        import psutil

        return psutil.Process().num_fds()


def free_memory() -> int:
    """Memory this peer offers for layers: most of what the host has available now."""
    import psutil

    return int(psutil.virtual_memory().available * 0.8)


def measure_layer_ms(ck: Checkpoint) -> float:
    """A quick stand-in for a decode step through one layer: one matvec per weight shape."""
    c = ck.config
    shapes = [(c.hidden_size, c.num_attention_heads * c.head_dim),
              (c.hidden_size, 2 * c.num_key_value_heads * c.head_dim),
              (c.num_attention_heads * c.head_dim, c.hidden_size),
              (c.hidden_size, 2 * c.intermediate_size), (c.intermediate_size, c.hidden_size)]
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    x = rng.standard_normal((1, c.hidden_size), dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        h = x
        for w in ws:
            h = (h[:, : w.shape[0]] if h.shape[1] >= w.shape[0] else np.resize(h, (1, w.shape[0]))) @ w
        best = min(best, time.perf_counter() - t)
    return best * 1000
