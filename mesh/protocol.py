"""What peers say to each other beyond the generated stubs: the frame error, sampling parameters on
the wire, and the checks a message from another peer must pass before it is believed."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import grpc

from backends.sampling import SamplingParams
from mesh.auth import NODE_KEY
from protos import together_pb2 as pb

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]


class FrameError(Exception):
    """A frame this stage cannot run: `code` is the gRPC status the origin sees, `seqs` the sequences
    it fails (all of the frame's when empty). The peer itself stays up."""

    def __init__(self, code: grpc.StatusCode, message: str, seqs: list[str] | None = None):
        super().__init__(message)
        self.code, self.seqs = code, seqs or []


def params_to_pb(p: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(
        temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
        repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, penalty_context=p.penalty_context,
        has_seed=p.seed is not None, seed=p.seed or 0, logprobs=p.logprobs, grammar=p.grammar)


def params_from_pb(m: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=m.temperature, top_p=m.top_p or 1.0, top_k=m.top_k, min_p=m.min_p,
        repetition_penalty=m.repetition_penalty or 1.0, presence_penalty=m.presence_penalty,
        frequency_penalty=m.frequency_penalty, penalty_context=m.penalty_context or 64,
        seed=m.seed if m.has_seed else None, logprobs=m.logprobs, grammar=m.grammar)


def check_peer_info(info: pb.PeerInfo, num_layers: int) -> str | None:
    """Why a PeerInfo from the wire cannot be believed, or None."""
    if not info.node_id or len(info.node_id) > 64:
        return "missing or oversized node id"
    if not all(math.isfinite(x) for x in (info.layer_ms, info.head_ms, info.prefill_ms, info.started_at,
                                          info.tokens_per_s)):
        return "non-finite numbers"
    if len(info.dtype) > 32 or len(info.weight_format) > 64 or len(info.weights) > 256 or len(info.training) > 256:
        return "oversized dtype, weight format, weights or training progress"
    host, _, port = info.address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"bad address {info.address!r}"
    if (info.start, info.end) != (-1, -1) and not 0 <= info.start < info.end <= num_layers:
        return f"impossible layer range [{info.start}, {info.end})"
    if len(info.adapters) > 4096:
        return "oversized adapter list"
    if info.tp_group and (len(info.tp_group) > 64 or not 2 <= info.tp_size <= 64):
        return "a tensor-parallel group needs a short name and 2 to 64 peers"
    if len(info.links) > 256 or not all(len(ln.node_id) <= 64 and all(
            math.isfinite(x) and x >= 0 for x in (ln.rtt_ms, ln.mbps, ln.measured_at)) for ln in info.links):
        return "too many links or a link with a bad measurement"
    return None


def check_plan(plan: pb.Plan, num_layers: int) -> bool:
    """A pushed plan fits this model: its layer count, its ranges, and a coordinator among its peers."""
    return plan.num_layers == num_layers and all(0 <= st.start < st.end <= num_layers for st in plan.stages) \
        and any(p.node_id == plan.coordinator for p in plan.peers)


def caller_id(context: Context | None) -> str | None:
    """The node id a caller signed into its metadata (trusted only when a mesh key is set)."""
    if context is None:
        return None
    for k, v in context.invocation_metadata() or ():
        if k == NODE_KEY:
            return str(v)
    return None


def stage_list(plan: pb.Plan) -> list[tuple[str, int, int, tuple[str, ...]]]:
    """The ring's path in a plan: what decides whether frames under way may still come back."""
    return [(s.node_id, s.start, s.end, tuple(s.tp_members)) for s in plan.stages]
