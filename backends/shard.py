"""The backend-neutral LayerShard interface: a [start, end) slice of a model with per-sequence caches.

numpy and bytes at its edges, never framework tensors:
- the first slice takes token ids (int32, all chunks concatenated), others take `Hidden`;
- a non-last slice returns `Hidden` (tokens, hidden_size) in its wire dtype;
- the last slice returns one `Sample` per chunk, drawn from the chunk's last position; a chunk with
  drafts (speculative decoding) gets 1 + a: its a accepted drafts, then a token of its own.
"""

from __future__ import annotations

import abc
import logging
import functools
import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from backends.config import ModelConfig
from backends.errors import BackendMissing, RequestError
from backends.lora import Adapter, Route, module_dims
from backends.prefix import BLOCK, MISS, NO_CACHE, PrefixCache, PrefixMiss
from backends.sampling import SamplingParams
from backends.weights import Checkpoint
from backends.wire import DTYPES, Hidden

if TYPE_CHECKING:
    from backends.constrain import Constraint

log = logging.getLogger(__name__)
BACKENDS = ("mlx", "torch")
_NEEDS = {"torch": "torch", "mlx": "mlx", "mlx_lm": "mlx-lm"}  # top-level module -> package


def missing_backend(backend: str, e: ImportError) -> RequestError:
    """The one-line error for a backend that cannot be imported: the package and the extra."""
    pkg = _NEEDS.get((e.name or "").partition(".")[0])
    if pkg is not None:
        return BackendMissing(f"the {backend} backend needs {pkg}: pip install 'together[{backend}]'")
    return BackendMissing(f"the {backend} backend could not be imported ({e}); "
                          f"pip install 'together[{backend}]'")


def backend_module(backend: str, module: str) -> ModuleType:
    """backends.<backend>.<module> (e.g. 'torch', 'shard'), or a one-line error naming the extra to
    install; the base package imports neither torch nor MLX."""
    if backend not in BACKENDS:
        raise RequestError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    try:
        return importlib.import_module(f"backends.{backend}.{module}")
    except ImportError as e:
        raise missing_backend(backend, e) from None


@dataclass
class SeqChunk:
    """`length` consecutive tokens of one sequence, starting at position `offset`."""

    seq_id: str
    offset: int
    length: int
    sample: bool = True  # False: more chunks of this prompt follow, the last slice draws no token yet
    # speculation: the chunk's last `drafts` tokens are drafted (chunk = last accepted token + k drafts);
    # the last slice verifies them (see LayerShard.forward); only with sample
    drafts: int = 0
    # the drafted tokens' ids, for a last slice that is not the first (it sees hidden states only; a
    # first slice reads them from its input when this is empty)
    draft_ids: Sequence[int] = ()


@dataclass
class Sample:
    seq_id: str
    token: int
    logprob: float = 0.0  # log-probability of `token` under the model's raw distribution
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SeqState:
    """What a shard keeps per sequence besides its KV cache."""

    params: SamplingParams
    history: list[int]  # prompt + generated tokens (used by penalties); last slice only
    length: int = 0  # tokens already in the cache
    rng: object = None  # backend RNG state for seeded sampling
    adapter: str = ""  # LoRA adapter this sequence runs with ('' = the base model)


class LayerShard(abc.ABC):
    """Layers [start, end) of a model; the first embeds, the last normalises, projects and samples."""

    backend: str = ""

    def __init__(self, checkpoint: Checkpoint, start: int, end: int, dtype: str,
                 wire_dtype: str | None = None):
        cfg = checkpoint.config
        if not (0 <= start < end <= cfg.num_hidden_layers):
            raise RequestError(f"bad layer range [{start}, {end}) for a {cfg.num_hidden_layers}-layer model")
        if dtype not in DTYPES:
            raise RequestError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
        self.config: ModelConfig = cfg
        self.checkpoint = checkpoint  # the last slice loads the tokenizer from it for structured output
        self.start, self.end, self.dtype = start, end, dtype
        self.wire_dtype = wire_dtype or dtype
        self.seqs: dict[str, SeqState] = {}
        self.adapters: dict[str, Adapter] = {}
        self.route = Route()  # which adapter each row of the batch being computed uses
        self.prefix: PrefixCache | None = None  # see enable_prefix_cache
        self.constraints: dict[str, Constraint] = {}  # last slice: each constrained sequence's grammar

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.config.num_hidden_layers

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def weight_format(self) -> str:
        """What the slice's weights are held as, for tables: the compute dtype unless the backend
        keeps them packed (e.g. 'int4/g32+int8/g32': layers in 4-bit groups of 32, head in 8-bit)."""
        return self.dtype

    # ---- sequences

    def add_sequence(self, seq_id: str, params: SamplingParams | None = None,
                     prompt: Sequence[int] = (), adapter: str = "", prefix: int = 0,
                     generated: int = 0) -> None:
        """Create an empty cache for a sequence (the last slice also keeps its sampler, and the
        matcher of its grammar, if any); it runs with LoRA adapter `adapter` (loaded with
        `load_adapter`) or, if empty, the base model.
        prefix > 0: the cache starts with the KV of prompt[:prefix] from the prefix cache (a copy),
        or PrefixMiss; with a prefix cache, the prompt's blocks are kept once its last chunk has run.
        generated > 0: the last `generated` tokens of `prompt` are the sequence's output so far (a
        replay on a new path), which its grammar consumes."""
        if adapter and adapter not in self.adapters:
            have = ", ".join(sorted(self.adapters)) or "none"
            raise RequestError(f"adapter {adapter!r} is not loaded on layers [{self.start}, {self.end}) "
                               f"(loaded: {have}); start the peer with --adapter")
        constraint = None
        if self.is_last and params is not None and params.grammar:
            from backends.constrain import new_constraint

            if not 0 <= generated <= len(prompt):
                raise RequestError(f"sequence {seq_id!r}: {generated} generated tokens of a history of "
                                   f"{len(prompt)}")
            constraint = new_constraint(params.grammar, self.checkpoint,
                                        list(prompt[len(prompt) - generated:]) if generated else ())
        blobs = self._prefix_blobs(prompt, prefix, adapter) if prefix else []
        if seq_id in self.seqs:
            self.free_sequence(seq_id)
        st = SeqState(params or SamplingParams(), list(prompt), adapter=adapter)
        self.seqs[seq_id] = st
        if constraint is not None:
            self.constraints[seq_id] = constraint
        self._new_cache(seq_id, st)
        if blobs:
            try:
                self._import_kv(seq_id, blobs)
            except Exception:
                self.free_sequence(seq_id)
                raise
            st.length = prefix
        if self.prefix is not None and len(prompt) >= BLOCK:
            self.prefix.prompts[seq_id] = list(prompt)

    def free_sequence(self, seq_id: str) -> bool:
        """Drop a sequence's cache; True if it existed."""
        st = self.seqs.pop(seq_id, None)
        if st is None:
            return False
        self.constraints.pop(seq_id, None)
        if self.prefix is not None:
            self.prefix.prompts.pop(seq_id, None)
        self._free_cache(seq_id)
        return True

    def has_sequence(self, seq_id: str) -> bool:
        return seq_id in self.seqs

    def position(self, seq_id: str) -> int | None:
        """Tokens a sequence's cache holds (where its next chunk must start), None if unknown."""
        st = self.seqs.get(seq_id)
        return None if st is None else st.length

    @property
    def num_sequences(self) -> int:
        return len(self.seqs)

    # ---- adapters

    def load_adapter(self, adapter: Adapter) -> None:
        """Serve `adapter` too: read and apply only its tensors for this slice's layers."""
        adapter.check_fits(self.config.num_hidden_layers, module_dims(self.config))
        if adapter.name in self.adapters:
            raise RequestError(f"an adapter named {adapter.name!r} is already loaded; name them apart "
                               f"with --adapter NAME=PATH")
        self._apply_adapter(adapter, adapter.weights(self.start, self.end))
        self.adapters[adapter.name] = adapter

    def _route(self, seq_ids: Sequence[str]) -> None:
        self.route.rows = tuple(self.seqs[s].adapter for s in seq_ids)

    # ---- compute

    def forward(self, chunks: list[SeqChunk], x: np.ndarray | Hidden) -> Hidden | list[Sample]:
        """Run a batch of chunks through the slice, appending to each sequence's cache.

        The last slice returns a Sample per sampled chunk; for a chunk with drafts=k, 1 + a Samples
        (the a drafts it accepted, then its own token: a correction, or a bonus when a == k), after
        which its cache holds offset + 1 + a positions. Every position is drawn exactly as the plain
        path would draw it (same processing, penalties over the tokens before it, the seeded key of
        its position), and draft i is accepted while it equals the token drawn before it: for drafts
        proposed deterministically that is the rejection rule, so the answer is unchanged. Other
        slices compute every position of every chunk (a later `trim` drops the rejected ones)."""
        self._check(chunks, x)
        out = self._forward(chunks, x, want_logits=False)
        for c in chunks:
            self.seqs[c.seq_id].length += c.length
        if self.is_last:
            drawn = {c.seq_id for c in chunks if c.sample}
            out = [s for s in out if s.seq_id in drawn]  # a prompt's inner chunks yield no token
            for s in out:
                self.seqs[s.seq_id].history.append(s.token)
                grammar = self.constraints.get(s.seq_id)
                if grammar is not None:
                    grammar.consume((s.token,))
            for c in chunks:
                if c.drafts:  # roll back past the rejected drafts: keep offset + 1 + accepted
                    self.trim(c.seq_id, c.offset + sum(1 for s in out if s.seq_id == c.seq_id))
        if self.prefix is not None and self.prefix.prompts:
            self._keep_prompts(chunks)
        return out

    def trim(self, seq_id: str, length: int) -> None:
        """Drop a sequence's cached positions at or past `length` (rejected drafts); a no-op when the
        cache holds no more than that."""
        st = self.seqs.get(seq_id)
        if st is None:
            raise RequestError(f"unknown sequence {seq_id!r}")
        if length < 0:
            raise RequestError(f"sequence {seq_id!r}: cannot trim to a negative length ({length})")
        if length < st.length:
            self._trim_cache(seq_id, length)
            st.length = length

    def can_draft(self, seq_id: str, k: int) -> bool:
        """Whether a chunk with k drafts can be verified and rolled back for this sequence now (a
        sliding-window cache that would wrap around cannot drop positions again)."""
        return seq_id in self.seqs

    def _grammar_masks(self, seq_id: str, drafts: Sequence[int] = ()) -> list[np.ndarray] | None:
        """A constrained sequence's allowed tokens at its next 1 + len(drafts) positions (bool over
        the vocabulary; position j's after drafts[:j]; fewer where the grammar refuses a draft: no
        later position can then be accepted, so any mask serves it), or None when unconstrained."""
        c = self.constraints.get(seq_id)
        if c is None:
            return None
        return c.masks(drafts) if drafts else [c.mask()]

    def _draft_ids(self, chunks: list[SeqChunk], x: np.ndarray | Hidden | None) -> dict[str, list[int]]:
        """The drafted tokens of each chunk with drafts, by sequence (from the chunk, else the input)."""
        out: dict[str, list[int]] = {}
        at = 0
        for c in chunks:
            if c.drafts:
                if c.draft_ids:
                    out[c.seq_id] = [int(t) for t in c.draft_ids]
                elif isinstance(x, np.ndarray):
                    out[c.seq_id] = [int(t) for t in x[at + c.length - c.drafts:at + c.length]]
            at += c.length
        return out

    def logits(self, chunks: list[SeqChunk], x: np.ndarray | Hidden) -> np.ndarray:
        """Last slice only: float32 logits for every position, (total_tokens, vocab); caches advance."""
        if not self.is_last:
            raise RequestError("logits() needs the last slice")
        self._check(chunks, x)
        out = self._forward(chunks, x, want_logits=True)
        for c in chunks:
            self.seqs[c.seq_id].length += c.length
        return out

    def _check(self, chunks: list[SeqChunk], x: np.ndarray | Hidden) -> None:
        total = 0
        for c in chunks:
            st = self.seqs.get(c.seq_id)
            if st is None:
                raise RequestError(f"unknown sequence {c.seq_id!r}")
            if c.offset != st.length:
                raise RequestError(f"sequence {c.seq_id!r}: chunk at position {c.offset} but cache "
                                   f"holds {st.length} tokens")
            if c.length < 1:
                raise RequestError(f"sequence {c.seq_id!r}: empty chunk")
            if c.drafts:
                self._check_drafts(c)
            if c.offset + c.length > self.config.max_position_embeddings:
                raise RequestError(f"sequence {c.seq_id!r}: {c.offset + c.length} tokens exceed the "
                                   f"model's context of {self.config.max_position_embeddings}")
            total += c.length
        if self.is_first:
            if not isinstance(x, np.ndarray) or x.ndim != 1 or x.shape[0] != total:
                raise RequestError(f"first slice expects {total} token ids")
            if total and (x.min() < 0 or x.max() >= self.config.vocab_size):
                raise RequestError("token id out of the vocabulary")
        else:
            if not isinstance(x, Hidden) or x.shape != (total, self.config.hidden_size):
                got = getattr(x, "shape", type(x).__name__)
                raise RequestError(f"expected hidden states of shape ({total}, "
                                   f"{self.config.hidden_size}), got {got}")

    def _check_drafts(self, c: SeqChunk) -> None:
        if not (0 < c.drafts < c.length) or not c.sample:
            raise RequestError(f"sequence {c.seq_id!r}: {c.drafts} drafts in a chunk of {c.length} tokens "
                               f"(drafts ride after the last accepted token of a sampled chunk)")
        if not self.can_draft(c.seq_id, c.drafts):
            raise RequestError(f"sequence {c.seq_id!r}: its sliding-window cache cannot take {c.drafts} "
                               f"drafts here (it could not drop them again); send it without drafts")
        if not self.is_last:
            return
        if c.draft_ids and len(c.draft_ids) != c.drafts:
            raise RequestError(f"sequence {c.seq_id!r}: {len(c.draft_ids)} draft ids for {c.drafts} drafts")
        if not c.draft_ids and not self.is_first:
            raise RequestError(f"sequence {c.seq_id!r}: the last slice needs the ids of its {c.drafts} "
                               f"drafts to verify them (SeqChunk.draft_ids)")
        if any(not 0 <= int(t) < self.config.vocab_size for t in c.draft_ids):
            raise RequestError(f"sequence {c.seq_id!r}: a draft id out of the vocabulary")

    # ---- the prefix cache (backends/prefix.py)

    def enable_prefix_cache(self, budget_bytes: int, label: str, memory: int | None = None) -> None:
        """Keep the KV of computed prompt blocks, up to `budget_bytes`, keyed by model `label` and
        adapter; `memory`: bytes this peer offers for weights and caches, so the store yields to
        live sequences (never holding what they leave of it). A backend without KV export ignores it."""
        if budget_bytes <= 0 or not self.prefix_supported:
            self.prefix = None
            return
        weights = self.weight_nbytes()
        room = None if memory is None else (lambda: memory - weights - self.cache_nbytes())
        self.prefix = PrefixCache(budget_bytes, label, room)

    @property
    def prefix_supported(self) -> bool:
        """Whether this backend can export and import a sequence's KV (`_export_kv`, `_import_kv`)."""
        return False

    def prefix_missing(self, prompt: Sequence[int], prefix: int, adapter: str = "") -> str | None:
        """Why `add_sequence(prompt=..., prefix=...)` would fail (a message with "prefix not cached"),
        or None if this stage holds that prefix."""
        try:
            self._prefix_check(prompt, prefix)
        except RequestError as e:
            return str(e)
        assert self.prefix is not None
        keys = self.prefix.keys(prompt[:prefix], adapter)
        have = self.prefix.store.depth(keys)
        if have < len(keys):
            self.prefix.store.misses += len(keys) - have
            return (f"{MISS} on layers [{self.start}, {self.end}): this stage holds {have} of its "
                    f"{len(keys)} blocks")
        return None

    def keep(self, seq_id: str, tokens: Sequence[int]) -> int:
        """Keep the complete blocks of a sequence's committed tokens (prompt and generated) that its
        cache holds: positions below min(its length, len(tokens) - 1), since the last committed token
        has not been through the layers. Returns the blocks added to the store."""
        st = self.seqs.get(seq_id)
        if st is None or self.prefix is None:
            return 0
        return self._keep(seq_id, tokens[:max(0, min(st.length, len(tokens) - 1))])

    def prefix_stats(self) -> dict[str, int]:
        """The store's bytes, blocks, budget, hits, misses and evictions (zeros when off)."""
        if self.prefix is None:
            return {"bytes": 0, "blocks": 0, "budget": 0, "hits": 0, "misses": 0, "evictions": 0}
        return self.prefix.store.stats()

    def _prefix_check(self, prompt: Sequence[int], prefix: int) -> None:
        if self.prefix is None:
            raise PrefixMiss(f"{MISS} on layers [{self.start}, {self.end}): this stage {NO_CACHE}")
        if prefix % BLOCK or not 0 < prefix < len(prompt):  # (another version's blocks): sent whole again
            raise PrefixMiss(f"{MISS}: a prefix of {prefix} tokens for a prompt of {len(prompt)}: it must be "
                             f"a multiple of {BLOCK} below the prompt's length")

    def _prefix_blobs(self, prompt: Sequence[int], prefix: int, adapter: str) -> list:
        self._prefix_check(prompt, prefix)
        assert self.prefix is not None
        blobs = self.prefix.store.take(self.prefix.keys(prompt[:prefix], adapter))
        self.prefix.fit()
        return blobs

    def _keep(self, seq_id: str, tokens: Sequence[int]) -> int:
        assert self.prefix is not None
        self.prefix.fit()
        keys = self.prefix.keys(tokens, self.seqs[seq_id].adapter)
        return self.prefix.store.put(keys, lambda i: self._export_kv(seq_id, i * BLOCK, (i + 1) * BLOCK),
                                     self.prefix.budget_now())

    def _keep_prompts(self, chunks: list[SeqChunk]) -> None:
        """Keep the blocks of each prompt whose last chunk has just run."""
        assert self.prefix is not None
        for c in chunks:
            prompt = self.prefix.prompts.get(c.seq_id)
            if prompt is not None and self.seqs[c.seq_id].length >= len(prompt):
                del self.prefix.prompts[c.seq_id]
                try:
                    self._keep(c.seq_id, prompt)
                except Exception:  # a cache's favour never fails the frame that computed the prompt
                    log.exception("could not keep the prompt of %s", c.seq_id)

    # ---- backend hooks

    def _export_kv(self, seq_id: str, start: int, end: int):
        """A copy of a sequence's cached keys and values at positions [start, end) of every layer of
        the slice (a blob with `nbytes`: its true size), for the prefix cache."""
        raise RequestError(f"{type(self).__name__} cannot export its KV caches")

    def _import_kv(self, seq_id: str, blobs: list) -> None:
        """Fill a new, empty cache with these exported blocks, in order, from position 0 (copies)."""
        raise RequestError(f"{type(self).__name__} cannot import KV caches")

    @abc.abstractmethod
    def _new_cache(self, seq_id: str, st: SeqState) -> None: ...

    @abc.abstractmethod
    def _free_cache(self, seq_id: str) -> None: ...

    def _trim_cache(self, seq_id: str, length: int) -> None:
        """Drop cached positions >= length (below the sequence's current length)."""
        raise RequestError(f"{type(self).__name__} cannot roll back its caches (no speculation)")

    @abc.abstractmethod
    def _forward(self, chunks: list[SeqChunk], x: np.ndarray | Hidden | None, want_logits: bool):
        """Hidden states, samples or logits (want_logits); x None: a tensor-parallel worker, whose
        input comes from rank 0."""

    def _apply_adapter(self, adapter: Adapter, weights: dict) -> None:
        """Add the adapter's (a, b) pairs ({layer: {module: (a, b)}}) to this slice's layers."""
        raise RequestError(f"{type(self).__name__} does not serve LoRA adapters")

    @abc.abstractmethod
    def cache_nbytes(self) -> int:
        """Bytes held by all KV caches of this slice."""

    @abc.abstractmethod
    def weight_nbytes(self) -> int:
        """Bytes held by this slice's weights."""


def accept(drafts: Sequence[int], drawn: Iterable[Sample]) -> list[Sample]:
    """Speculation's acceptance: the j-th draw is the token drawn at the position of drafts[j]; keep
    the draws while they equal the drafts, up to and including the first that does not (the
    correction), or all len(drafts) + 1 when every draft matched (the last is the bonus token).
    `drawn` may be lazy: nothing past the correction is drawn."""
    out: list[Sample] = []
    for j, s in enumerate(drawn):
        out.append(s)
        if j == len(drafts) or s.token != drafts[j]:
            break
    return out


def token_seed(seed: int, position: int) -> int:
    """The seed of the token drawn at `position` of a sequence seeded with `seed` (splitmix64): a
    replayed sequence draws the same numbers as an undisturbed one, whatever happened in between."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (position + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1  # 63 bits: both torch and MLX take it


DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(backend: str, device: str | None) -> str | None:
    """The torch device a `--device` choice means here (None: MLX picks its own), or a clear error.
    auto: CUDA when torch sees a GPU, else the CPU; MLX runs on Metal or its CPU by itself."""
    dev = (device or "auto").lower()
    base = dev.split(":", 1)[0]
    if base not in DEVICES:
        raise RequestError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if backend == "mlx":
        if base not in ("auto", "cpu"):
            raise RequestError(f"--device {device} is for torch peers: MLX runs on Metal or its CPU by "
                               "itself; use --backend torch for CUDA or MPS")
        mx = backend_module("mlx", "shard").mx
        if base == "cpu" and mx.default_device().type != mx.cpu:
            raise RequestError("--device cpu: MLX runs on Metal here and picks its device itself; "
                               "--device is for torch peers")
        return None
    torch = backend_module("torch", "shard").torch
    if base == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if base == "cuda" and not torch.cuda.is_available():
        raise RequestError(f"--device {device}: torch sees no CUDA GPU here (torch {torch.__version__}); "
                           "use --device cpu, or install a CUDA build of torch")
    if base == "mps" and not torch.backends.mps.is_available():
        raise RequestError(f"--device {device}: torch has no MPS (Apple GPU) here; use --device cpu, "
                           "or --backend mlx on a Mac")
    return dev


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. a Mac)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
    except OSError:
        return frozenset()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def default_dtype(backend: str, checkpoint: Checkpoint, device: str | None = None) -> str:
    """MLX computes in float16 on a GPU (as mlx-lm does for quantized/half checkpoints) and in
    float32 on a CPU, where its half-precision kernels are ~50x slower; torch in bfloat16 on CUDA and
    on a CPU with native bfloat16 (where 4-bit weights stay packed: backends/torch/quant.py), else
    float32."""
    if backend == "mlx":
        try:
            import mlx.core as mx

            gpu = mx.default_device().type == mx.gpu
        except ImportError:
            gpu = False
        return "float16" if gpu else "float32"
    dev = device or "cpu"
    return "bfloat16" if dev.startswith("cuda") or (dev == "cpu" and cpu_has_bf16()) else "float32"


def estimate_layer_bytes(ck: Checkpoint, backend: str, dtype: str = "auto", head: bool = False,
                         device: str | None = None) -> int:
    """Bytes one decoder layer (or, with head=True, the embedding/head) takes on a backend:
    MLX keeps affine-quantized tensors packed, torch on a CPU too when it computes in bfloat16 (4-bit
    groups in one int4 plane, 8-bit in two; a bfloat16 scale and zero per group and plane), and
    dequantizes everything else to its dtype."""
    if dtype == "auto":
        dtype = default_dtype(backend, ck, device)
    size = DTYPES[dtype]
    packs = backend == "mlx" or (dtype == "bfloat16" and (device or "cpu") == "cpu")
    names = [n for n in ck.tensors if n.startswith("model.layers.0.")] if not head else \
        [n for n in ("model.embed_tokens.weight", "lm_head.weight") if ck.has(n)]
    total = 0
    for n in names:
        t = ck.get(n)
        elems = int(np.prod(t.shape))
        a = t.affine() if packs else None
        if a is None:
            total += elems * size
        elif backend == "mlx":
            total += a.packed.nbytes + (a.scales.size + a.biases.size) * size
        else:
            total += a.packed.nbytes + a.scales.size * 4 * (2 if a.bits == 8 else 1)
    return total


def available_backends() -> list[str]:
    out = []
    for b in BACKENDS:
        try:
            __import__("mlx.core" if b == "mlx" else "torch")
            out.append(b)
        except Exception:
            pass
    return out


def load_shard(backend: str, checkpoint: Checkpoint, start: int, end: int, dtype: str = "auto",
               wire_dtype: str | None = None, device: str | None = None,
               threads: int | None = None) -> LayerShard:
    """Load layers [start, end) of `checkpoint` on `backend` ('mlx' or 'torch'), on `device`
    (auto, cpu, cuda[:N], mps: see `resolve_device`)."""
    device = resolve_device(backend, device)
    if dtype == "auto":
        dtype = default_dtype(backend, checkpoint, device)
    shard = backend_module(backend, "shard")
    if backend == "mlx":
        return shard.MLXShard(checkpoint, start, end, dtype, wire_dtype, threads=threads)
    return shard.TorchShard(checkpoint, start, end, dtype, wire_dtype, device=device, threads=threads)
