"""Structured output: grammars (JSON schema, regex, Lark) enforced token by token on the last stage.

Built on llguidance: it computes the allowed-token mask lazily from the grammar's current state
(tens of microseconds per token over a 49k vocabulary, no precomputation per schema), compiles
JSON schemas, regexes and Lark grammars (with %json{...} embedded), and rolls back for speculation.
A grammar travels as a string (llguidance's serialized grammar) inside the sampling parameters;
the API peer checks that it compiles (`check_grammar`) so a bad schema is a 400 before anything
reaches the ring, and the last stage keeps one `Constraint` (a matcher) per constrained sequence.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from backends.errors import RequestError

if TYPE_CHECKING:
    from backends.tokenizer import Tokenizer
    from backends.weights import Checkpoint

# compact but readable JSON, and no free whitespace: a sampled model cannot wander off into
# endless newlines between tokens that the schema allows anywhere
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(RequestError):
    """A grammar or schema the library cannot compile; the message names the problem (an API 400)."""


def _llg() -> Any:
    try:
        import llguidance
    except ImportError:  # a runtime dependency; only a broken install lacks it
        raise GrammarError("structured output needs llguidance: pip install 'llguidance>=1.0,<2'") from None
    return llguidance


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
    return json_schema_grammar({"type": "object"})


def json_schema_grammar(schema: dict, strict: bool = True) -> str:
    """A grammar for JSON matching `schema`. strict=False ignores keywords the compiler does not
    implement (OpenAI's strict=false); strict=True refuses them. The schema itself is checked here
    too (unknown types, formats, dangling $refs): GrammarError names the problem."""
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    llg = _llg()
    options = dict(_JSON_OPTIONS, lenient=not strict)
    try:
        grammar = str(llg.LLMatcher.grammar_from_json_schema(schema, defaults=options))
    except (ValueError, TypeError) as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None
    _validate(grammar, "JSON schema")
    return grammar


def regex_grammar(pattern: str) -> str:
    """Text matching the regular expression (Rust regex syntax: no look-around, no backreferences)."""
    if not isinstance(pattern, str) or not pattern:
        raise GrammarError("a regex grammar needs a non-empty pattern string")
    grammar = str(_llg().LLMatcher.grammar_from_regex(pattern))
    _validate(grammar, "regex")
    return grammar


def lark_grammar(text: str) -> str:
    """An llguidance Lark grammar (`start: ...`; %json{...} embeds a JSON schema)."""
    if not isinstance(text, str) or not text.strip():
        raise GrammarError("a Lark grammar needs non-empty text with a `start` rule")
    grammar = str(_llg().LLMatcher.grammar_from_lark(text))
    _validate(grammar, "Lark grammar")
    return grammar


def response_format_grammar(rf: dict | None) -> str:
    """The grammar an OpenAI chat `response_format` asks for ("" for none or text); also our
    extensions {"type": "regex", "regex": ...} and {"type": "grammar", "grammar": "<lark>"}."""
    if rf is None:
        return ""
    if not isinstance(rf, dict):
        raise GrammarError("response_format must be an object such as {\"type\": \"json_object\"}")
    kind = rf.get("type")
    if kind in (None, "text"):
        return ""
    if kind == "json_object":
        return json_object_grammar()
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise GrammarError("response_format json_schema needs a \"json_schema\" object with a "
                               "\"schema\" (and a \"name\")")
        schema = js.get("schema")
        if schema is None:
            schema = {"type": "object"}  # OpenAI accepts a json_schema without one: any object
        strict = js.get("strict")
        return json_schema_grammar(schema, strict=True if strict is None else bool(strict))
    if kind == "regex":
        return regex_grammar(rf.get("regex") or rf.get("pattern") or "")
    if kind == "grammar":
        return lark_grammar(rf.get("grammar") or "")
    raise GrammarError(f"unknown response_format type {kind!r}: expected text, json_object, json_schema, "
                       f"regex or grammar")


def _validate(grammar: str, what: str, tok: Any = None) -> None:
    err = str(_llg().LLMatcher.validate_grammar(grammar, tok))
    if err:
        raise GrammarError(f"cannot compile this {what}: {err.strip()}")


# ---- tokenizers: llguidance's view of the model's vocabulary, built once per model (~0.3 s)

_LOCK = threading.Lock()
_BY_TOKENIZER: "weakref.WeakKeyDictionary[Tokenizer, dict[int, Any]]" = weakref.WeakKeyDictionary()
_BY_MODEL: dict[tuple[str, int], tuple[Any, "Tokenizer"]] = {}
# per tokenizer: grammar -> its compile error ("" when it compiles), the most recent 256
_CHECKED: "weakref.WeakKeyDictionary[Tokenizer, OrderedDict[str, str]]" = weakref.WeakKeyDictionary()


def ll_tokenizer(tok: "Tokenizer", n_vocab: int | None = None) -> Any:
    """llguidance's tokenizer for `tok`, whose EOS tokens are the model's stop ids; `n_vocab`: the
    model's vocabulary (embedding rows), which may exceed the tokenizer's (padding rows)."""
    n = max(int(n_vocab or 0), len(tok.hf))
    with _LOCK:
        per = _BY_TOKENIZER.setdefault(tok, {})
        if n not in per:
            import llguidance.hf

            try:
                per[n] = llguidance.hf.from_tokenizer(tok.hf, n_vocab=n, eos_token=sorted(tok.eos_ids))
            except Exception as e:  # a slow (Python) tokenizer, or one the Rust side cannot read
                raise GrammarError(f"structured output is not available for this model's tokenizer: {e}") \
                    from None
        return per[n]


def check_grammar(grammar: str, tokenizer: "Tokenizer") -> None:
    """Compile `grammar` against the model's tokenizer (the API peer, before submitting): a grammar
    that cannot run is a GrammarError here, not a failure on the last stage. Results are cached."""
    if not grammar:
        return
    with _LOCK:
        seen = _CHECKED.setdefault(tokenizer, OrderedDict())
        err = seen.get(grammar)
    if err is None:
        err = str(_llg().LLMatcher.validate_grammar(grammar, ll_tokenizer(tokenizer)))
        with _LOCK:
            seen[grammar] = err
            while len(seen) > 256:
                seen.popitem(last=False)
    if err:
        raise GrammarError(f"cannot compile the grammar: {err.strip()}")


def model_ll_tokenizer(ck: "Checkpoint") -> Any:
    """The last stage's llguidance tokenizer, loaded from the checkpoint on the first constrained
    sequence (a peer serving only plain requests never loads a tokenizer)."""
    key = (str(ck.path), int(ck.config.vocab_size))
    with _LOCK:
        hit = _BY_MODEL.get(key)
    if hit is None:
        from backends.tokenizer import Tokenizer

        tok = Tokenizer.from_checkpoint(ck)
        hit = (ll_tokenizer(tok, ck.config.vocab_size), tok)  # keep tok alive: the cache is weak
        with _LOCK:
            _BY_MODEL[key] = hit
    return hit[0]


# ---- the last stage's side: one matcher per constrained sequence


class Constraint:
    """A sequence's grammar state on the last stage: the allowed tokens at its next position, moved on
    by each token it accepts. Masks are boolean vectors over the model's vocabulary (rows past the
    tokenizer's are never allowed); once the grammar is complete only the stop tokens are."""

    def __init__(self, grammar: str, ll_tok: Any, vocab: int):
        llg = _llg()
        self.vocab = vocab
        self.matcher = llg.LLMatcher(ll_tok, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"cannot compile the grammar: {self.matcher.get_error()}")
        self._bits = np.zeros((int(ll_tok.vocab_size) + 31) // 32, dtype=np.int32)
        self.eos = np.zeros(vocab, dtype=bool)
        self.eos[[t for t in ll_tok.eos_tokens if t < vocab]] = True

    def mask(self) -> np.ndarray:
        """Which tokens may come next (bool, (vocab,))."""
        m = self.matcher
        if m.is_stopped():  # complete (or broken): only the end may follow
            return self.eos
        m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little").view(bool)
        if allowed.shape[0] >= self.vocab:
            return allowed[:self.vocab]
        out = np.zeros(self.vocab, dtype=bool)
        out[:allowed.shape[0]] = allowed
        return out

    def masks(self, drafts: Sequence[int]) -> list[np.ndarray]:
        """The masks at the 1 + k positions of a chunk verifying k drafts: position j's after the
        drafts before it. Drafts the grammar refuses end the list early (no draw past a refused draft
        can be accepted), so it may hold fewer than 1 + k; the state is left as it was."""
        out = [self.mask()]
        taken = 0
        for t in drafts:  # a refused token would break the matcher for good: ask its mask first
            if self.matcher.is_stopped() or not 0 <= t < self.vocab or not out[-1][t] \
                    or not self.matcher.consume_token(int(t)):
                break
            taken += 1
            out.append(self.mask())
        if taken:
            self.matcher.rollback(taken)
        if self.matcher.is_error():
            raise GrammarError(f"grammar state lost while verifying drafts: {self.matcher.get_error()}")
        return out

    def consume(self, tokens: Sequence[int]) -> None:
        """Move on past accepted tokens (a stop token once the grammar is complete is fine)."""
        for t in tokens:
            if self.matcher.is_stopped():
                return
            if not self.matcher.consume_token(int(t)):
                raise GrammarError(f"token {int(t)} breaks the grammar: {self.matcher.get_error()}")


def new_constraint(grammar: str, ck: "Checkpoint", generated: Sequence[int] = ()) -> Constraint:
    """A matcher for a sequence arriving at the last stage; a replay (`generated`: the output it had
    produced before a loss) consumes its output so the grammar stands where the sequence stands."""
    c = Constraint(grammar, model_ll_tokenizer(ck), int(ck.config.vocab_size))
    if generated:
        c.consume(generated)
    return c

