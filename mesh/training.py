"""This peer's part in a LoRA training job (`together lora --mesh`, apps/lora_mesh.py).

A job has its own trainable slice of this peer's layers (backends/train.py), apart from the served
shard, so serving never sees the adapter in training; both run on the stage's one compute thread.
A micro-batch travels as nested unary `TrainBatch` calls: a stage runs its forward, calls the next
stage with its output and waits; the reply carries the gradient of that output, from which it runs
its backward (recomputing its forward from the kept input) and answers its caller with the gradient
of its own input. The last stage computes the loss. Several micro-batches in flight at once queue
on each stage's compute thread in arrival order, so the stages work on different micro-batches
(GPipe: forwards first, backwards as the gradients return); `TrainStep` applies one Adam update.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import grpc
import numpy as np

from backends.errors import TogetherError
from backends.train import LoraSpec, MicroBatch, TrainSlice, load_train_slice
from backends.weights import Checkpoint
from backends.wire import DTYPES, Hidden, WireError
from mesh.links import Peers
from mesh.stage import Stage
from mesh.view import PlanView
from protos import together_pb2 as pb

log = logging.getLogger(__name__)
HOP_TIMEOUT_S = 900.0  # one micro-batch through the rest of the ring and back (a slow CPU, long rows)
MAX_PROGRESS = 256
MAX_RANK = 1024


class TrainError(TogetherError):
    """A training call this peer refuses or cannot finish; `code` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Job:
    job: str
    ring: list[pb.TrainHop]
    index: int
    slice: TrainSlice
    step: int
    compute_s: float = 0.0

    @property
    def last(self) -> bool:
        return self.index == len(self.ring) - 1

    def where(self, i: int) -> str:
        h = self.ring[i]
        return f"stage {i} (layers [{h.start}, {h.end}) on {h.address})"


class Trainer:
    """The training role of a peer: at most one job at a time (a new job replaces an old one, whose
    driver is gone or gave up)."""

    def __init__(self, view: PlanView, links: Peers, stage: Stage, checkpoint: Checkpoint, model: str,
                 backend: str, device: str | None) -> None:
        self.view, self.links, self.stage, self.ck = view, links, stage, checkpoint
        self.model, self.backend, self.device = model, backend, device
        self.job: _Job | None = None
        self.progress = ""  # PeerInfo.training: what the driver last said of the job

    async def open(self, req: pb.TrainOpenRequest) -> pb.TrainOpenReply:
        """Load this peer's trainable slice for a job, at its initial or resumed state."""
        hop = self._hop(req)
        spec = LoraSpec(req.rank, req.scale, req.lora_start, req.lora_end, tuple(req.keys), req.seed,
                        req.learning_rate)
        dtype = req.dtype or "float32"
        if dtype not in DTYPES or not 1 <= req.rank <= MAX_RANK:
            raise TrainError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"a job trains rank 1 to {MAX_RANK} in one of {', '.join(DTYPES)}, not rank "
                             f"{req.rank} in {dtype[:20]!r}")
        tensors = {t.name: _array(t) for t in req.tensors}
        self.job = None  # an old job's slice goes before the new one's comes

        def load() -> TrainSlice:
            sl = load_train_slice(self.backend, self.ck, hop.start, hop.end, spec, dtype, self.device)
            if tensors:
                sl.load_state(tensors, req.step)
            sl.adam.step = req.step
            return sl

        sl = await self._compute(load)
        self.job = _Job(req.job, list(req.ring), req.index, sl, req.step)
        self.progress = f"job {req.job}: step {req.step}, layers [{hop.start}, {hop.end})"
        log.info("training job %s: layers [%d, %d), %d trainable parameters (%s, %s)", req.job, hop.start,
                 hop.end, sl.trainable(), self.backend, dtype)
        return pb.TrainOpenReply(backend=self.backend, dtype=dtype, trainable=sl.trainable())

    def _hop(self, req: pb.TrainOpenRequest) -> pb.TrainHop:
        if req.model != self.model:
            raise TrainError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"{self.view.name} serves {self.model}, not {req.model}")
        if not req.job or len(req.job) > 64 or not req.index < len(req.ring):
            raise TrainError(grpc.StatusCode.INVALID_ARGUMENT, "a training job needs an id and its place in the ring")
        hop, sh = req.ring[req.index], self.stage.shard
        if hop.node_id != self.view.node_id or sh is None or (sh.start, sh.end) != (hop.start, hop.end):
            have = f"layers [{sh.start}, {sh.end})" if sh else "no layers"
            raise TrainError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"{self.view.name} holds {have}, not stage {req.index}'s [{hop.start}, {hop.end}): "
                             f"the ring changed; start the job again")
        return hop

    def _job(self, job: str) -> _Job:
        if self.job is None or self.job.job != job:
            raise TrainError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"{self.view.name} has no training job {job!r} (it restarted, or another job "
                             f"replaced it): resume from the last checkpoint")
        return self.job

    async def _compute(self, fn: Callable[[], Any], job: _Job | None = None) -> Any:
        t0 = time.perf_counter()
        try:
            return await self.stage.call(fn)
        except TogetherError as e:
            raise TrainError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except (ValueError, RuntimeError) as e:
            raise TrainError(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}") from None
        finally:
            if job is not None:
                job.compute_s += time.perf_counter() - t0

    async def batch(self, req: pb.TrainBatchRequest) -> pb.TrainBatchReply:
        """One micro-batch through this stage and those after it; the reply carries the loss and the
        gradient of this stage's input (when its sender trains)."""
        job = self._job(req.job)
        mb, x = _micro_batch(req, job.index > 0)
        key, sl, train = (req.step, req.micro), job.slice, not req.eval
        if job.last:
            loss, n, g = await self._compute(lambda: sl.loss(key, mb, x, train, req.want_grad and train), job)
            return _reply(loss, n, g)
        keep = train and (sl.trains or req.want_grad)
        y = await self._compute(lambda: sl.forward(key, mb, x, keep), job)
        nxt = pb.TrainBatchRequest(job=req.job, step=req.step, micro=req.micro, rows=req.rows, width=req.width,
                                   tokens=req.tokens, offsets=req.offsets, lengths=req.lengths, norm=req.norm,
                                   eval=req.eval, want_grad=keep, dtype=y.dtype, shape=list(y.shape),
                                   data=bytes(memoryview(y.data).cast("B")))
        hop = job.ring[job.index + 1]
        try:
            r = await self.links.stub(hop.address).TrainBatch(nxt, timeout=HOP_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            sl.kept.pop(key, None)
            raise TrainError(e.code(), why_stopped(e, job.where(job.index + 1))) from None
        except asyncio.CancelledError:  # the driver gave up on this micro-batch (its call was cancelled)
            sl.kept.pop(key, None)
            raise
        if not keep:
            return _reply(r.loss, r.tokens, None)
        g = _hidden(r.dtype, r.shape, r.data)
        gx = await self._compute(lambda: sl.backward(key, g, req.want_grad), job)
        return _reply(r.loss, r.tokens, gx)

    async def step(self, req: pb.TrainStepRequest) -> pb.TrainStepReply:
        """Apply one optimizer step with the gradients of the step's micro-batches."""
        job = self._job(req.job)
        if req.step != job.step + 1:
            raise TrainError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"{self.view.name} is at step {job.step}, asked for step {req.step}")
        await self._compute(job.slice.step, job)
        job.step = req.step
        self.progress = req.progress[:MAX_PROGRESS]
        spent, job.compute_s = job.compute_s, 0.0
        return pb.TrainStepReply(step=job.step, peak_bytes=job.slice.peak_bytes(), compute_s=spent,
                                 name=self.view.name)

    async def save(self, req: pb.TrainSaveRequest) -> pb.TrainSaveReply:
        """This stage's adapter and optimizer moments, for the driver's checkpoint."""
        job = self._job(req.job)
        state: dict[str, np.ndarray] = await self._compute(job.slice.state)
        return pb.TrainSaveReply(step=job.step, tensors=[
            pb.TrainTensor(name=n, shape=list(v.shape), data=np.ascontiguousarray(v, np.float32).tobytes())
            for n, v in sorted(state.items())])

    def close(self, job: str) -> None:
        if self.job is not None and self.job.job == job:
            self.job = None
            self.progress = ""


def why_stopped(e: grpc.aio.AioRpcError, where: str) -> str:
    """A failed training call in words: a stage's own account of a later one as it is, else what
    happened to `where` (the stage called)."""
    details = e.details() or ""
    if details.startswith("stage "):
        return details
    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"{where} is unreachable ({e.code().name})"
    return f"{where}: {details or e.code().name}"


def _array(t: pb.TrainTensor) -> np.ndarray:
    n = int(np.prod(t.shape)) if len(t.shape) else 1
    if len(t.data) != 4 * n or len(t.name) > 256:
        raise TrainError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"tensor {t.name[:80]!r}: {len(t.data)} bytes do not make float32{list(t.shape)}")
    return np.frombuffer(t.data, np.float32).reshape(tuple(t.shape))


def _hidden(dtype: str, shape: Any, data: bytes) -> Hidden:
    try:
        return Hidden(data, dtype, tuple(int(d) for d in shape))
    except WireError as e:
        raise TrainError(grpc.StatusCode.INVALID_ARGUMENT, f"bad hidden states: {e}") from None


def _micro_batch(req: pb.TrainBatchRequest, hidden: bool) -> tuple[MicroBatch, Hidden | None]:
    rows, width = req.rows, req.width
    if rows < 1 or width < 1 or len(req.tokens) != rows * (width + 1):
        raise TrainError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"a micro-batch of {rows} x {width} needs {rows * (width + 1)} tokens, got {len(req.tokens)}")
    try:
        mb = MicroBatch(np.asarray(req.tokens, np.int32).reshape(rows, width + 1),
                        np.asarray(req.offsets, np.int64), np.asarray(req.lengths, np.int64), req.norm)
    except TogetherError as e:
        raise TrainError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    return mb, _hidden(req.dtype, req.shape, req.data) if hidden else None


def _reply(loss: float, tokens: int, grad: Hidden | None) -> pb.TrainBatchReply:
    if grad is None:
        return pb.TrainBatchReply(loss=loss, tokens=tokens)
    return pb.TrainBatchReply(loss=loss, tokens=tokens, dtype=grad.dtype, shape=list(grad.shape),
                              data=bytes(memoryview(grad.data).cast("B")))
