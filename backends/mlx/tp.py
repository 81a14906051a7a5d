"""MLX ranks of a tensor-parallel group (see backends/tp.py).

The group is mx.distributed's ring backend over TCP, configured as MLX documents it (a hostfile
JSON of one "ip:port" list per rank, MLX_HOSTFILE and MLX_RANK). The blocks are mlx-lm's own
TransformerBlocks built for the whole model and then cut down to the rank's heads and MLP columns
(as mlx-lm's own `shard()` does); o_proj and down_proj become mlx.nn's ShardedToAllLinear /
QuantizedShardedToAllLinear, which sum the partial products over the ring and add the bias once.
mx.distributed keeps one global group per process, so a process can join one group in its life.

The ring has no timeouts: a dead peer fails the next collective at once, but a hung one (a machine
gone without closing its sockets) would block forever. So rank 0 computes on a thread of its own
and gives up when no collective has finished for `timeout` seconds.
"""

from __future__ import annotations

import json
import os
import queue
import tempfile
import threading
import time
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import QuantizedShardedToAllLinear, ShardedToAllLinear

from backends.errors import GroupError
from backends.mlx.shard import MLXShard, param_arrays
from backends.tp import RankLinks, RankPart, TPRank, rank_checkpoint
from backends.weights import Checkpoint
from backends.wire import Hidden

_joined: list[int] = []  # this process's ring (mx.distributed cannot form a second one)


class MLXComm:
    """This process's ring: rank 0 sends its input hidden states to every rank."""

    def __init__(self, rank: int, world: int, spec: dict, timeout: float = 60.0):
        if _joined:
            raise GroupError("this process already joined an MLX tensor-parallel group: mx.distributed "
                             "forms one ring per process, so start the next group's ranks as new processes")
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="together-ring-", delete=False) as f:
            json.dump(spec["hosts"], f)
        if rank > 0:  # let rank 0 listen first: the ring retries a refused connection only after 1 s
            time.sleep(0.05)
        saved = {k: os.environ.get(k) for k in ("MLX_RANK", "MLX_HOSTFILE")}
        os.environ.update(MLX_RANK=str(rank), MLX_HOSTFILE=f.name)
        try:
            self.group = mx.distributed.init(strict=True, backend="ring")
        except RuntimeError as e:
            raise GroupError(f"MLX ring of {world} ranks did not form: {e}") from None
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            os.unlink(f.name)
        _joined.append(rank)
        if (self.group.rank(), self.group.size()) != (rank, world):
            raise GroupError(f"MLX ring formed as rank {self.group.rank()} of {self.group.size()}, "
                             f"expected rank {rank} of {world}")
        self.rank, self.world, self.timeout = rank, world, timeout
        self.progress = time.monotonic()  # when a collective last finished
        self._jobs: queue.Queue | None = None

    def tick(self) -> None:
        self.progress = time.monotonic()

    def send_hidden(self, h: mx.array) -> None:
        mx.eval([mx.distributed.send(h, dst=r, group=self.group) for r in range(1, self.world)])
        self.tick()

    def run(self, fn: Callable[[], object], links: RankLinks) -> object:
        """fn() on this ring's compute thread, watched: a stall of `timeout` seconds with no
        collective finishing breaks the group (the stuck thread is left behind, as a daemon)."""
        if self._jobs is None:
            self._jobs = queue.Queue()
            threading.Thread(target=self._serve, args=(self._jobs,), daemon=True, name="tp-mlx").start()
        box: dict = {}
        done = threading.Event()
        self.tick()
        self._jobs.put((fn, box, done))
        while not done.wait(0.05):
            if time.monotonic() - self.progress > self.timeout:
                self._jobs = None
                links.broken = (f"tensor-parallel group of {links.what}: no collective finished within "
                                f"{self.timeout:.0f} s, a rank hangs; the group must be formed again")
                raise GroupError(links.broken)
        if "error" in box:
            raise box["error"]
        return box.get("value")

    @staticmethod
    def _serve(jobs: queue.Queue) -> None:
        while True:
            fn, box, done = jobs.get()
            try:
                box["value"] = fn()
            except BaseException as e:  # handed to the caller
                box["error"] = e
            done.set()

    def recv_hidden(self, shape: tuple[int, ...], dtype) -> mx.array:
        h = mx.distributed.recv(shape, dtype, src=0, group=self.group)
        mx.eval(h)
        return h

    def close(self) -> None:
        pass  # the ring lives as long as the process


def connect(rank: int, world: int, spec: dict, timeout: float, device: str | None = None) -> MLXComm:
    return MLXComm(rank, world, spec, timeout)


# Each rank evaluates its sums as they come, so that every rank runs its collectives in program
# order (one lazy graph's independent branches, e.g. two prefill chunks, may evaluate in any order).

def _summed(y: mx.array, comm: MLXComm) -> mx.array:
    mx.eval(y)
    comm.tick()
    return y


class _RowParallel(ShardedToAllLinear):
    """mlx.nn's row-parallel layer, its all-reduced output evaluated at once."""

    def __init__(self, comm: MLXComm, *args: Any):
        super().__init__(*args)
        self.comm = comm  # a plain attribute, not a parameter

    def __call__(self, x: mx.array) -> mx.array:
        return _summed(super().__call__(x), self.comm)


class _QuantizedRowParallel(QuantizedShardedToAllLinear):
    """The same for a quantized layer."""

    def __init__(self, comm: MLXComm, *args: Any):
        super().__init__(*args)
        self.comm = comm

    def __call__(self, x: mx.array) -> mx.array:
        return _summed(super().__call__(x), self.comm)


def _row_parallel(lin: nn.Module, comm: MLXComm) -> nn.Module:
    """A loaded (Quantized)Linear holding this rank's input columns -> its sharded-to-all twin.
    The constructors are told N times the local width (they expect an even split) and their
    placeholder weights, lazy and never evaluated, are replaced by the loaded ones."""
    group, n = comm.group, comm.world
    m: nn.Module
    if isinstance(lin, nn.QuantizedLinear):
        out, words = lin.weight.shape
        m = _QuantizedRowParallel(comm, words * 32 // lin.bits * n, out, "bias" in lin, lin.group_size, lin.bits,
                                  getattr(lin, "mode", "affine"), group)
    else:
        out, width = lin.weight.shape
        m = _RowParallel(comm, width * n, out, "bias" in lin, group)
    m.update(lin.parameters())
    return m


class TPShard(TPRank, MLXShard):
    """One rank's part of layers [start, end): its heads, MLP columns and KV cache."""

    comm: MLXComm
    speculate = False  # every rank runs the steps rank 0 is told to, none ahead

    def __init__(self, checkpoint: Checkpoint, start: int, end: int, dtype: str,
                 wire_dtype: str | None, device: str | None, threads: int | None,
                 part: RankPart, comm: MLXComm):
        self.part, self.comm = part, comm
        self._view = rank_checkpoint(checkpoint, start, end, part)
        super().__init__(checkpoint, start, end, dtype, wire_dtype, threads=threads)

    def _load(self, ck: Checkpoint) -> None:
        # cut the whole-model blocks down to this rank's part, load it, then make the row-parallel
        # projections sum over the ring
        p, h, hd = self.part, self.config.hidden_size, self.config.head_dim
        for layer in self.model.layers:
            at, mlp = layer.self_attn, layer.mlp
            at.n_heads, at.n_kv_heads = p.n_heads, p.n_kv_heads
            at.q_proj = nn.Linear(h, p.n_heads * hd, bias="bias" in at.q_proj)
            at.k_proj = nn.Linear(h, p.n_kv_heads * hd, bias="bias" in at.k_proj)
            at.v_proj = nn.Linear(h, p.n_kv_heads * hd, bias="bias" in at.v_proj)
            at.o_proj = nn.Linear(p.n_heads * hd, h, bias="bias" in at.o_proj)
            mlp.gate_proj = nn.Linear(h, p.ffn_size, bias="bias" in mlp.gate_proj)
            mlp.up_proj = nn.Linear(h, p.ffn_size, bias="bias" in mlp.up_proj)
            mlp.down_proj = nn.Linear(p.ffn_size, h, bias="bias" in mlp.down_proj)
        whole, self.config = self.config, self._view.config  # validate against the rank's shapes
        try:
            super()._load(self._view)
        finally:
            self.config = whole
        for layer in self.model.layers:
            layer.self_attn.o_proj = _row_parallel(layer.self_attn.o_proj, self.comm)
            layer.mlp.down_proj = _row_parallel(layer.mlp.down_proj, self.comm)

    def _forward(self, chunks, x, want_logits):
        if self.part.rank > 0:
            return super()._forward(chunks, x, want_logits)
        return self.comm.run(lambda: super(TPShard, self)._forward(chunks, x, want_logits), self.links)

    def _input(self, x: np.ndarray | Hidden | None) -> mx.array:
        if self.part.rank > 0:  # rank 0 sends the hidden states it computes with
            return self.comm.recv_hidden((self._incoming, self.config.hidden_size), self.dt)
        h = super()._input(x).astype(self.dt)
        mx.eval(h)
        self.comm.send_hidden(h)
        return h

    def stats(self) -> dict:
        return {"rank": self.part.rank, "weight_nbytes": self.weight_nbytes(),
                "layer_nbytes": sum(v.nbytes for layer in self.model.layers for v in param_arrays(layer)),
                "cache_nbytes": self.cache_nbytes()}
