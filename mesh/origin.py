"""What an API peer does in the ring: it numbers frames, sends them to stage 0, and waits for the last
stage to deliver their tokens (a Result per frame, over its Deliver stream)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from typing import Sequence

import grpc

from mesh import trace
from mesh.links import Peers
from mesh.protocol import FrameError
from mesh.stage import Stage
from mesh.tasks import TaskSet
from mesh.view import PlanView
from protos import together_pb2 as pb

log = logging.getLogger(__name__)
RELEASE_RETRY_S, RELEASE_RETRY_MAX_S = 0.5, 10.0  # a lost Release is asked again, backing off


class Origin:
    def __init__(self, view: PlanView, stage: Stage, links: Peers, tasks: TaskSet) -> None:
        self.view, self.stage, self.links, self.tasks = view, stage, links, tasks
        self.pending: dict[int, asyncio.Future[pb.Result]] = {}  # frame id -> its Result, once delivered
        # random high bits: ids from an earlier run of this peer never match a frame of this one
        self._frame_ids = itertools.count(int.from_bytes(os.urandom(4), "little") << 20)

    def new_frame_id(self) -> int:
        return next(self._frame_ids)

    async def run_frame(self, frame: pb.Frame, timeout: float = 120.0) -> pb.Result:
        """Send a frame into the ring at stage 0 and wait for its tokens."""
        plan = self.view.plan
        if not plan.complete:
            raise FrameError(grpc.StatusCode.UNAVAILABLE, f"the ring is incomplete: {plan.missing}")
        frame.epoch, frame.origin = plan.epoch, self.view.address
        fut: asyncio.Future[pb.Result] = asyncio.get_running_loop().create_future()
        self.pending[frame.frame_id] = fut
        try:
            addr, _ = self.view.stage_of(0)
            self.tasks.spawn(self.stage.send_frame(addr, frame))  # stage 0 here: its compute is queued now
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise FrameError(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"the ring did not answer within {timeout:.0f} s") from None
        finally:
            self.pending.pop(frame.frame_id, None)

    def deliver(self, result: pb.Result) -> None:
        """A Result came back (from the last stage, or a failure from any stage)."""
        if trace.ON:
            trace.mark("deliver", result.frame_id)
        fut = self.pending.pop(result.frame_id, None)
        if fut is not None and not fut.done():
            fut.set_result(result)

    def ring_changed(self) -> None:
        """Frames on the old path may never come back: fail them now, their sequences are replayed."""
        for fid, fut in list(self.pending.items()):
            if not fut.done():
                fut.set_result(pb.Result(frame_id=fid, error="the ring changed (a peer left or joined)",
                                         error_code=grpc.StatusCode.UNAVAILABLE.value[0]))

    async def release(self, seq_ids: list[str], keep: Sequence[pb.KeepSeq] = ()) -> int:
        """Free these sequences' caches on every stage (each first keeps the complete blocks of `keep`'s
        tokens in its prefix cache); how many the stages that answered held. A stage that did not
        answer is asked again in the background until it acknowledges (or leaves the plan); one that
        never hears frees them when their lease runs out."""
        stages = [st.node_id for st in self.view.plan.stages]
        out = await asyncio.gather(*(self._release_at(n, seq_ids, keep) for n in stages), return_exceptions=True)
        for node_id, r in zip(stages, out):
            if isinstance(r, grpc.aio.AioRpcError):
                self.tasks.spawn(self._retry_release(node_id, seq_ids, r))
        return sum(n for n in out if isinstance(n, int))

    async def _release_at(self, node_id: str, seq_ids: list[str], keep: Sequence[pb.KeepSeq] = ()) -> int:
        if node_id == self.view.node_id:
            return await (self.stage.release(seq_ids, keep) if keep else self.stage.release(seq_ids))
        p = self.view.known.get(node_id)
        if p is None:
            return 0
        reply = await self.links.stub(p.address).Release(pb.ReleaseRequest(seq_ids=seq_ids, keep=keep), timeout=5)
        return int(reply.freed)

    async def _retry_release(self, node_id: str, seq_ids: list[str], e: grpc.aio.AioRpcError) -> None:
        delay = RELEASE_RETRY_S
        while any(st.node_id == node_id for st in self.view.plan.stages):  # gone from the ring: caches too
            log.info("release of %d sequence(s) at %s failed (%s); retrying in %.1f s",
                     len(seq_ids), node_id[:8], e.code().name, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RELEASE_RETRY_MAX_S)
            try:
                await self._release_at(node_id, seq_ids)
                return
            except grpc.aio.AioRpcError as again:
                e = again
