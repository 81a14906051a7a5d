"""MLX LayerShard: a [start, end) slice of an mlx-lm model, with one KVCache list per sequence.

The blocks are mlx-lm's own TransformerBlocks (the module picked by model_type, as mlx_lm.load
does); only the slice's tensors are read, and quantized ones stay packed.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from typing import cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import KVCache, RotatingKVCache

from backends.lora import Adapter
from backends.mlx.lora import apply_adapter
from backends.errors import ModelError, RequestError
from backends.mlx.sampling import Drawn, Sampler, make_sampler, new_key
from backends.shard import LayerShard, Sample, SeqChunk, SeqState, accept
from backends.weights import Checkpoint, expected_shapes, validate_slice
from backends.wire import Hidden

MX_DTYPES = {"float16": mx.float16, "float32": mx.float32, "bfloat16": mx.bfloat16}
_NP_WIRE = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
# model types whose attention is q/k/v proj -> rope -> cache -> SDPA -> o_proj, as _decode_block assumes
_BATCHED_DECODE = {"llama", "qwen2"}


def param_arrays(module: nn.Module) -> list[mx.array]:
    """Every parameter array of a module."""
    flat = tree_flatten(module.parameters())  # a list of (name, array) without a destination
    return [v for _, v in cast(list[tuple[str, mx.array]], flat)]


def _scalar(a: mx.array) -> float:
    """The one real number in an array (a token id or a log-probability)."""
    v = a.item()
    if not isinstance(v, (int, float)):
        raise TypeError(f"expected a real scalar, got {v!r}")
    return v


def arch_module(model_type: str):
    """The mlx_lm.models module for a model_type (respecting mlx_lm's remapping)."""
    name = model_type
    if importlib.util.find_spec(f"mlx_lm.models.{model_type}") is None:
        # a remapped type (mlx_lm.utils imports transformers: seconds a peer needs only here)
        from mlx_lm.utils import MODEL_REMAPPING

        name = MODEL_REMAPPING.get(model_type, model_type)
    try:
        return importlib.import_module(f"mlx_lm.models.{name}")
    except ImportError:
        raise ModelError(f"mlx-lm has no model for {model_type!r}") from None


class SliceModel(nn.Module):
    """Blocks [start, end) plus the embedding (first slice) and norm + head (last slice)."""

    def __init__(self, arch, args, start: int, end: int, first: bool, last: bool, tied: bool):
        super().__init__()
        types = getattr(args, "layer_types", None) or ["full_attention"] * args.num_hidden_layers
        sliding = "use_sliding" in inspect.signature(arch.TransformerBlock.__init__).parameters
        self.layers = [
            arch.TransformerBlock(args, use_sliding=types[i] == "sliding_attention") if sliding
            else arch.TransformerBlock(args)
            for i in range(start, end)
        ]
        self.window = getattr(args, "sliding_window", None)
        if first or (last and tied):
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        if last:
            self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
            if not tied:
                self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tied = tied

    def make_cache(self) -> list:
        return [RotatingKVCache(max_size=self.window) if getattr(l, "use_sliding", False)
                else KVCache() for l in self.layers]

    def blocks(self, h: mx.array, cache: list) -> mx.array:
        """One sequence, h (1, L, H): exactly mlx-lm's model loop (mask from the cache)."""
        masks = {}
        for layer, c in zip(self.layers, cache):
            swa = getattr(layer, "use_sliding", False)
            if swa not in masks:
                masks[swa] = create_attention_mask(h, c, window_size=self.window if swa else None)
            h = layer(h, masks[swa], c)
        return h

    def head(self, h: mx.array) -> mx.array:
        h = self.norm(h)
        return self.embed_tokens.as_linear(h) if self.tied else self.lm_head(h)


def _decode_block(layer, x: mx.array, caches: list, masks: list) -> mx.array:
    """A TransformerBlock over B sequences of one token each, x (B, 1, H): the projections and the
    MLP run batched; rope, cache and attention run per sequence with the same shapes as alone."""
    attn = layer.self_attn
    B, L, _ = x.shape
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).reshape(B, L, attn.n_heads, -1).transpose(0, 2, 1, 3)  # (B, Hq, 1, D)
    k = attn.k_proj(h).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = attn.v_proj(h).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    outs = []
    for i, (c, m) in enumerate(zip(caches, masks)):
        qi = attn.rope(q[i:i + 1], offset=c.offset)
        ki = attn.rope(k[i:i + 1], offset=c.offset)
        ki, vi = c.update_and_fetch(ki, v[i:i + 1])
        outs.append(scaled_dot_product_attention(qi, ki, vi, cache=c, scale=attn.scale, mask=m))
    o = mx.concatenate(outs, axis=0).transpose(0, 2, 1, 3).reshape(B, L, -1)
    h = x + attn.o_proj(o)
    return h + layer.mlp(layer.post_attention_layernorm(h))


class MLXShard(LayerShard):
    backend = "mlx"
    speculate = True  # a first-and-last slice computes each decode step ahead (see _run_ahead)

    def __init__(self, checkpoint: Checkpoint, start: int, end: int, dtype: str,
                 wire_dtype: str | None = None, threads: int | None = None):
        super().__init__(checkpoint, start, end, dtype, wire_dtype)
        self.threads = threads  # MLX has no CPU thread-count setting; kept for the interface
        self.dt = MX_DTYPES[dtype]
        cfg = self.config
        arch = arch_module(cfg.model_type)
        hf = cfg.to_hf_dict()
        tied = checkpoint.tied_head
        hf["tie_word_embeddings"] = tied
        args = arch.ModelArgs.from_dict(hf)
        self.model = SliceModel(arch, args, start, end, self.is_first, self.is_last, tied)
        self._batched_decode = arch.__name__.rpartition(".")[2] in _BATCHED_DECODE
        self._load(checkpoint)
        self.caches: dict[str, list] = {}
        self.samplers: dict[str, Sampler] = {}
        self.ahead: dict[str, _Ahead] = {}  # by sequence: its next decode step, computed ahead
        self.ahead_used = self.ahead_dropped = 0  # steps ahead taken by the next call / rolled back

    # ---- loading

    def _load(self, ck: Checkpoint) -> None:
        validate_slice(ck, self.start, self.end,
                       expected_shapes(self.config, self.start, self.end, ck.tied_head))
        weights: dict[str, mx.array] = {}
        quant: dict[str, dict] = {}
        for name in ck.slice_names(self.start, self.end):
            ref = ck.get(name)
            local = self._local_name(name)
            if local is None:
                continue
            try:
                a = ref.affine()
                if a is not None:
                    base = local[: -len(".weight")]
                    quant[base] = {"group_size": a.group_size, "bits": a.bits}
                    weights[local] = mx.array(a.packed)
                    weights[base + ".scales"] = mx.array(a.scales).astype(self.dt)
                    weights[base + ".biases"] = mx.array(a.biases).astype(self.dt)
                else:
                    arr = ref.numpy()
                    if tuple(arr.shape) != tuple(ref.shape):
                        raise ModelError(f"{ref.source}: tensor {name!r} has shape {arr.shape}, "
                                         f"expected {ref.shape}")
                    weights[local] = mx.array(arr).astype(self.dt)
            except ModelError:
                raise
            except Exception as e:
                raise ModelError(f"{ref.source}: cannot read tensor {name!r} ({e})") from None
        if quant:
            nn.quantize(self.model, class_predicate=lambda p, m: quant.get(p, False))
        try:
            self.model.load_weights(list(weights.items()), strict=True)
        except ValueError as e:
            raise ModelError(f"{ck.path}: weights do not fit layers [{self.start}, {self.end}) "
                             f"of {self.config.model_type}: {e}") from None
        self.model.eval()
        mx.eval(self.model.parameters())
        projs: list[nn.Module] = [m for layer in self.model.layers for _, m in layer.named_modules()
                                  if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
        if self.is_last:
            projs.append(self.model.embed_tokens if self.model.tied else self.model.lm_head)
        self._format = "+".join(dict.fromkeys(_weight_format(m) for m in projs))

    @property
    def weight_format(self) -> str:
        """'int4/g32' and the like where projections stay packed (the head's after a '+'), else the dtype."""
        return self._format

    def _local_name(self, name: str) -> str | None:
        if name.startswith("model.layers."):
            rest = name[len("model.layers."):]
            idx, tail = rest.split(".", 1)
            return f"layers.{int(idx) - self.start}.{tail}"
        if name.startswith("model.embed_tokens."):
            return name[len("model."):]
        if name.startswith("model.norm."):
            return name[len("model."):]
        if name.startswith("lm_head."):
            return name
        return None

    # ---- caches

    def _new_cache(self, seq_id: str, st: SeqState) -> None:
        self.caches[seq_id] = self.model.make_cache()
        if self.is_last:
            st.params.validate()
            self.samplers[seq_id] = make_sampler(st.params)
            if not st.params.greedy:
                st.rng = new_key(st.params.seed)

    def _free_cache(self, seq_id: str) -> None:
        self.ahead.pop(seq_id, None)
        self.caches.pop(seq_id, None)
        self.samplers.pop(seq_id, None)

    def _trim_cache(self, seq_id: str, length: int) -> None:
        a = self.ahead.pop(seq_id, None)
        if a is not None:  # its step ahead goes too (its cache entry below, its key here)
            self.ahead_dropped += 1
            self.seqs[seq_id].rng = a.rng
        for kv in self.caches[seq_id]:
            n = kv.offset - length
            if n > 0:
                if not kv.is_trimmable():
                    raise RequestError(f"sequence {seq_id!r}: its sliding-window cache has wrapped around "
                                       f"and cannot drop positions past {length}")
                kv.trim(n)

    def can_draft(self, seq_id: str, k: int) -> bool:
        """A rotating (sliding-window) cache can drop positions only until it wraps around: a sequence
        drafts while its 1 + k positions still fit under the window."""
        st = self.seqs.get(seq_id)
        if st is None:
            return False
        return all(not isinstance(c, RotatingKVCache) or st.length + k + 1 < c.max_size
                   for c in self.caches[seq_id])

    # ---- the prefix cache: a block is (keys; values) of every layer, (2, layers, Hkv, n, D), a copy

    @property
    def prefix_supported(self) -> bool:
        return not self.model.window  # a rotating cache's positions are not where its tokens stand

    def _export_kv(self, seq_id: str, start: int, end: int) -> mx.array:
        cache = self.caches[seq_id]
        blob = mx.stack([mx.stack([c.keys[0, :, start:end] for c in cache]),
                         mx.stack([c.values[0, :, start:end] for c in cache])])
        mx.eval(blob)  # a new buffer: the slices' parents (the live cache) are not kept alive
        return blob

    def _import_kv(self, seq_id: str, blobs: list) -> None:
        n = sum(int(b.shape[3]) for b in blobs)
        for i, c in enumerate(self.caches[seq_id]):
            c.keys = mx.concatenate([b[0, i] for b in blobs], axis=1)[None]  # (1, Hkv, n, D)
            c.values = mx.concatenate([b[1, i] for b in blobs], axis=1)[None]
            c.offset = n
        mx.eval([a for c in self.caches[seq_id] for a in (c.keys, c.values)])

    def _apply_adapter(self, adapter: Adapter, weights: dict) -> None:
        apply_adapter(self.model.layers, self.start, adapter.name, weights, adapter.scale, self.route)
        mx.eval(self.model.parameters())

    def cache_nbytes(self) -> int:
        return sum(c.nbytes for cache in self.caches.values() for c in cache)

    def weight_nbytes(self) -> int:
        return sum(v.nbytes for v in param_arrays(self.model))

    # ---- compute

    def _input(self, x: np.ndarray | Hidden | None) -> mx.array:
        if self.is_first:
            return self.model.embed_tokens(mx.array(np.asarray(x, dtype=np.int32)))  # (T, H)
        if not isinstance(x, Hidden):
            raise RequestError("a slice after the first takes hidden states")
        buf = np.frombuffer(x.data, dtype=_NP_WIRE[x.dtype]).reshape(x.shape)
        h = mx.array(buf)
        if x.dtype == "bfloat16":
            h = h.view(mx.bfloat16)
        return h.astype(self.dt)

    def _forward(self, chunks: list[SeqChunk], x: np.ndarray | Hidden | None, want_logits: bool):
        drafts = self._draft_ids(chunks, x) if self.is_last else {}
        done = self._claim_ahead(chunks, x, want_logits) if self.ahead else {}
        todo = [c for c in chunks if c.seq_id not in done]
        if todo:
            outs = self._layers(todo, self._input(_rows(x, chunks, done) if done else x))
            if not self.is_last:
                y = mx.concatenate([o[0] for o in outs], axis=0) if len(outs) > 1 else outs[0][0]
                y = y.astype(MX_DTYPES[self.wire_dtype])
                mx.eval(y)
                # mlx's stubs omit the buffer protocol its arrays implement (bf16 included)
                return Hidden(memoryview(y), self.wire_dtype, tuple(y.shape))  # type: ignore[arg-type]
            if want_logits:
                logits = [self.model.head(o)[0] for o in outs]
                y = mx.concatenate(logits, axis=0) if len(logits) > 1 else logits[0]
                return np.array(y.astype(mx.float32))
            # a prompt's inner chunks draw nothing: no head over their positions
            want = [(c, o) for c, o in zip(todo, outs) if c.sample]
            drawn = self._draw([c for c, _ in want], [o for _, o in want], drafts=drafts) if want else []
            mx.async_eval(_arrays(drawn))  # evaluates while the step ahead is built
            done.update((c.seq_id, d) for (c, _), d in zip(want, drawn))
        chunks = [c for c in chunks if c.seq_id in done]
        ordered = [done[c.seq_id] for c in chunks]
        ahead = self._run_ahead(chunks, ordered) if self.speculate and self.is_first and self.is_last else {}
        out = self._read(chunks, ordered, drafts)
        for s in out:
            if s.seq_id in ahead:
                ahead[s.seq_id].token = s.token
                self.ahead[s.seq_id] = ahead[s.seq_id]
        return out

    def _layers(self, chunks: list[SeqChunk], h: mx.array) -> list[mx.array]:
        """The slice's blocks over every chunk of h (T, H); one (1, L, H) output per chunk. Decode
        chunks (one token each) run batched where the architecture allows."""
        starts = np.cumsum([0] + [c.length for c in chunks]).tolist()
        outs: list[mx.array | None] = [None] * len(chunks)
        single = [i for i, c in enumerate(chunks) if c.length == 1]
        if len(single) > 1 and self._batched_decode:
            idx = mx.array([starts[i] for i in single])
            hb = h[idx][:, None, :]  # (B, 1, H)
            caches = [self.caches[chunks[i].seq_id] for i in single]
            self._route([chunks[i].seq_id for i in single])
            masks = [create_attention_mask(hb[j:j + 1], caches[j][0]) for j in range(len(single))]
            for li, layer in enumerate(self.model.layers):
                hb = _decode_block(layer, hb, [c[li] for c in caches], masks)
            for j, i in enumerate(single):
                outs[i] = hb[j:j + 1]
        for i, c in enumerate(chunks):
            if outs[i] is None:
                self._route([c.seq_id])
                outs[i] = self.model.blocks(h[starts[i]:starts[i + 1]][None], self.caches[c.seq_id])
        return cast(list[mx.array], outs)

    def _draw(self, chunks: list[SeqChunk], outs: list[mx.array], pending: list[mx.array] | None = None,
              drafts: dict[str, list[int]] | None = None) -> list[list[Drawn]]:
        """Lazy draws of each chunk (`pending`: tokens not in history yet): from its last position, or
        from each of a drafted chunk's 1 + k positions, the penalties seeing the drafts before it."""
        # the head runs on the positions a draw needs only, kept as (n, 1, H) rows like a decode step
        rows = [o[:, -(c.drafts + 1):, :].reshape(-1, 1, o.shape[-1]) for c, o in zip(chunks, outs)]
        logits = self.model.head(mx.concatenate(rows, axis=0) if len(rows) > 1 else rows[0])[:, 0, :]
        drawn: list[list[Drawn]] = []
        at = 0
        for i, c in enumerate(chunks):
            st, ids = self.seqs[c.seq_id], (drafts or {}).get(c.seq_id, [])
            first = c.offset + c.length - c.drafts  # the position of the chunk's first draw
            masks = self._grammar_masks(c.seq_id, ids[:c.drafts])  # structured output: None if free
            per = []
            for j in range(c.drafts + 1):
                if st.params.seed is not None and not st.params.greedy:  # the key of that position
                    st.rng = new_key(st.params.seed, first + j)
                view = SeqState(st.params, st.history + ids[:j], rng=st.rng) if j else st
                allowed = mx.array(masks[min(j, len(masks) - 1)]) if masks else None
                per.append(self.samplers[c.seq_id](logits[at + j:at + j + 1], view,
                                                   pending[i] if pending else None, allowed))
                st.rng = view.rng  # an unseeded draw advanced the key
            drawn.append(per)
            at += c.drafts + 1
        return drawn

    def _read(self, chunks: list[SeqChunk], drawn: list[list[Drawn]],
              drafts: dict[str, list[int]] | None = None) -> list[Sample]:
        keys = [self.seqs[c.seq_id].rng for c in chunks]
        mx.eval(_arrays(drawn) + [k for k in keys if isinstance(k, mx.array)])
        out = []
        for c, per in zip(chunks, drawn):
            samples = [_sample(c.seq_id, d) for d in per]
            out += accept(drafts[c.seq_id], samples) if c.drafts and drafts else samples
        return out

    # ---- the step ahead (a slice that is first and last: one peer serves the whole model)
    # As mlx_lm's generate_step: the next decode step is built from the lazily drawn tokens and
    # evaluated asynchronously while this step's tokens travel back; the next call uses it when it
    # brings exactly those tokens at those positions, else its cache entries are trimmed away.

    def _run_ahead(self, chunks: list[SeqChunk], drawn: list[list[Drawn]]) -> dict[str, _Ahead]:
        # a constrained sequence's next mask needs the token this step draws: it waits for it
        rows = [(c, d[-1]) for c, d in zip(chunks, drawn)
                if c.sample and not c.drafts and c.offset + c.length < self.config.max_position_embeddings
                and _trimmable(self.caches[c.seq_id]) and c.seq_id not in self.constraints]
        if not rows:
            return {}
        nxt = [SeqChunk(c.seq_id, c.offset + c.length, 1) for c, _ in rows]
        keys = [self.seqs[c.seq_id].rng for c, _ in rows]  # an unseeded draw advances the key
        tokens = [d.token for _, d in rows]
        h = self.model.embed_tokens(mx.concatenate(tokens) if len(tokens) > 1 else tokens[0])
        ahead = self._draw(nxt, self._layers(nxt, h), tokens)
        mx.async_eval(_arrays(ahead))
        return {n.seq_id: _Ahead(n.offset, -1, a[0], k) for n, a, k in zip(nxt, ahead, keys)}

    def _claim_ahead(self, chunks: list[SeqChunk], x: np.ndarray | Hidden | None,
                     want_logits: bool) -> dict[str, list[Drawn]]:
        """The steps ahead this call asks for (by sequence); the others of its sequences rolled back."""
        hits: dict[str, list[Drawn]] = {}
        at = 0
        for c in chunks:
            a = self.ahead.pop(c.seq_id, None)
            if a is not None:
                if (not want_logits and c.length == 1 and c.offset == a.position
                        and isinstance(x, np.ndarray) and int(x[at]) == a.token):
                    hits[c.seq_id] = [a.drawn]
                    self.ahead_used += 1
                else:
                    self.ahead_dropped += 1
                    for kv in self.caches[c.seq_id]:
                        kv.trim(1)
                    self.seqs[c.seq_id].rng = a.rng
            at += c.length
        return hits


@dataclass
class _Ahead:
    """A decode step computed ahead for one sequence from the token it just drew."""

    position: int  # where the chunk it answers starts
    token: int  # the input token it assumed (the one drawn before)
    drawn: Drawn  # its draws, lazy and evaluating
    rng: object  # the sequence's key before this step drew


def _weight_format(m: nn.Module) -> str:
    if "scales" in m and hasattr(m, "bits"):
        return f"int{m.bits}/g{m.group_size}"
    return str(m["weight"].dtype).removeprefix("mlx.core.")


def _arrays(drawn: list[list[Drawn]]) -> list[mx.array]:
    return [a for per in drawn for d in per for a in (d.token, d.logprob, d.top_ids, d.top_logprobs)
            if a is not None]


def _sample(seq_id: str, d: Drawn) -> Sample:
    """An evaluated draw as a Sample."""
    s = Sample(seq_id, int(_scalar(d.token)), _scalar(d.logprob))
    if d.top_ids is not None and d.top_logprobs is not None:
        ids, lps = cast(list[int], d.top_ids[0].tolist()), cast(list[float], d.top_logprobs[0].tolist())
        s.top_logprobs = list(zip(ids, lps))
    return s


def _rows(x: np.ndarray | Hidden | None, chunks: list[SeqChunk], skip: dict) -> np.ndarray:
    """The token ids of the chunks not in `skip` (a first slice's input)."""
    starts = np.cumsum([0] + [c.length for c in chunks])
    assert isinstance(x, np.ndarray)
    return np.concatenate([x[starts[i]:starts[i + 1]] for i, c in enumerate(chunks) if c.seq_id not in skip])


def _trimmable(cache: list) -> bool:
    """Whether one more token can be added and trimmed away again (a rotating cache that would wrap
    around cannot)."""
    return all(type(c) is KVCache or (isinstance(c, RotatingKVCache) and c.offset + 1 < c.max_size)
               for c in cache)
