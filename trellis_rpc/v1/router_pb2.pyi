from google.protobuf import struct_pb2 as _struct_pb2
from trellis_rpc.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunRequest(_message.Message):
    __slots__ = ("controller", "prompt", "sampling", "params", "model", "priority", "run_id", "stream_tokens")
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    controller: str
    prompt: _common_pb2.Prompt
    sampling: _common_pb2.SamplingParams
    params: _struct_pb2.Struct
    model: str
    priority: int
    run_id: str
    stream_tokens: bool
    def __init__(self, controller: _Optional[str] = ..., prompt: _Optional[_Union[_common_pb2.Prompt, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., model: _Optional[str] = ..., priority: _Optional[int] = ..., run_id: _Optional[str] = ..., stream_tokens: _Optional[bool] = ...) -> None: ...

class RunEvent(_message.Message):
    __slots__ = ("run_id", "elapsed_ms", "started", "progress", "delta", "intermediate", "result", "error")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    INTERMEDIATE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    elapsed_ms: float
    started: RunStarted
    progress: Progress
    delta: BranchDelta
    intermediate: Intermediate
    result: RunResult
    error: RunError
    def __init__(self, run_id: _Optional[str] = ..., elapsed_ms: _Optional[float] = ..., started: _Optional[_Union[RunStarted, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., delta: _Optional[_Union[BranchDelta, _Mapping]] = ..., intermediate: _Optional[_Union[Intermediate, _Mapping]] = ..., result: _Optional[_Union[RunResult, _Mapping]] = ..., error: _Optional[_Union[RunError, _Mapping]] = ...) -> None: ...

class RunStarted(_message.Message):
    __slots__ = ("controller", "params")
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    controller: str
    params: _struct_pb2.Struct
    def __init__(self, controller: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "message", "tasks_done", "tasks_total")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    TASKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    stage: str
    message: str
    tasks_done: int
    tasks_total: int
    def __init__(self, stage: _Optional[str] = ..., message: _Optional[str] = ..., tasks_done: _Optional[int] = ..., tasks_total: _Optional[int] = ...) -> None: ...

class BranchDelta(_message.Message):
    __slots__ = ("branch", "text", "token_count")
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    branch: str
    text: str
    token_count: int
    def __init__(self, branch: _Optional[str] = ..., text: _Optional[str] = ..., token_count: _Optional[int] = ...) -> None: ...

class Intermediate(_message.Message):
    __slots__ = ("kind", "branch", "answer", "value", "details")
    KIND_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    branch: str
    answer: str
    value: float
    details: _struct_pb2.Struct
    def __init__(self, kind: _Optional[str] = ..., branch: _Optional[str] = ..., answer: _Optional[str] = ..., value: _Optional[float] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("branch", "text", "answer", "score", "finish_reason")
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    branch: str
    text: str
    answer: str
    score: float
    finish_reason: _common_pb2.FinishReason
    def __init__(self, branch: _Optional[str] = ..., text: _Optional[str] = ..., answer: _Optional[str] = ..., score: _Optional[float] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ...) -> None: ...

class RunTimings(_message.Message):
    __slots__ = ("queue_ms", "ttft_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    ttft_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class RunResult(_message.Message):
    __slots__ = ("run_id", "controller", "answer", "text", "candidates", "details", "usage", "timings")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    controller: str
    answer: str
    text: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    details: _struct_pb2.Struct
    usage: _common_pb2.Usage
    timings: RunTimings
    def __init__(self, run_id: _Optional[str] = ..., controller: _Optional[str] = ..., answer: _Optional[str] = ..., text: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., timings: _Optional[_Union[RunTimings, _Mapping]] = ...) -> None: ...

class RunError(_message.Message):
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

class CancelRun(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("run", "cancel")
    RUN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    run: RunRequest
    cancel: CancelRun
    def __init__(self, run: _Optional[_Union[RunRequest, _Mapping]] = ..., cancel: _Optional[_Union[CancelRun, _Mapping]] = ...) -> None: ...

class ListControllersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ParamSpec(_message.Message):
    __slots__ = ("name", "type", "description", "default", "minimum", "maximum", "choices")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_FIELD_NUMBER: _ClassVar[int]
    MAXIMUM_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    description: str
    default: _struct_pb2.Value
    minimum: float
    maximum: float
    choices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., description: _Optional[str] = ..., default: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., minimum: _Optional[float] = ..., maximum: _Optional[float] = ..., choices: _Optional[_Iterable[str]] = ...) -> None: ...

class ControllerSpec(_message.Message):
    __slots__ = ("name", "description", "params")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    params: _containers.RepeatedCompositeFieldContainer[ParamSpec]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., params: _Optional[_Iterable[_Union[ParamSpec, _Mapping]]] = ...) -> None: ...

class ListControllersResponse(_message.Message):
    __slots__ = ("controllers", "models")
    CONTROLLERS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    controllers: _containers.RepeatedCompositeFieldContainer[ControllerSpec]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, controllers: _Optional[_Iterable[_Union[ControllerSpec, _Mapping]]] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "sampling", "model")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    prompt: _common_pb2.Prompt
    sampling: _common_pb2.SamplingParams
    model: str
    def __init__(self, prompt: _Optional[_Union[_common_pb2.Prompt, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...
