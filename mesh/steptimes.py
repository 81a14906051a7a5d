"""The API peer's step times: the wall time of frames around the ring (the page's percentiles, one
stream's decode speed, the hop overhead) and the deadline they give a frame before it counts as lost."""

from __future__ import annotations

from typing import TYPE_CHECKING

from protos import together_pb2 as pb

if TYPE_CHECKING:
    from mesh.scheduler import Ring

FRAME_TIMEOUT_FLOOR_S = 10.0  # a lost frame is noticed after this, or a few step times if longer
PREFILL_GUESS_S = 0.02  # seconds per prefill token until one is measured (generous: no false timeouts)


class StepTimes:
    """Recent step times of one API peer's frames (the totals live in the peer's metrics)."""

    def __init__(self, node: Ring, floor: float = FRAME_TIMEOUT_FLOOR_S) -> None:
        self.node, self.metrics, self.floor = node, node.metrics, floor
        self.step_ms: list[float] = []  # wall time of each frame around the ring
        self.decode_ms: list[float] = []  # ... of one-token frames alone in the ring: one stream's decode step
        self.hop_overhead_ms: list[float] = []
        self.s_per_token: float | None = None  # measured prefill time per token

    def deadline(self, tokens: int) -> float:
        """How long a frame of `tokens` may take before it counts as lost: a few recent step times
        (with a floor), plus a few times the measured prefill time of its tokens."""
        recent = sorted(self.step_ms[-32:])
        step = recent[len(recent) // 2] / 1000 if recent else 0.0
        per_token = self.s_per_token if self.s_per_token is not None else self.prefill_guess()
        return max(self.floor, 4 * step) + 4 * tokens * per_token

    def prefill_guess(self) -> float:
        """Seconds per prompt token before one is measured: the ring's measured decode step (each
        peer's layer time over its stage, plus the head), which bounds a prompt token's share of a
        chunk, so a slow ring (MLX on a CPU) does not time out its first prompt."""
        plan = self.node.plan
        peers = {p.node_id: p for p in plan.peers}
        step_ms = sum((st.end - st.start) * peers[st.node_id].layer_ms for st in plan.stages
                      if st.node_id in peers)
        if plan.stages and plan.stages[-1].node_id in peers:
            step_ms += peers[plan.stages[-1].node_id].head_ms
        return max(PREFILL_GUESS_S, step_ms / 1000)

    def record(self, result: pb.Result, wall: float, tokens: int, clean: bool) -> None:
        """A frame of `tokens` came back after `wall` ms (`clean`: no other frame shared the ring)."""
        if tokens >= 32:  # a prefill: its time per token sizes the next long frame's deadline
            rate = wall / 1000 / tokens
            self.s_per_token = rate if self.s_per_token is None else 0.7 * self.s_per_token + 0.3 * rate
        if tokens == 1 and result.hop_ms and clean:
            # what the ring adds on top of compute, per network hop, for one-token frames
            stages = self.node.plan.stages
            hops = len(result.hop_ms) - (1 if stages and stages[0].node_id == self.node.node_id else 0)
            hops += 0 if stages and stages[-1].node_id == self.node.node_id else 1
            if hops > 0:
                overhead = (wall - sum(result.hop_ms)) / hops
                self.metrics.hop_overhead_seconds.observe(overhead / 1000)
                self.hop_overhead_ms.append(overhead)
                del self.hop_overhead_ms[:-1024]
            self.decode_ms.append(wall)
            del self.decode_ms[:-64]
        self.metrics.steps.inc()
        self.metrics.step_seconds.observe(wall / 1000)
        self.step_ms.append(wall)
        del self.step_ms[:-1024]
