"""Speculative decoding below the mesh: the last slice verifies drafted chunks exactly as plain
decoding would draw (greedy, seeded, penalties, logprobs), caches roll back past rejected drafts, a
frame mixes drafted, plain and prompt chunks (and adapters), and the drafters (prompt lookup, a draft
model, AdaptiveK) behave. Tiny random models keep it fast; the embedded model runs in the slow CLI test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from backends.errors import ModelError, RequestError
from backends.lora import open_adapter
from backends.sampling import SamplingParams
from backends.shard import LayerShard, Sample, SeqChunk, accept, load_shard
from backends.speculation import AdaptiveK, DraftModel, PromptLookup, make_drafter, max_drafts
from backends.weights import open_checkpoint
from backends.wire import Hidden
from tests.backends.test_tp import tiny_dir
from tests.helpers import random_llama, together

PROMPT = [5, 17, 42, 9, 100, 3, 77, 17, 42]
PARAMS = {
    "greedy": SamplingParams(logprobs=2),
    "seeded": SamplingParams(temperature=1.0, seed=11, logprobs=3),
    "penalised": SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=5, repetition_penalty=1.5,
                                presence_penalty=0.5, frequency_penalty=0.3, penalty_context=8, logprobs=1),
    "greedy-penalised": SamplingParams(repetition_penalty=1.8, frequency_penalty=0.5),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return open_checkpoint(tiny_dir(tmp_path_factory.mktemp("spec") / "tiny-llama"))


def _backend(name: str) -> str:
    if name == "mlx":
        pytest.importorskip("mlx.core")
    return name


@pytest.fixture(scope="module", params=["torch", "mlx", "torch+mlx"])
def chain(request, tiny) -> list[LayerShard]:
    """The whole tiny model in one shard, or split torch:0-2 + mlx:2-3 (the last slice then sees
    hidden states only: its drafts' ids come in the chunk)."""
    n = tiny.config.num_hidden_layers
    if request.param == "torch+mlx":
        _backend("mlx")
        return [load_shard("torch", tiny, 0, 2, dtype="float32", threads=1),
                load_shard("mlx", tiny, 2, n, dtype="float32")]
    return [load_shard(_backend(request.param), tiny, 0, n, dtype="float32", threads=1)]


def run(chain: list[LayerShard], chunks: list[SeqChunk], tokens: list[int]) -> list[Sample]:
    x: np.ndarray | Hidden = np.asarray(tokens, np.int32)
    for sh in chain[:-1]:
        h = sh.forward(chunks, x)
        assert isinstance(h, Hidden)
        x = h.copy()
    out = chain[-1].forward(chunks, x)
    assert isinstance(out, list)
    return out


def plain(chain, seq, params, n) -> list[Sample]:
    for sh in chain:
        sh.add_sequence(seq, params, PROMPT)
    out = run(chain, [SeqChunk(seq, 0, len(PROMPT))], PROMPT)
    while len(out) < n:
        out += run(chain, [SeqChunk(seq, len(PROMPT) + len(out) - 1, 1)], [out[-1].token])
    for sh in chain:
        sh.free_sequence(seq)
    return out


def speculative(chain, seq, params, n, reference, k=3):
    """Decode with drafts taken from `reference`, every other trip's second draft made wrong; checks
    that every slice holds exactly the accepted positions after each trip."""
    for sh in chain:
        sh.add_sequence(seq, params, PROMPT)
    out = run(chain, [SeqChunk(seq, 0, len(PROMPT))], PROMPT)
    trip = 0
    while len(out) < n:
        pos = len(PROMPT) + len(out) - 1
        drafts = [s.token for s in reference[len(out):len(out) + k]] or [1]
        trip += 1
        if trip % 2 == 0 and len(drafts) > 1:
            drafts[1] = (drafts[1] + 1) % 256
        got = run(chain, [SeqChunk(seq, pos, 1 + len(drafts), drafts=len(drafts), draft_ids=drafts)],
                  [out[-1].token] + drafts)
        assert 1 <= len(got) <= len(drafts) + 1
        assert [s.token for s in got[:-1]] == drafts[:len(got) - 1]  # accepted drafts, then its own
        assert chain[-1].position(seq) == pos + len(got)  # rolled back past the rejected ones
        for sh in chain[:-1]:
            assert sh.position(seq) == pos + 1 + len(drafts)  # a middle slice keeps all until told
            sh.trim(seq, pos + len(got))
            assert sh.position(seq) == pos + len(got)
        out += got
    for sh in chain:
        sh.free_sequence(seq)
    return out[:n]


@pytest.mark.parametrize("kind", list(PARAMS))
def test_verification_draws_exactly_what_plain_decoding_draws(chain, kind):
    params = PARAMS[kind]
    ref = plain(chain, "p", params, 16)
    got = speculative(chain, "s", params, 16, ref)
    assert [s.token for s in got] == [s.token for s in ref]
    np.testing.assert_allclose([s.logprob for s in got], [s.logprob for s in ref], atol=1e-4)
    for a, b in zip(got, ref):
        assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
    # all drafts wrong: each trip still yields the plain token (the correction)
    wrong = [Sample("p", (s.token + 7) % 256) for s in ref]
    bad = speculative(chain, "w", params, 8, wrong, k=2)
    assert [s.token for s in bad] == [s.token for s in ref[:8]]


def test_torch_bfloat16_verification_is_bit_exact(tiny):
    """bfloat16 rounds differently when a chunk's positions attend together: a drafted chunk attends
    position by position, so a seeded answer is the same bits with or without drafts."""
    sh = [load_shard("torch", tiny, 0, tiny.config.num_hidden_layers, dtype="bfloat16", threads=1)]
    for kind in ("greedy", "seeded"):
        ref = plain(sh, "p", PARAMS[kind], 16)
        got = speculative(sh, "s", PARAMS[kind], 16, ref)
        assert [(s.token, s.logprob) for s in got] == [(s.token, s.logprob) for s in ref]


def test_trim_rolls_the_cache_back_and_the_next_chunk_continues(tiny):
    for backend in ("torch", _backend("mlx")):
        sh = load_shard(backend, tiny, 0, tiny.config.num_hidden_layers, dtype="float32", threads=1)
        toks = PROMPT + [11, 12, 13]
        sh.add_sequence("a")
        sh.logits([SeqChunk("a", 0, len(toks))], np.asarray(toks, np.int32))
        sh.trim("a", len(PROMPT))
        assert sh.position("a") == len(PROMPT)
        sh.trim("a", len(PROMPT) + 5)  # holds fewer: nothing to drop
        assert sh.position("a") == len(PROMPT)
        again = sh.logits([SeqChunk("a", len(PROMPT), 2)], np.asarray([30, 31], np.int32))
        sh.add_sequence("b")
        fresh = sh.logits([SeqChunk("b", 0, len(PROMPT) + 2)], np.asarray(PROMPT + [30, 31], np.int32))
        np.testing.assert_allclose(again, fresh[-2:], atol=1e-4)
        with pytest.raises(RequestError, match="unknown sequence"):
            sh.trim("nobody", 0)
        with pytest.raises(RequestError, match="negative"):
            sh.trim("a", -1)


def test_drafted_chunks_are_checked(tiny):
    n = tiny.config.num_hidden_layers
    first, last = (load_shard("torch", tiny, 0, 2, dtype="float32", threads=1),
                   load_shard("torch", tiny, 2, n, dtype="float32", threads=1))
    for sh in (first, last):
        sh.add_sequence("a", prompt=PROMPT)
    h = first.forward([SeqChunk("a", 0, 3, drafts=2)], np.asarray([1, 2, 3], np.int32))
    with pytest.raises(RequestError, match="needs the ids of its 2 drafts"):
        last.forward([SeqChunk("a", 0, 3, drafts=2)], h)
    with pytest.raises(RequestError, match="1 draft ids for 2 drafts"):
        last.forward([SeqChunk("a", 0, 3, drafts=2, draft_ids=[2])], h)
    with pytest.raises(RequestError, match="out of the vocabulary"):
        last.forward([SeqChunk("a", 0, 3, drafts=2, draft_ids=[2, 9999])], h)
    with pytest.raises(RequestError, match="3 drafts in a chunk of 3 tokens"):
        first.forward([SeqChunk("a", 3, 3, drafts=3)], np.asarray([1, 2, 3], np.int32))
    with pytest.raises(RequestError, match="drafts ride after"):
        last.forward([SeqChunk("a", 0, 3, sample=False, drafts=2, draft_ids=[2, 3])], h)


def test_a_sliding_window_cache_drafts_only_while_it_can_roll_back(tmp_path):
    """mlx-lm's rotating cache cannot drop positions once it wrapped around: such a sequence must not
    draft (can_draft), and a drafted chunk that would wrap is refused before anything runs."""
    pytest.importorskip("mlx.core")
    d = tiny_dir(tmp_path / "swa")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    (d / "config.json").write_text(json.dumps(cfg))
    ck = open_checkpoint(d)
    sh = load_shard("mlx", ck, 0, 3, dtype="float32")
    sh.add_sequence("a", SamplingParams(), PROMPT[:3])
    first = sh.forward([SeqChunk("a", 0, 3)], np.asarray(PROMPT[:3], np.int32))[0].token
    assert sh.can_draft("a", 3) and not sh.can_draft("a", 4)  # 3 + 1 + 3 positions < the window of 8
    out = sh.forward([SeqChunk("a", 3, 4, drafts=3)], np.asarray([first, 1, 2, 3], np.int32))
    assert sh.position("a") == 3 + len(out)
    with pytest.raises(RequestError, match="sliding-window cache cannot take 4 drafts"):
        sh.forward([SeqChunk("a", sh.position("a"), 5, drafts=4)], np.asarray([out[-1].token, 1, 2, 3, 4], np.int32))
    assert sh.position("a") == 3 + len(out)
    # what an API peer, which holds no shard, reads from the config: the same limit
    assert max_drafts(ck.config, 3) == 3 and max_drafts(ck.config, 7) == 0
    assert max_drafts(open_checkpoint(tiny_dir(tmp_path / "full")).config, 400) is None


def _adapter(path: Path, h: int = 128, r: int = 4) -> Path:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(5)
    arrays = {f"model.layers.{n}.self_attn.q_proj.{ab}": (rng.standard_normal(s) * 0.5).astype(np.float32)
              for n in range(3) for ab, s in (("lora_a", (h, r)), ("lora_b", (r, h)))}
    path.mkdir(parents=True)
    save_file(arrays, str(path / "adapters.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 3, "lora_parameters": {"rank": r, "scale": 4.0}}))
    return path


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_frame_mixes_drafted_plain_and_prompt_chunks_with_adapters(tiny, tmp_path, monkeypatch, backend):
    sh = load_shard(_backend(backend), tiny, 0, tiny.config.num_hidden_layers, dtype="float32", threads=1)
    sh.load_adapter(open_adapter(f"ad={_adapter(tmp_path / 'ad')}"))
    seqs = {"draft": ("", PARAMS["seeded"]), "draft-ad": ("ad", PARAMS["greedy"]),
            "plain": ("", PARAMS["penalised"]), "plain-ad": ("ad", PARAMS["seeded"])}
    solo = {}
    for s, (ad, p) in seqs.items():  # each alone, plain decoding
        sh.add_sequence(s, p, PROMPT, ad)
        out = sh.forward([SeqChunk(s, 0, len(PROMPT))], np.asarray(PROMPT, np.int32))
        for i in range(5):
            out += sh.forward([SeqChunk(s, len(PROMPT) + i, 1)], np.asarray([out[-1].token], np.int32))
        solo[s] = [x.token for x in out]
        sh.free_sequence(s)
    long_prompt = list(range(1, 41))
    for s, (ad, p) in seqs.items():
        sh.add_sequence(s, p, PROMPT, ad)
        assert sh.forward([SeqChunk(s, 0, len(PROMPT))], np.asarray(PROMPT, np.int32))[0].token == solo[s][0]
    sh.add_sequence("prompt", PARAMS["greedy"], long_prompt)
    rows: list[int] = []
    head = sh.model.head
    monkeypatch.setattr(sh.model, "head", lambda h: (rows.append(int(np.prod(h.shape[:-1]))), head(h))[1])
    p = len(PROMPT)
    wrong = (solo["draft-ad"][2] + 1) % 256
    drafts = {"draft": solo["draft"][1:4], "draft-ad": [solo["draft-ad"][1], wrong, wrong]}  # 3 right, 1 of 3
    chunks = [SeqChunk("draft", p, 4, drafts=3), SeqChunk("plain", p, 1), SeqChunk("prompt", 0, 30, sample=False),
              SeqChunk("draft-ad", p, 4, drafts=3), SeqChunk("plain-ad", p, 1)]
    x = ([solo["draft"][0]] + drafts["draft"] + [solo["plain"][0]] + long_prompt[:30]
         + [solo["draft-ad"][0]] + drafts["draft-ad"] + [solo["plain-ad"][0]])
    out = sh.forward(chunks, np.asarray(x, np.int32))
    monkeypatch.undo()
    # the head saw only the positions drawn from, none of the prompt chunk's (MLX drew the plain decodes
    # in its step ahead of the last call, and computes the next one's ahead)
    assert rows == ([4 + 1 + 4 + 1] if backend == "torch" else [4 + 4, 1 + 1])
    got: dict[str, list[int]] = {}
    for s in out:
        got.setdefault(s.seq_id, []).append(s.token)
    assert got == {"draft": solo["draft"][1:5], "plain": solo["plain"][1:2],
                   "draft-ad": solo["draft-ad"][1:3], "plain-ad": solo["plain-ad"][1:2]}
    assert (sh.position("draft"), sh.position("draft-ad"), sh.position("prompt")) == (p + 4, p + 2, 30)
    # the next step is a plain batched decode again, and continues each exactly
    nxt = [SeqChunk(s, sh.position(s), 1) for s in seqs]
    more = sh.forward(nxt, np.asarray([got[s][-1] for s in seqs], np.int32))
    assert [m.token for m in more] == [solo[s][len(got[s]) + 1] for s in seqs]


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    pl = PromptLookup(max_ngram=3, min_ngram=1)
    assert pl.propose([1, 2, 3, 4, 5, 9, 1, 2, 3], 3) == [4, 5, 9]  # the 3-gram [1, 2, 3]
    assert pl.propose([1, 2, 3, 4, 1, 2, 3, 7, 2, 3], 2) == [7, 2]  # the latest [2, 3] wins
    assert pl.propose([7, 8, 9, 8], 4) == [9, 8]  # 1-gram; what follows runs to the end
    assert pl.propose([1, 2, 3], 3) == []  # no earlier occurrence
    assert pl.propose([5, 5, 5, 5], 2) == [5]
    assert pl.propose([1, 2, 1], 0) == [] and pl.propose([1], 3) == []
    assert PromptLookup(max_ngram=2, min_ngram=2).propose([4, 1, 9, 4, 1], 2) == [9, 4]
    assert PromptLookup(max_ngram=2, min_ngram=2).propose([4, 1, 9, 3, 1], 2) == []
    assert pl.propose_many({"a": ([1, 2, 1], 2), "b": ([3], 1)}) == {"a": [2, 1], "b": []}
    with pytest.raises(RequestError, match="n-grams"):
        PromptLookup(max_ngram=1, min_ngram=2)


def test_accept_keeps_drafts_up_to_the_first_mismatch():
    s = lambda t: Sample("a", t)
    assert [x.token for x in accept([4, 5, 6], [s(4), s(5), s(6), s(7)])] == [4, 5, 6, 7]
    assert [x.token for x in accept([4, 5, 6], [s(4), s(9), s(6), s(7)])] == [4, 9]
    assert [x.token for x in accept([4], [s(1), s(4)])] == [1]
    drawn = []

    def lazy():
        for t in (4, 8, 6, 7):
            drawn.append(t)
            yield s(t)

    accept([4, 5, 6], lazy())
    assert drawn == [4, 8]  # nothing is drawn past the correction


def test_adaptive_k_falls_to_zero_on_a_bad_drafter_and_recovers():
    ak = AdaptiveK(k_max=6, cost=0.1, probe_every=4)
    assert ak.k() > 0
    ks = []
    for _ in range(30):  # every draft rejected
        k = ak.k()
        ks.append(k)
        ak.update(k, 0)
    assert ks[0] > 0 and ks[-10:].count(0) >= 7 and max(ks[-10:]) <= 2  # off, but for probes
    for _ in range(100):  # the text turned repetitive: drafts accepted again (found by a probe)
        k = ak.k()
        ak.update(k, k)
    assert ak.k() == 6 and ak.rate > 0.8
    assert AdaptiveK(k_max=0).k() == 0
    with pytest.raises(RequestError, match="--draft-tokens"):
        AdaptiveK(k_max=-1)


def test_adaptive_k_weighs_the_measured_price_of_a_draft():
    rng = np.random.default_rng(0)
    cheap, dear = AdaptiveK(k_max=6, cost=1.0), AdaptiveK(k_max=6, cost=0.0)  # priors the times overrule
    for _ in range(40):
        for ak, extra in ((cheap, 0.01), (dear, 1.0)):
            ak.update(0, 0, 1.0)  # a plain trip: 1 s
            k = max(ak.k(), 1)
            kept = int(np.argmin(rng.random(k + 1) < 0.4))  # each draft kept with probability 0.4
            ak.update(k, min(kept, k), 1.0 + extra * k)
    assert cheap.cost == pytest.approx(0.01, rel=0.1) and dear.cost == pytest.approx(1.0, rel=0.1)
    assert cheap.k() >= 2 and dear.k() == 0  # a draft as dear as a trip does not pay at 40 %
    timed = AdaptiveK(k_max=4, timed=True)
    assert timed.k() == 0  # first a plain trip, to time
    timed.update(0, 0, 1.0)
    ks = [timed.k() for _ in range(64)]
    assert ks.count(0) == 2 and ks[30] == 0  # then every 32nd


def test_probes_back_off_while_they_fail():
    ak = AdaptiveK(k_max=4, probe_every=2)
    trips = 0
    probes = []
    while trips < 200:
        trips += 1
        k = ak.k()
        if k:
            probes.append(trips)
        ak.update(k, 0)
    gaps = np.diff(probes[-4:])
    assert gaps[-1] >= 32  # probing slows down to every 64 trips at most


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_draft_model_drafts_greedily_and_syncs_its_cache(tiny, backend):
    target = load_shard("torch", tiny, 0, tiny.config.num_hidden_layers, dtype="float32", threads=1)
    ref = [s.token for s in plain([target], "r", SamplingParams(), 12)]
    dm = DraftModel(load_shard(_backend(backend), tiny, 0, tiny.config.num_hidden_layers, dtype="float32",
                               threads=1))
    committed = PROMPT + ref[:1]
    got = dm.propose_many({"a": (committed, 4), "b": (PROMPT[:5], 0)})
    assert got == {"a": ref[1:5], "b": []}
    # two drafts accepted, then a correction the model would not have drafted: the cache is cut back
    committed = committed + ref[1:3] + [(ref[3] + 1) % 256]
    again = dm.propose_many({"a": (committed, 3)})["a"]
    assert dm.shard.position("a") == len(committed) + 2  # the committed tokens and two drafts fed
    target.add_sequence("c")
    expect = [s.token for s in target.forward([SeqChunk("c", 0, len(committed))], np.asarray(committed, np.int32))]
    for _ in range(2):
        expect += [s.token for s in target.forward([SeqChunk("c", len(committed) + len(expect) - 1, 1)],
                                                   np.asarray(expect[-1:], np.int32))]
    assert again == expect
    dm.free("a")
    assert not dm.shard.has_sequence("a")
    dm.close()


def _with_tokenizer(path: Path, words: list[str]) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tk = HFTokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tk.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=words[0]).save_pretrained(str(path))
    return path


def test_a_draft_model_with_another_tokenizer_is_refused(tmp_path):
    target = open_checkpoint(_with_tokenizer(tiny_dir(tmp_path / "target"), [f"w{i}" for i in range(256)]))
    other = _with_tokenizer(tiny_dir(tmp_path / "other"), [f"x{i}" for i in range(256)])
    with pytest.raises(ModelError, match=r"draft model .*other.* and the served model .*target.* have "
                                         r"different tokenizers .*--draft lookup"):
        make_drafter(str(other), target, backend="torch", dtype="float32")
    same = _with_tokenizer(tiny_dir(tmp_path / "same"), [f"w{i}" for i in range(256)])
    dm = make_drafter(str(same), target, backend="torch", dtype="float32", threads=1)
    assert isinstance(dm, DraftModel)
    dm.close()
    with pytest.raises(ModelError, match=r"--draft /no/such/model: .*not found.*--draft takes off, lookup"):
        make_drafter("/no/such/model", target)
    assert make_drafter("off", target) is None
    assert isinstance(make_drafter("lookup"), PromptLookup)


@pytest.mark.slow
def test_a_tensor_parallel_last_stage_verifies_and_its_workers_roll_back(tiny):
    """rank 0 verifies; every rank drops the rejected positions (a worker out of step would refuse
    the next chunk), and the answer is plain decoding's."""
    from backends.tp import TPGroup

    g = TPGroup(tiny, 0, tiny.config.num_hidden_layers, "torch", 2, dtype="float32", threads=1, timeout=20)
    sh = g.start()
    try:
        for kind in ("greedy", "seeded"):
            ref = plain([sh], "p", PARAMS[kind], 12)
            assert [s.token for s in speculative([sh], "s", PARAMS[kind], 12, ref)] == [s.token for s in ref]
    finally:
        g.close()


# ---------------------------------------------------------------- the CLI, on the embedded model

EDIT = ("Repeat this text with 'cat' replaced by 'dog': The cat sat on the warm windowsill every morning, "
        "watching the birds in the garden below. When the sun rose higher, the cat stretched and jumped down.")


def _generate(*args: str) -> tuple[str, str]:
    p = together("generate", "--prompt", EDIT, "--max-tokens", "32", "--threads", "1", "--backend", "torch", *args)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout, p.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_together_generate_drafts_by_default_and_says_the_same():
    on, stats = _generate()
    off, no = _generate("--draft", "off")
    assert on == off and len(off) > 40
    assert "draft lookup: accepted" in stats and "tok/step" in stats and no.endswith("draft off"), (stats, no)


def _answer(pipe, tok, prompt, params, draft=None, adaptive=False) -> tuple[list[int], dict]:
    stats: dict = {}
    toks = [d.token for d in pipe.generate(prompt, params, tok, stats, draft=draft, draft_tokens=6,
                                           adaptive=adaptive)]
    return toks, stats


def _poor_draft(path: Path, tok) -> Path:
    """A random two-layer model with the embedded model's vocabulary and tokenizer."""
    random_llama(path, hidden=64, intermediate=128, heads=4, kv_heads=2, layers=2, vocab=49152, seed=1,
                 norm_noise=None, max_position_embeddings=2048)
    tok.hf.save_pretrained(str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("split", ["torch:0-30", "mlx:0-30", "mlx:0-15,torch:15-30"])
def test_the_pipeline_answers_the_same_with_any_drafter(split, embedded, tokenizer, tmp_path):
    from backends.pipeline import Pipeline, parse_shards

    if "mlx" in split:
        pytest.importorskip("mlx.core")
    pipe = Pipeline.load(embedded, parse_shards(split, 30, "torch"), threads=1)
    prompt = tokenizer.apply_chat([{"role": "user", "content": EDIT}])
    try:
        # MLX computes float32 on a CPU, slowly: its runs stay short
        n = 40 if split.startswith("torch") else 20
        greedy, seeded = SamplingParams(max_tokens=n), SamplingParams(max_tokens=n // 2, temperature=0.8, seed=3)
        off, _ = _answer(pipe, tokenizer, prompt, greedy)
        on, stats = _answer(pipe, tokenizer, prompt, greedy, PromptLookup())
        assert on == off and stats["accepted"] > n // 4 and stats["steps"] < len(on) - n // 8, stats
        if split == "mlx:0-30":
            return
        assert _answer(pipe, tokenizer, prompt, seeded)[0] == _answer(pipe, tokenizer, prompt, seeded, PromptLookup())[0]
        if split != "torch:0-30":
            return
        itself = make_drafter("smollm2-135m", embedded, tokenizer, backend="torch", threads=1)
        same, stats = _answer(pipe, tokenizer, prompt, greedy, itself, adaptive=True)
        assert same == off and stats["accepted"] >= 0.9 * stats["drafted"], stats  # the model is its own draft
        poor = make_drafter(str(_poor_draft(tmp_path / "poor", tokenizer)), embedded, tokenizer, backend="torch")
        same, stats = _answer(pipe, tokenizer, prompt, greedy, poor, adaptive=True)
        assert same == off and stats["accepted"] < 0.3 * stats["drafted"], stats
        assert stats["drafted"] < 3 * len(off)  # k fell: fewer than the full 6 per step
    finally:
        pipe.close()
