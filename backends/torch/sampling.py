"""Samplers for the torch backend, built from SamplingParams by a factory."""

from __future__ import annotations

from typing import Callable

import torch

from backends.sampling import SamplingParams
from backends.shard import SeqState, token_seed

# (logits (vocab,) float32, state, allowed tokens (bool (vocab,)) or None) -> (token, logprob, top_logprobs)
Sampler = Callable[[torch.Tensor, SeqState, "torch.Tensor | None"], tuple[int, float, list[tuple[int, float]]]]


def make_generator(params: SamplingParams, device: str | torch.device = "cpu",
                   position: int = 0) -> torch.Generator:
    """The RNG of one draw: for a seeded sequence, a function of (seed, position) of the token drawn,
    so a replay draws the same numbers; else a per-sequence stream from fresh entropy."""
    g = torch.Generator(device=device)
    if params.seed is not None:
        g.manual_seed(token_seed(params.seed, position))
    else:
        g.seed()
    return g


def make_penalties(params: SamplingParams) -> Callable[[torch.Tensor, list[int]], torch.Tensor] | None:
    """HF multiplicative repetition penalty and OpenAI additive presence/frequency penalties over
    the last `penalty_context` tokens of the history; None when all are off."""
    if not params.penalised:
        return None
    rep, pres, freq, n = (params.repetition_penalty, params.presence_penalty,
                          params.frequency_penalty, params.penalty_context)

    def apply(logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        ctx = history[-n:] if n > 0 else []
        if not ctx:
            return logits
        ids = torch.tensor(ctx, dtype=torch.long, device=logits.device)
        logits = logits.clone()
        if rep != 1.0:
            u = ids.unique()
            s = logits[u]
            logits[u] = torch.where(s < 0, s * rep, s / rep)
        if pres or freq:
            counts = torch.bincount(ids, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
            logits -= freq * counts + pres * (counts > 0).to(logits.dtype)
        return logits

    return apply


def make_filter(params: SamplingParams) -> Callable[[torch.Tensor], torch.Tensor]:
    """Temperature, then top-k, top-p and min-p (HF's warper order); returns filtered logits."""
    t, k, p, mp = params.temperature, params.top_k, params.top_p, params.min_p

    def apply(logits: torch.Tensor) -> torch.Tensor:
        logits = logits / t
        if 0 < k < logits.shape[-1]:
            kth = torch.topk(logits, k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p < 1.0:
            sl, si = torch.sort(logits, descending=False)
            cum = sl.softmax(-1).cumsum(-1)
            drop = cum <= (1 - p)
            drop[-1] = False  # keep at least the most likely token
            logits = logits.masked_fill(drop.scatter(0, si, drop), float("-inf"))
        if mp > 0.0:
            probs = logits.softmax(-1)
            logits = logits.masked_fill(probs < mp * probs.max(), float("-inf"))
        return logits

    return apply


def argmax(logits: torch.Tensor) -> int:
    """torch's argmax of a 1-D tensor (the first maximal index; a NaN counts as maximal), by numpy's on a
    CPU: torch's CPU argmax does not vectorize, ~90 us over a 49152-token vocabulary against numpy's ~5 us
    (~0.7 ms of an 8-row decode step, perf/bench_torch_batch.py --profile 8)."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float16) and not logits.requires_grad:
        return int(logits.numpy().argmax())
    return int(logits.argmax())


def make_sampler(params: SamplingParams) -> Sampler:
    """Greedy when temperature is 0, else seeded multinomial sampling (RNG in `state.rng`); a mask
    (structured output) removes the tokens the grammar forbids after the penalties, before the
    temperature and filters. Log-probabilities are those of the raw logits, before all of that."""
    penalise = make_penalties(params)
    filt = None if params.greedy else make_filter(params)
    n_top = params.logprobs

    def sample(logits: torch.Tensor, st: SeqState, allowed: torch.Tensor | None = None
               ) -> tuple[int, float, list[tuple[int, float]]]:
        logits = logits.float()
        raw = logits
        if penalise is not None:
            logits = penalise(logits, st.history)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        if filt is None:
            tok = argmax(logits)
        else:
            probs = filt(logits).softmax(-1)
            gen = st.rng if isinstance(st.rng, torch.Generator) else None
            tok = int(torch.multinomial(probs, 1, generator=gen))
        lp = raw.log_softmax(-1)
        top: list[tuple[int, float]] = []
        if n_top > 0:
            v, i = lp.topk(n_top)
            top = list(zip(i.tolist(), v.tolist()))
        return tok, float(lp[tok]), top

    return sample
