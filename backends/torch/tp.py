"""torch ranks of a tensor-parallel group (see backends/tp.py).

The group is a torch.distributed process group on a TCPStore rendezvous at rank 0 (what
init_method="tcp://host:port" sets up), gloo on CPU and NCCL on CUDA, built directly rather than
as the process-global default group, so one process can form a new group after losing one.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Protocol, cast

import numpy as np
import torch
import torch.distributed as dist

from backends.errors import GroupError
from backends.shard import LayerShard
from backends.torch.model import DTYPES, load_slice
from backends.torch.shard import TorchShard
from backends.tp import RankPart, TPRank, rank_checkpoint
from backends.weights import Checkpoint
from backends.wire import Hidden


class _Collectives(Protocol):
    """What a process-group backend (gloo, NCCL) does here; torch's stubs give them no collectives."""

    def allreduce(self, tensors: list[torch.Tensor]) -> dist.Work: ...

    def broadcast(self, tensors: list[torch.Tensor], opts: dist.BroadcastOptions) -> dist.Work: ...


class TorchComm:
    """One rank's process group: in-place all-reduce (sum) and broadcast from rank 0."""

    def __init__(self, rank: int, world: int, spec: dict, timeout: float, device: str | None = None):
        td = timedelta(seconds=timeout)
        self.rank, self.world, self.kind = rank, world, spec["kind"]
        self.store: dist.TCPStore | None = dist.TCPStore(spec["host"], spec["port"], world, rank == 0, timeout=td)
        self.pg: _Collectives | None
        if self.kind == "nccl":
            if not dist.is_nccl_available():
                raise GroupError("this torch has no NCCL: use the gloo collective")
            torch.cuda.set_device(torch.device(device or "cuda").index or 0)
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = td
            self.pg = cast(_Collectives, dist.ProcessGroupNCCL(self.store, rank, world, opts))
        elif self.kind == "gloo":
            # the options object the constructor takes (with a timeout and devices); not in the stubs
            gopts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
            gopts._timeout = td
            gopts._devices = [dist.ProcessGroupGloo.create_device(hostname=spec["bind"])]
            self.pg = cast(_Collectives, dist.ProcessGroupGloo(self.store, rank, world, gopts))
        else:
            raise GroupError(f"unknown torch collective {self.kind!r} (expected gloo or nccl)")

    def _group(self) -> _Collectives:
        if self.pg is None:
            raise GroupError(f"rank {self.rank}'s torch process group is closed")
        return self.pg

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        self._group().allreduce([t]).wait()
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        self._group().broadcast([t], dist.BroadcastOptions()).wait()  # root 0
        return t

    def close(self) -> None:
        self.pg = self.store = None


def connect(rank: int, world: int, spec: dict, timeout: float, device: str | None = None) -> TorchComm:
    return TorchComm(rank, world, spec, timeout, device)


class TPShard(TPRank, TorchShard):
    """One rank's part of layers [start, end): its heads, MLP columns and KV cache."""

    comm: TorchComm

    def __init__(self, checkpoint: Checkpoint, start: int, end: int, dtype: str,
                 wire_dtype: str | None, device: str | None, threads: int | None,
                 part: RankPart, comm: TorchComm):
        self.part, self.comm = part, comm
        LayerShard.__init__(self, checkpoint, start, end, dtype, wire_dtype)
        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device(device or "cpu")
        self.model = load_slice(rank_checkpoint(checkpoint, start, end, part), start, end, dtype,
                                self.device, edges=part.edges, row_bias=part.rank == 0,
                                reduce=comm.all_sum)
        self._open_caches()

    def _input(self, x: np.ndarray | Hidden | None) -> torch.Tensor:
        dt = DTYPES[self.dtype]
        if self.part.rank > 0:  # rank 0 broadcasts the hidden states it computes with
            h = torch.empty(self._incoming, self.config.hidden_size, dtype=dt, device=self.device)
            return self.comm.broadcast(h)
        h = super()._input(x)
        if self.is_first and self.model.embed is not None:
            h = self.model.embed(h).to(dt)  # (T, C); the model skips embedding hidden states
        return self.comm.broadcast(h.contiguous())

    def stats(self) -> dict:
        return {"rank": self.part.rank, "weight_nbytes": self.weight_nbytes(),
                "layer_nbytes": sum(p.nbytes for p in [*self.model.layers.parameters(), *self.model.layers.buffers()]),
                "cache_nbytes": self.cache_nbytes()}
