"""Per-sequence samplers for the MLX backend, built from mlx_lm.sample_utils.

Unlike mlx_lm's samplers, the random stream is a key kept in the sequence's `SeqState.rng`: for a
seeded sequence the shard derives it from (seed, position) before each draw, so seeded sampling is
reproducible per sequence whatever else shares the batch, and a replayed sequence draws the same
numbers; an unseeded one splits its key every step.
"""

from __future__ import annotations

import secrets
from typing import Callable, NamedTuple

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from backends.sampling import SamplingParams
from backends.shard import SeqState, token_seed


class Drawn(NamedTuple):
    """Lazy results of one sampling step; evaluate them together, then read them out."""

    token: mx.array  # (1,) uint32
    logprob: mx.array  # (1,) float32: log-softmax of the raw logits at `token`
    top_ids: mx.array | None  # (1, k) candidate ids, best first
    top_logprobs: mx.array | None  # (1, k)


# (logits (1, vocab), state, the token drawn just before if it is not in state.history yet,
#  the tokens a grammar allows (bool (vocab,)) or None)
Sampler = Callable[[mx.array, SeqState, "mx.array | None", "mx.array | None"], Drawn]


def new_key(seed: int | None, position: int = 0) -> mx.array:
    """A PRNG key: of the draw at `position` of a seeded sequence, else a fresh one from the OS."""
    return mx.random.key(token_seed(seed, position) if seed is not None else secrets.randbits(63))


def make_sampler(params: SamplingParams) -> Sampler:
    """A callable (logits (1, vocab), state, pending) -> Drawn; logits may be float16 as the model
    gives them; `pending` (lazy, (1,)) is a token drawn before but not yet in `state.history` (a step
    computed ahead), which the penalties count as its last entry; `allowed` (structured output)
    removes the tokens a grammar forbids after the penalties."""
    processors = make_logits_processors(
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        repetition_context_size=params.penalty_context,
        presence_penalty=params.presence_penalty or None,
        presence_context_size=params.penalty_context,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=params.penalty_context,
    )
    filters = []
    if 0 < params.top_p < 1.0:
        filters.append(lambda lp: apply_top_p(lp, params.top_p))
    if params.min_p > 0.0:
        filters.append(lambda lp: apply_min_p(lp, params.min_p))
    if params.top_k > 0:
        filters.append(lambda lp: apply_top_k(lp, params.top_k))
    temp, k = params.temperature, params.logprobs

    def sample(logits: mx.array, st: SeqState, pending: mx.array | None = None,
               allowed: mx.array | None = None) -> Drawn:
        raw = logits
        if processors and (st.history or pending is not None):
            logits = mx.array(logits)  # mlx_lm's penalties assign in place; keep `raw` raw
            tokens = _context(st.history, pending, params.penalty_context)
            for proc in processors:
                logits = proc(tokens, logits)
        if allowed is not None:
            logits = mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))
        # the same arithmetic as mlx_lm.generate_step, so greedy picks are bit-identical
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        if temp == 0:
            token = mx.argmax(logprobs, axis=-1)
        else:
            rng = st.rng if isinstance(st.rng, mx.array) else new_key(params.seed)
            keys = mx.random.split(rng)
            st.rng, sub = keys[0], keys[1]
            for f in filters:
                logprobs = f(logprobs)
            token = mx.random.categorical(logprobs * (1.0 / temp), key=sub)
        raw = raw.astype(mx.float32)
        raw = raw - mx.logsumexp(raw, axis=-1, keepdims=True)
        lp = mx.take_along_axis(raw, token[:, None].astype(mx.int32), axis=-1)[:, 0]
        top_ids = top_lp = None
        if k > 0:
            kk = min(k, raw.shape[-1])
            top_ids = mx.argpartition(-raw, kth=kk - 1, axis=-1)[:, :kk]
            top_lp = mx.take_along_axis(raw, top_ids, axis=-1)
            order = mx.argsort(-top_lp, axis=-1)
            top_ids = mx.take_along_axis(top_ids, order, axis=-1)
            top_lp = mx.take_along_axis(top_lp, order, axis=-1)
        return Drawn(token, lp, top_ids, top_lp)

    return sample


def _context(history: list[int], pending: mx.array | None, n: int) -> mx.array:
    """The last n tokens of history (+ pending), as the penalties see them."""
    if pending is None:
        return mx.array(history[-n:], dtype=mx.int32)
    head = history[-(n - 1):] if n > 1 else []
    return mx.concatenate([mx.array(head, dtype=mx.int32), pending.astype(mx.int32)])
