"""Tokenizer and chat template from the model (tokenizer.json, tokenizer.model, or a GGUF's vocab)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Sequence

from backends.errors import ModelError, RequestError
from backends.models import cache_dir
from backends.weights import Checkpoint

log = logging.getLogger(__name__)


def _quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", module="transformers")


class Tokenizer:
    """Wraps a transformers tokenizer: encode, chat template, EOS ids, streaming decode."""

    def __init__(self, hf_tokenizer, eos_ids: set[int]):
        self.hf = hf_tokenizer
        self.eos_ids = eos_ids

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint) -> "Tokenizer":
        _quiet_transformers()
        try:
            if ck.kind == "gguf":
                tok = _gguf_tokenizer(ck.path)
            else:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(ck.path))
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{ck.path}: cannot load the tokenizer ({e})") from None
        eos = set(ck.config.eos_token_id)
        if tok.eos_token_id is not None:
            eos.add(int(tok.eos_token_id))
        gen = Path(ck.path) / "generation_config.json" if Path(ck.path).is_dir() else None
        if gen and gen.exists():
            g = json.loads(gen.read_text()).get("eos_token_id")
            eos.update([g] if isinstance(g, int) else (g or []))
        return cls(tok, eos)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, special: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=special))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    @property
    def chat_template_text(self) -> str:
        """The chat template's source (all of them, when a model has several by name)."""
        t = getattr(self.hf, "chat_template", None) or ""
        return "\n".join(str(v) for v in t.values()) if isinstance(t, dict) else str(t)

    @property
    def supports_tools(self) -> bool:
        """Whether the template renders a `tools` list itself (else apps/tools.py puts them in the prompt)."""
        return bool(re.search(r"\btools\b", self.chat_template_text))

    def apply_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                   tools: list[dict] | None = None) -> list[int]:
        """Token ids of messages (and tools, for a template that renders them) with the chat template."""
        if not self.has_chat_template:
            raise RequestError("this model has no chat template; use a completion (--raw) instead")
        try:
            text = self.hf.apply_chat_template(messages, tokenize=False, tools=tools,
                                               add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja errors: a template that rejects these messages
            raise RequestError(f"the chat template rejected the messages: {e}") from None
        return self.encode(text, special=False)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental detokenizer: emits text only once it is complete UTF-8 (never half a character)."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix = 0  # decode from here, so merges with earlier tokens render right
        self.read = 0  # text up to here has been emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character is emitted as U+FFFD)."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


def _gguf_tokenizer(path: Path):
    """transformers converts a GGUF vocab in seconds; keep the result in the cache."""
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / "tokenizers" / key
    if (cached / "tokenizer_config.json").exists():
        return _saved_tokenizer(cached)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        tmp = cached.with_name(key + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cached) if not cached.exists() else None
    except OSError as e:
        log.warning("could not cache the tokenizer in %s: %s", cached, e)
    return tok


def _saved_tokenizer(d: Path):
    """A tokenizer `save_pretrained` wrote. A plain fast tokenizer (what a GGUF vocab converts to) loads
    through its own class: importing AutoTokenizer costs more than loading the tokenizer (an API peer's
    start waits on it)."""
    try:
        cls = json.loads((d / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        cls = None
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(d))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))
