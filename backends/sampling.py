"""Backend-neutral sampling parameters; each backend turns them into a sampler with a factory."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from backends.errors import RequestError


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off (multiplicative, as in HF / mlx-lm)
    presence_penalty: float = 0.0  # additive, OpenAI semantics
    frequency_penalty: float = 0.0
    penalty_context: int = 64  # how many recent tokens the penalties look at
    seed: int | None = None
    logprobs: int = -1  # -1 = none; 0 = the chosen token's only; k = plus top-k alternatives
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # structured output: an llguidance grammar (backends/constrain.py) the last stage enforces
    grammar: str = ""

    def validate(self) -> "SamplingParams":
        if not (self.temperature >= 0):
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if not (0 <= self.min_p < 1):
            raise RequestError(f"min_p must be in [0, 1), got {self.min_p}")
        if not (self.repetition_penalty > 0):
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2 <= getattr(self, name) <= 2):
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (-1 <= self.logprobs <= 20):
            raise RequestError(f"top_logprobs must be in [0, 20], got {self.logprobs}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)
