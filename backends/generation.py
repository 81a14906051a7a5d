"""Per-request bookkeeping shared by the in-process pipeline and the mesh scheduler:
streaming text, stop strings, EOS, max tokens and finish reasons."""

from __future__ import annotations

from dataclasses import dataclass, field

from backends.errors import RequestError
from backends.sampling import SamplingParams
from backends.shard import Sample
from backends.tokenizer import Tokenizer


@dataclass
class Delta:
    """What one sampled token adds to the answer."""

    text: str
    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


def check_prompt(n_tokens: int, context: int) -> None:
    """Refuse a prompt that leaves no room to generate."""
    if n_tokens == 0:
        raise RequestError("the prompt is empty")
    if n_tokens >= context:
        raise RequestError(f"the prompt is {n_tokens} tokens but the model's context is "
                           f"{context} tokens; shorten it")


class Generation:
    """One sequence being generated: feed it samples, read text deltas and the finish reason."""

    def __init__(self, seq_id: str, prompt: list[int], params: SamplingParams, tok: Tokenizer,
                 context: int):
        check_prompt(len(prompt), context)
        self.seq_id, self.prompt, self.params, self.tok = seq_id, list(prompt), params, tok
        self.max_new = min(params.max_tokens, context - len(prompt))
        self.tokens: list[int] = []
        self.text = ""  # text released to the client so far
        self._pending = ""  # decoded but held back: it may be the start of a stop string
        self._stream = tok.stream()
        self.finish_reason: str | None = None
        self._stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else tok.eos_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt + self.tokens

    def add(self, s: Sample) -> Delta:
        """Account for one sampled token; returns the text it releases (may be empty)."""
        assert not self.finished, "sequence already finished"
        self.tokens.append(s.token)
        if s.token in self._stop_ids:
            self.finish_reason = "stop"
            return Delta(self._release(self._pending + self._stream.flush(), final=True), s.token,
                         s.logprob, s.top_logprobs)
        piece = self._pending + self._stream.push(s.token)
        self._pending = ""
        out = self._check_stop(piece)
        if not self.finished and len(self.tokens) >= self.max_new:
            self.finish_reason = "length"
            out += self._release(self._pending + self._stream.flush(), final=True)
        return Delta(out, s.token, s.logprob, s.top_logprobs)

    def _check_stop(self, piece: str) -> str:
        stops = self.params.stop
        if not stops:
            return self._release(piece, final=False)
        window = self.text[-max(map(len, stops)):] + piece
        base = len(window) - len(piece)
        for st in stops:
            i = window.find(st)
            if i != -1 and i + len(st) > base:
                self.finish_reason = "stop"
                return self._release(window[base:max(i, base)], final=True)
        # hold back the longest tail that is a prefix of some stop string
        hold = 0
        for st in stops:
            for n in range(min(len(st) - 1, len(window)), 0, -1):
                if window.endswith(st[:n]):
                    hold = max(hold, n)
                    break
        hold = min(hold, len(piece))
        self._pending = piece[len(piece) - hold:] if hold else ""
        return self._release(piece[:len(piece) - hold], final=False)

    def _release(self, text: str, final: bool) -> str:
        if final:
            self._pending = ""
        self.text += text
        return text
