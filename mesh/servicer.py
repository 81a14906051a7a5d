"""The gRPC face of a peer: every RPC of `together.proto` checks its caller and hands the request to
the role that owns it. Nothing here keeps state."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import grpc

from mesh.coordination import CoordinatorRole
from mesh.linkprobe import MAX_REPLY_BYTES, LinkProber
from mesh.membership import Membership
from mesh.origin import Origin
from mesh.protocol import FrameError, caller_id, check_peer_info, check_plan
from mesh.stage import Stage
from mesh.training import Trainer, TrainError
from mesh.view import PlanView
from mesh.weights import WeightServer
from protos import together_pb2 as pb
from protos import together_pb2_grpc as pbg

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]

log = logging.getLogger(__name__)


class Servicer(pbg.TogetherServicer):
    def __init__(self, mesh_key: str | None, num_layers: int, started_at: float, view: PlanView,
                 membership: Membership, coord: CoordinatorRole, stage: Stage, origin: Origin,
                 status: Callable[[], pb.StatusReply], prober: LinkProber | None = None,
                 weights: WeightServer | None = None, trainer: Trainer | None = None) -> None:
        self.mesh_key, self.num_layers, self.started_at, self.view = mesh_key, num_layers, started_at, view
        self.membership, self.coord, self.stage, self.origin = membership, coord, stage, origin
        self._status = status
        self.prober = prober
        self.weights = weights  # what this peer serves of its model and adapters (mesh/weights.py)
        self.trainer = trainer  # its part in a LoRA training job (mesh/training.py)

    # ---------------------------------------------------------------- the ring's streams

    async def Forward(self, request_iterator: AsyncIterator[pb.Frame], context: Context) -> None:
        # grpc.aio's reader/writer form: no acks are written, the stream ends when this returns; the
        # next frame is read while the ones before it compute and travel on (they stay in order)
        async for frame in request_iterator:
            if frame.origin:
                await self.stage.receive(frame)
                continue
            try:  # nobody to tell but the sender: a refusal ends its stream with the status
                await self.stage.handle_frame(frame)
            except FrameError as e:
                await context.abort(e.code, str(e))

    async def Deliver(self, request_iterator: AsyncIterator[pb.Result], context: Context) -> None:
        async for result in request_iterator:
            self.origin.deliver(result)

    async def Release(self, request: pb.ReleaseRequest, context: Context) -> pb.ReleaseReply:
        return pb.ReleaseReply(freed=await self.stage.release(list(request.seq_ids), list(request.keep)))

    # ---------------------------------------------------------------- membership

    async def Join(self, request: pb.JoinRequest, context: Context) -> pb.JoinReply:
        await self._check_info(request.peer, context)
        if not self.coord.active:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{self.view.name} is not the coordinator; ask {self.view.plan.coordinator}")
        return await self.coord.join(request)

    async def Leave(self, request: pb.LeaveRequest, context: Context) -> pb.Plan:
        await self._refuse_spoof(request.node_id, context)
        return await self.coord.leave(request.node_id)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Context) -> pb.HeartbeatReply:
        await self._check_info(request.peer, context)
        return await self.coord.heartbeat(request)

    async def Suspect(self, request: pb.SuspectRequest, context: Context) -> pb.Ack:
        if self.coord.active:  # the coordinator probes before it believes anyone
            self.membership.tasks.spawn(self.coord.suspect(request.node_id, request.reason[:200]))
        return pb.Ack()

    async def GetPlan(self, request: pb.PlanRequest, context: Context) -> pb.Plan:
        return self.view.plan

    async def PushPlan(self, request: pb.Plan, context: Context) -> pb.Ack:
        # only a coordinator speaks for its plan, and a plan must fit this model
        if self.mesh_key and caller_id(context) not in (request.coordinator, self.view.plan.coordinator):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "only a coordinator may push a plan")
        # a coordinator is pushed another model's plan when two coordinators meet
        other = self.coord.active and bool(request.model) and request.model != self.view.model
        if not check_plan(request, request.num_layers if other else self.num_layers):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a plan that does not fit this model")
        await self.membership.on_push(request, self.started_at)
        return pb.Ack()

    async def Status(self, request: pb.StatusRequest, context: Context) -> pb.StatusReply:
        return self._status()

    async def Probe(self, request: pb.ProbeRequest, context: Context) -> pb.ProbeReply:
        if self.prober is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this peer does not answer link probes")
        if request.reply_bytes > MAX_REPLY_BYTES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"a probe may ask for at most {MAX_REPLY_BYTES} bytes back, not {request.reply_bytes}")
        return await self.prober.answer(request)

    async def Manifest(self, request: pb.ManifestRequest, context: Context) -> pb.ManifestReply:
        if self.weights is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "this peer serves no weights")
        return await self.weights.Manifest(request, context)

    async def FetchWeights(self, request: pb.FetchRequest, context: Context) -> AsyncIterator[pb.WeightChunk]:
        if self.weights is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "this peer serves no weights")
        async for chunk in self.weights.FetchWeights(request, context):
            yield chunk

    # ---------------------------------------------------------------- LoRA training (mesh/training.py)

    async def TrainOpen(self, request: pb.TrainOpenRequest, context: Context) -> pb.TrainOpenReply:
        return await self._train(context, lambda t: t.open(request))

    async def TrainBatch(self, request: pb.TrainBatchRequest, context: Context) -> pb.TrainBatchReply:
        return await self._train(context, lambda t: t.batch(request))

    async def TrainStep(self, request: pb.TrainStepRequest, context: Context) -> pb.TrainStepReply:
        return await self._train(context, lambda t: t.step(request))

    async def TrainSave(self, request: pb.TrainSaveRequest, context: Context) -> pb.TrainSaveReply:
        return await self._train(context, lambda t: t.save(request))

    async def TrainClose(self, request: pb.TrainCloseRequest, context: Context) -> pb.Ack:
        if self.trainer is not None:
            self.trainer.close(request.job)
        return pb.Ack()

    async def _train(self, context: Context, call: Callable[[Trainer], Any]) -> Any:
        if self.trainer is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this peer does not train")
        try:
            return await call(self.trainer)
        except TrainError as e:
            await context.abort(e.code, str(e))

    # ---------------------------------------------------------------- checks

    async def _refuse_spoof(self, info_id: str, context: Context) -> None:
        """With a mesh key, a peer may only speak for itself."""
        who = caller_id(context)
        if self.mesh_key and who != info_id:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"a peer may only join, report or leave for itself (signed as {who!r})")

    async def _check_info(self, info: pb.PeerInfo, context: Context) -> None:
        # a peer of another model's ring (several models in one mesh): checked against its own model's size
        other = bool(info.model) and info.model != self.view.model and info.num_layers > 0
        why = check_peer_info(info, info.num_layers if other else self.num_layers)
        if why is not None:
            log.warning("refused a peer report from %s: %s", context.peer(), why)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad peer info: {why}")
        await self._refuse_spoof(info.node_id, context)
