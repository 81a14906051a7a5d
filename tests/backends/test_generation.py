from backends.errors import RequestError
from backends.generation import Generation
from backends.sampling import SamplingParams
from backends.shard import Sample

import pytest


def run(tok, text, **kw):
    params = SamplingParams(**kw)
    g = Generation("s", [1, 2, 3], params, tok, context=8192)
    out = []
    for t in tok.encode(text, special=False) + [2]:
        out.append(g.add(Sample("s", t)).text)
        if g.finished:
            break
    return out, g


def test_streaming_never_splits_a_character(tokenizer):
    text = "naïve café 你好世界 🎉🚀 done"
    pieces, g = run(tokenizer, text)
    assert "".join(pieces) == text and g.finish_reason == "stop"
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_across_tokens_is_cut_and_never_leaks(tokenizer):
    pieces, g = run(tokenizer, "alpha beta gamma delta", stop=["a gam", "zzz"])
    assert "".join(pieces) == "alpha bet" and g.finish_reason == "stop"
    assert g.text == "alpha bet"


def test_held_back_prefix_is_released_when_not_a_stop(tokenizer):
    pieces, g = run(tokenizer, "one two three", stop=["two four"])
    assert "".join(pieces) == "one two three" and g.finish_reason == "stop"  # by EOS


def test_max_tokens_gives_length(tokenizer):
    pieces, g = run(tokenizer, "one two three four five six", max_tokens=2)
    assert g.finish_reason == "length" and len(g.tokens) == 2


def test_prompt_beyond_context_is_refused(tokenizer):
    with pytest.raises(RequestError, match="context is 4 tokens"):
        Generation("s", [1, 2, 3, 4, 5], SamplingParams(), tokenizer, context=4)


def test_chat_template_renders_system_and_turns(tokenizer):
    ids = tokenizer.apply_chat([{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello!"},
                                {"role": "user", "content": "Bye"}])
    text = tokenizer.hf.decode(ids)
    assert text.count("<|im_start|>") == 5 and "Be brief." in text
    assert text.endswith("<|im_start|>assistant\n")
