from trellis_rpc.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "model_id", "capabilities", "engine", "max_context_tokens", "max_batch_size", "kv_block_size", "kv_blocks_total", "version", "eos_token")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    model_id: str
    capabilities: _containers.RepeatedScalarFieldContainer[_common_pb2.Capability]
    engine: str
    max_context_tokens: int
    max_batch_size: int
    kv_block_size: int
    kv_blocks_total: int
    version: str
    eos_token: str
    def __init__(self, worker_id: _Optional[str] = ..., model_id: _Optional[str] = ..., capabilities: _Optional[_Iterable[_Union[_common_pb2.Capability, str]]] = ..., engine: _Optional[str] = ..., max_context_tokens: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., version: _Optional[str] = ..., eos_token: _Optional[str] = ...) -> None: ...

class WorkerRequest(_message.Message):
    __slots__ = ("task_id", "trace_context", "timeout_ms", "run", "generate", "score", "cancel", "release")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    trace_context: _containers.ScalarMap[str, str]
    timeout_ms: int
    run: RunContext
    generate: GenerateTask
    score: ScoreTask
    cancel: CancelTask
    release: ReleaseSequences
    def __init__(self, task_id: _Optional[str] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., timeout_ms: _Optional[int] = ..., run: _Optional[_Union[RunContext, _Mapping]] = ..., generate: _Optional[_Union[GenerateTask, _Mapping]] = ..., score: _Optional[_Union[ScoreTask, _Mapping]] = ..., cancel: _Optional[_Union[CancelTask, _Mapping]] = ..., release: _Optional[_Union[ReleaseSequences, _Mapping]] = ...) -> None: ...

class RunContext(_message.Message):
    __slots__ = ("run_id", "priority", "tokens", "tasks_done")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    priority: int
    tokens: int
    tasks_done: int
    def __init__(self, run_id: _Optional[str] = ..., priority: _Optional[int] = ..., tokens: _Optional[int] = ..., tasks_done: _Optional[int] = ...) -> None: ...

class SequenceRef(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: str
    def __init__(self, handle: _Optional[str] = ...) -> None: ...

class KeepSequence(_message.Message):
    __slots__ = ("keep", "ttl_ms")
    KEEP_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    keep: bool
    ttl_ms: int
    def __init__(self, keep: _Optional[bool] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class GenerateTask(_message.Message):
    __slots__ = ("prompt", "sampling", "stream", "continue_from", "fork_from", "keep", "branch")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_FROM_FIELD_NUMBER: _ClassVar[int]
    FORK_FROM_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    prompt: _common_pb2.Prompt
    sampling: _common_pb2.SamplingParams
    stream: bool
    continue_from: SequenceRef
    fork_from: SequenceRef
    keep: KeepSequence
    branch: str
    def __init__(self, prompt: _Optional[_Union[_common_pb2.Prompt, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., stream: _Optional[bool] = ..., continue_from: _Optional[_Union[SequenceRef, _Mapping]] = ..., fork_from: _Optional[_Union[SequenceRef, _Mapping]] = ..., keep: _Optional[_Union[KeepSequence, _Mapping]] = ..., branch: _Optional[str] = ...) -> None: ...

class ScoreTask(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: _common_pb2.ScoreRequest
    def __init__(self, request: _Optional[_Union[_common_pb2.ScoreRequest, _Mapping]] = ...) -> None: ...

class CancelTask(_message.Message):
    __slots__ = ("target_task_id",)
    TARGET_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    target_task_id: str
    def __init__(self, target_task_id: _Optional[str] = ...) -> None: ...

class ReleaseSequences(_message.Message):
    __slots__ = ("task_prefix",)
    TASK_PREFIX_FIELD_NUMBER: _ClassVar[int]
    task_prefix: str
    def __init__(self, task_prefix: _Optional[str] = ...) -> None: ...

class WorkerResponse(_message.Message):
    __slots__ = ("task_id", "delta", "generate_result", "score_result", "error", "load")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    GENERATE_RESULT_FIELD_NUMBER: _ClassVar[int]
    SCORE_RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    delta: TokenDelta
    generate_result: _common_pb2.GenerateResult
    score_result: _common_pb2.ScoreResult
    error: TaskError
    load: LoadReport
    def __init__(self, task_id: _Optional[str] = ..., delta: _Optional[_Union[TokenDelta, _Mapping]] = ..., generate_result: _Optional[_Union[_common_pb2.GenerateResult, _Mapping]] = ..., score_result: _Optional[_Union[_common_pb2.ScoreResult, _Mapping]] = ..., error: _Optional[_Union[TaskError, _Mapping]] = ..., load: _Optional[_Union[LoadReport, _Mapping]] = ...) -> None: ...

class TokenDelta(_message.Message):
    __slots__ = ("index", "text", "token_ids", "logprobs", "finish_reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    finish_reason: _common_pb2.FinishReason
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ...) -> None: ...

class TaskError(_message.Message):
    __slots__ = ("code", "message", "field", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    field: str
    reason: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., field: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("queue_depth", "running_sequences", "kv_blocks_used", "kv_blocks_free", "model_id", "capabilities", "timestamp_unix", "kept_sequences")
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_FIELD_NUMBER: _ClassVar[int]
    KEPT_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    queue_depth: int
    running_sequences: int
    kv_blocks_used: int
    kv_blocks_free: int
    model_id: str
    capabilities: _containers.RepeatedScalarFieldContainer[_common_pb2.Capability]
    timestamp_unix: float
    kept_sequences: int
    def __init__(self, queue_depth: _Optional[int] = ..., running_sequences: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., model_id: _Optional[str] = ..., capabilities: _Optional[_Iterable[_Union[_common_pb2.Capability, str]]] = ..., timestamp_unix: _Optional[float] = ..., kept_sequences: _Optional[int] = ...) -> None: ...
