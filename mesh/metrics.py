"""A peer's Prometheus metrics: one registry per peer, real counters and histograms."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds: a ring step or a stage's compute ranges from ~0.1 ms (tiny models) to seconds (long prefill)
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, float("inf"))
# seconds: a recovery waits for detection (~3 s) and a reload; the scheduler gives up after 30 s
_RECOVERY_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, float("inf"))


class PeerMetrics:
    """Everything one peer exports on /metrics. Several peers may live in one process (tests), so
    each owns its registry instead of using prometheus_client's global one."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # the API peer's scheduler
        self.requests = Counter("together_requests", "Requests admitted by this API peer.", registry=r)
        self.tokens = Counter("together_tokens_generated",
                              "Tokens generated for this API peer's requests (one per sampled token).",
                              registry=r)
        self.errors = Counter("together_request_errors", "Sequences that failed.", registry=r)
        self.steps = Counter("together_ring_steps", "Frames this API peer sent around the ring.", registry=r)
        self.step_seconds = Histogram("together_step_seconds", "Wall time of a ring step seen by the API peer.",
                                      buckets=_BUCKETS, registry=r)
        self.hop_overhead_seconds = Histogram(
            "together_hop_overhead_seconds", "Time a network hop adds to a one-sequence decode frame.",
            buckets=_BUCKETS, registry=r)
        self.first_token_seconds = Histogram(
            "together_first_token_seconds", "Time from a request's admission to its first token.",
            buckets=_BUCKETS, registry=r)
        self.recovery_seconds = Histogram(
            "together_recovery_seconds", "Time a sequence stalled by a lost stage waited to resume.",
            buckets=_RECOVERY_BUCKETS, registry=r)
        # speculative decoding (mesh/drafting.py): drafts this API peer sent, and those the ring accepted
        self.spec_drafted = Counter("together_spec_drafted_tokens",
                                    "Drafted tokens this API peer sent around the ring to be verified.", registry=r)
        self.spec_accepted = Counter("together_spec_accepted_tokens",
                                     "Drafted tokens the last stage accepted (each one a ring trip saved).",
                                     registry=r)
        # this peer's stage
        self.stage_tokens = Counter("together_stage_tokens",
                                    "Tokens sampled by this peer's stage (last stage only).", registry=r)
        self.stage_compute_seconds = Histogram(
            "together_stage_compute_seconds", "Compute time of this peer's stage per frame.",
            buckets=_BUCKETS, registry=r)
        # weights from peers (mesh/weights.py)
        self.weight_bytes_sent = Counter("together_weight_bytes_sent",
                                         "Bytes of model and adapter files this peer sent to peers.", registry=r)
        self.weight_bytes_received = Counter("together_weight_bytes_received",
                                             "Bytes of model and adapter files this peer received from peers.",
                                             registry=r)
        self._gauges: dict[str, Gauge] = {}

    def gauge(self, name: str, help_: str, read: Callable[[], float]) -> None:
        """A gauge read at scrape time (queue depth, cache bytes, plan epoch...)."""
        g = self._gauges.get(name)
        if g is None:
            g = self._gauges[name] = Gauge(f"together_{name}", help_, registry=self.registry)
        g.set_function(read)

    @staticmethod
    def count(counter: Counter) -> int:
        """A counter's total so far. Reads this one counter only: a registry-wide lookup would also
        call every gauge's read function."""
        return int(next(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total")))

    def render(self) -> bytes:
        """The Prometheus text exposition of this peer's registry."""
        return generate_latest(self.registry)
