from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "penalty_context", "has_seed", "seed", "logprobs", "grammar")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PENALTY_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    penalty_context: int
    has_seed: bool
    seed: int
    logprobs: int
    grammar: str
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., penalty_context: _Optional[int] = ..., has_seed: _Optional[bool] = ..., seed: _Optional[int] = ..., logprobs: _Optional[int] = ..., grammar: _Optional[str] = ...) -> None: ...

class SeqEntry(_message.Message):
    __slots__ = ("seq_id", "offset", "length", "start", "sampling", "history", "adapter", "more", "drafts", "trim", "prefix", "draft_ids", "generated")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    DRAFTS_FIELD_NUMBER: _ClassVar[int]
    TRIM_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    DRAFT_IDS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    offset: int
    length: int
    start: bool
    sampling: SamplingParams
    history: _containers.RepeatedScalarFieldContainer[int]
    adapter: str
    more: bool
    drafts: int
    trim: bool
    prefix: int
    draft_ids: _containers.RepeatedScalarFieldContainer[int]
    generated: int
    def __init__(self, seq_id: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., start: _Optional[bool] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., history: _Optional[_Iterable[int]] = ..., adapter: _Optional[str] = ..., more: _Optional[bool] = ..., drafts: _Optional[int] = ..., trim: _Optional[bool] = ..., prefix: _Optional[int] = ..., draft_ids: _Optional[_Iterable[int]] = ..., generated: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("frame_id", "epoch", "seqs", "dtype", "shape", "data", "tokens", "origin", "hop_ms", "failed_seqs", "error", "error_code")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    HOP_MS_FIELD_NUMBER: _ClassVar[int]
    FAILED_SEQS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    epoch: int
    seqs: _containers.RepeatedCompositeFieldContainer[SeqEntry]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    tokens: _containers.RepeatedScalarFieldContainer[int]
    origin: str
    hop_ms: _containers.RepeatedScalarFieldContainer[float]
    failed_seqs: _containers.RepeatedScalarFieldContainer[str]
    error: str
    error_code: int
    def __init__(self, frame_id: _Optional[int] = ..., epoch: _Optional[int] = ..., seqs: _Optional[_Iterable[_Union[SeqEntry, _Mapping]]] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., tokens: _Optional[_Iterable[int]] = ..., origin: _Optional[str] = ..., hop_ms: _Optional[_Iterable[float]] = ..., failed_seqs: _Optional[_Iterable[str]] = ..., error: _Optional[str] = ..., error_code: _Optional[int] = ...) -> None: ...

class TokenResult(_message.Message):
    __slots__ = ("seq_id", "token", "logprob", "top_tokens", "top_logprobs")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    token: int
    logprob: float
    top_tokens: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, seq_id: _Optional[str] = ..., token: _Optional[int] = ..., logprob: _Optional[float] = ..., top_tokens: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("frame_id", "results", "error", "error_code", "failed_seqs", "hop_ms")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    FAILED_SEQS_FIELD_NUMBER: _ClassVar[int]
    HOP_MS_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    results: _containers.RepeatedCompositeFieldContainer[TokenResult]
    error: str
    error_code: int
    failed_seqs: _containers.RepeatedScalarFieldContainer[str]
    hop_ms: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, frame_id: _Optional[int] = ..., results: _Optional[_Iterable[_Union[TokenResult, _Mapping]]] = ..., error: _Optional[str] = ..., error_code: _Optional[int] = ..., failed_seqs: _Optional[_Iterable[str]] = ..., hop_ms: _Optional[_Iterable[float]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("node_id", "name", "address", "backend", "free_memory", "layer_ms", "started_at", "api", "version", "model", "start", "end", "tp_group", "ready", "layer_bytes", "adapters", "tokens_per_s", "tp_size", "tp_address", "dtype", "weight_format", "head_ms", "links", "weights", "prefill_ms", "training", "num_layers", "hidden_size", "kv_reserve")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    FREE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    LAYER_MS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    API_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TP_GROUP_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    LAYER_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    TP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    HEAD_MS_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_RESERVE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    address: str
    backend: str
    free_memory: int
    layer_ms: float
    started_at: float
    api: str
    version: str
    model: str
    start: int
    end: int
    tp_group: str
    ready: bool
    layer_bytes: int
    adapters: str
    tokens_per_s: float
    tp_size: int
    tp_address: str
    dtype: str
    weight_format: str
    head_ms: float
    links: _containers.RepeatedCompositeFieldContainer[LinkStat]
    weights: str
    prefill_ms: float
    training: str
    num_layers: int
    hidden_size: int
    kv_reserve: int
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., address: _Optional[str] = ..., backend: _Optional[str] = ..., free_memory: _Optional[int] = ..., layer_ms: _Optional[float] = ..., started_at: _Optional[float] = ..., api: _Optional[str] = ..., version: _Optional[str] = ..., model: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., tp_group: _Optional[str] = ..., ready: _Optional[bool] = ..., layer_bytes: _Optional[int] = ..., adapters: _Optional[str] = ..., tokens_per_s: _Optional[float] = ..., tp_size: _Optional[int] = ..., tp_address: _Optional[str] = ..., dtype: _Optional[str] = ..., weight_format: _Optional[str] = ..., head_ms: _Optional[float] = ..., links: _Optional[_Iterable[_Union[LinkStat, _Mapping]]] = ..., weights: _Optional[str] = ..., prefill_ms: _Optional[float] = ..., training: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., kv_reserve: _Optional[int] = ...) -> None: ...

class LinkStat(_message.Message):
    __slots__ = ("node_id", "rtt_ms", "mbps", "measured_at")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    MBPS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_AT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    rtt_ms: float
    mbps: float
    measured_at: float
    def __init__(self, node_id: _Optional[str] = ..., rtt_ms: _Optional[float] = ..., mbps: _Optional[float] = ..., measured_at: _Optional[float] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("node_id", "start", "end", "tp_members")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TP_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    start: int
    end: int
    tp_members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., tp_members: _Optional[_Iterable[str]] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("epoch", "coordinator", "stages", "peers", "num_layers", "model", "complete", "missing", "predicted_tokens_per_s", "predicted_prefill_tokens_per_s", "limit", "rings")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    RINGS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    coordinator: str
    stages: _containers.RepeatedCompositeFieldContainer[Assignment]
    peers: _containers.RepeatedCompositeFieldContainer[PeerInfo]
    num_layers: int
    model: str
    complete: bool
    missing: str
    predicted_tokens_per_s: float
    predicted_prefill_tokens_per_s: float
    limit: str
    rings: _containers.RepeatedCompositeFieldContainer[Plan]
    def __init__(self, epoch: _Optional[int] = ..., coordinator: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ..., peers: _Optional[_Iterable[_Union[PeerInfo, _Mapping]]] = ..., num_layers: _Optional[int] = ..., model: _Optional[str] = ..., complete: _Optional[bool] = ..., missing: _Optional[str] = ..., predicted_tokens_per_s: _Optional[float] = ..., predicted_prefill_tokens_per_s: _Optional[float] = ..., limit: _Optional[str] = ..., rings: _Optional[_Iterable[_Union[Plan, _Mapping]]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("peer", "want_start", "want_end")
    PEER_FIELD_NUMBER: _ClassVar[int]
    WANT_START_FIELD_NUMBER: _ClassVar[int]
    WANT_END_FIELD_NUMBER: _ClassVar[int]
    peer: PeerInfo
    want_start: int
    want_end: int
    def __init__(self, peer: _Optional[_Union[PeerInfo, _Mapping]] = ..., want_start: _Optional[int] = ..., want_end: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("ok", "reason", "start", "end", "plan")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    start: int
    end: int
    plan: Plan
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("peer",)
    PEER_FIELD_NUMBER: _ClassVar[int]
    peer: PeerInfo
    def __init__(self, peer: _Optional[_Union[PeerInfo, _Mapping]] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("plan",)
    PLAN_FIELD_NUMBER: _ClassVar[int]
    plan: Plan
    def __init__(self, plan: _Optional[_Union[Plan, _Mapping]] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SuspectRequest(_message.Message):
    __slots__ = ("node_id", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("seq_ids", "keep")
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    seq_ids: _containers.RepeatedScalarFieldContainer[str]
    keep: _containers.RepeatedCompositeFieldContainer[KeepSeq]
    def __init__(self, seq_ids: _Optional[_Iterable[str]] = ..., keep: _Optional[_Iterable[_Union[KeepSeq, _Mapping]]] = ...) -> None: ...

class KeepSeq(_message.Message):
    __slots__ = ("seq_id", "tokens")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq_id: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("freed",)
    FREED_FIELD_NUMBER: _ClassVar[int]
    freed: int
    def __init__(self, freed: _Optional[int] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("payload", "reply_bytes")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    reply_bytes: int
    def __init__(self, payload: _Optional[bytes] = ..., reply_bytes: _Optional[int] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class WeightFile(_message.Message):
    __slots__ = ("path", "size", "header", "header_sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    HEADER_SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    header: int
    header_sha256: str
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., header: _Optional[int] = ..., header_sha256: _Optional[str] = ...) -> None: ...

class WeightTensor(_message.Message):
    __slots__ = ("name", "file", "offset", "length", "sha256", "hf_name")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    HF_NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    file: str
    offset: int
    length: int
    sha256: str
    hf_name: str
    def __init__(self, name: _Optional[str] = ..., file: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., sha256: _Optional[str] = ..., hf_name: _Optional[str] = ...) -> None: ...

class ManifestRequest(_message.Message):
    __slots__ = ("what", "names")
    WHAT_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    what: str
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, what: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class ManifestReply(_message.Message):
    __slots__ = ("what", "kind", "num_layers", "tied_head", "files", "tensors")
    WHAT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TIED_HEAD_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    what: str
    kind: str
    num_layers: int
    tied_head: bool
    files: _containers.RepeatedCompositeFieldContainer[WeightFile]
    tensors: _containers.RepeatedCompositeFieldContainer[WeightTensor]
    def __init__(self, what: _Optional[str] = ..., kind: _Optional[str] = ..., num_layers: _Optional[int] = ..., tied_head: _Optional[bool] = ..., files: _Optional[_Iterable[_Union[WeightFile, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[WeightTensor, _Mapping]]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("what", "file", "offset", "length")
    WHAT_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    what: str
    file: str
    offset: int
    length: int
    def __init__(self, what: _Optional[str] = ..., file: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("peer", "plan", "sequences", "cache_bytes", "tokens_per_s", "tasks", "open_fds", "pending_frames", "running", "waiting", "prefix_cache_bytes", "prefix_blocks")
    PEER_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    OPEN_FDS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FRAMES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    peer: PeerInfo
    plan: Plan
    sequences: int
    cache_bytes: int
    tokens_per_s: float
    tasks: int
    open_fds: int
    pending_frames: int
    running: int
    waiting: int
    prefix_cache_bytes: int
    prefix_blocks: int
    def __init__(self, peer: _Optional[_Union[PeerInfo, _Mapping]] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., sequences: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., tasks: _Optional[int] = ..., open_fds: _Optional[int] = ..., pending_frames: _Optional[int] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., prefix_cache_bytes: _Optional[int] = ..., prefix_blocks: _Optional[int] = ...) -> None: ...

class TrainTensor(_message.Message):
    __slots__ = ("name", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TrainHop(_message.Message):
    __slots__ = ("address", "start", "end", "node_id")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    address: str
    start: int
    end: int
    node_id: str
    def __init__(self, address: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

class TrainOpenRequest(_message.Message):
    __slots__ = ("job", "model", "ring", "index", "rank", "scale", "lora_start", "lora_end", "keys", "seed", "learning_rate", "dtype", "step", "tensors")
    JOB_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RING_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    LORA_START_FIELD_NUMBER: _ClassVar[int]
    LORA_END_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    job: str
    model: str
    ring: _containers.RepeatedCompositeFieldContainer[TrainHop]
    index: int
    rank: int
    scale: float
    lora_start: int
    lora_end: int
    keys: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    learning_rate: float
    dtype: str
    step: int
    tensors: _containers.RepeatedCompositeFieldContainer[TrainTensor]
    def __init__(self, job: _Optional[str] = ..., model: _Optional[str] = ..., ring: _Optional[_Iterable[_Union[TrainHop, _Mapping]]] = ..., index: _Optional[int] = ..., rank: _Optional[int] = ..., scale: _Optional[float] = ..., lora_start: _Optional[int] = ..., lora_end: _Optional[int] = ..., keys: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., learning_rate: _Optional[float] = ..., dtype: _Optional[str] = ..., step: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TrainTensor, _Mapping]]] = ...) -> None: ...

class TrainOpenReply(_message.Message):
    __slots__ = ("backend", "dtype", "trainable", "weight_bytes")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    backend: str
    dtype: str
    trainable: int
    weight_bytes: int
    def __init__(self, backend: _Optional[str] = ..., dtype: _Optional[str] = ..., trainable: _Optional[int] = ..., weight_bytes: _Optional[int] = ...) -> None: ...

class TrainBatchRequest(_message.Message):
    __slots__ = ("job", "step", "micro", "rows", "width", "tokens", "offsets", "lengths", "norm", "eval", "want_grad", "dtype", "shape", "data")
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    WANT_GRAD_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    job: str
    step: int
    micro: int
    rows: int
    width: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    norm: float
    eval: bool
    want_grad: bool
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, job: _Optional[str] = ..., step: _Optional[int] = ..., micro: _Optional[int] = ..., rows: _Optional[int] = ..., width: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., offsets: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ..., norm: _Optional[float] = ..., eval: _Optional[bool] = ..., want_grad: _Optional[bool] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TrainBatchReply(_message.Message):
    __slots__ = ("loss", "tokens", "dtype", "shape", "data")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    loss: float
    tokens: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, loss: _Optional[float] = ..., tokens: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TrainStepRequest(_message.Message):
    __slots__ = ("job", "step", "progress")
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    job: str
    step: int
    progress: str
    def __init__(self, job: _Optional[str] = ..., step: _Optional[int] = ..., progress: _Optional[str] = ...) -> None: ...

class TrainStepReply(_message.Message):
    __slots__ = ("step", "peak_bytes", "compute_s", "name")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    step: int
    peak_bytes: int
    compute_s: float
    name: str
    def __init__(self, step: _Optional[int] = ..., peak_bytes: _Optional[int] = ..., compute_s: _Optional[float] = ..., name: _Optional[str] = ...) -> None: ...

class TrainSaveRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class TrainSaveReply(_message.Message):
    __slots__ = ("step", "tensors")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    step: int
    tensors: _containers.RepeatedCompositeFieldContainer[TrainTensor]
    def __init__(self, step: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TrainTensor, _Mapping]]] = ...) -> None: ...

class TrainCloseRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...
