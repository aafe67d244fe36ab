"""Mirrors tensorrt_llm/llmapi/llm_args.py @1f064c46: KvCacheConfig, SchedulerConfig and TorchLlmArgs.

Upstream these are pydantic models with extra="forbid"; here they are keyword-only dataclasses whose
constructor refuses unknown fields with a ValueError (pydantic's ValidationError is a ValueError too) and
checks the documented ranges."""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal


def _strict(cls: type) -> type:
    """Refuse unknown keyword arguments with a ValueError naming them, like extra="forbid"."""
    init = cls.__init__
    names = {f.name for f in dataclasses.fields(cls) if f.init}

    @functools.wraps(init)
    def __init__(self: Any, **kwargs: Any) -> None:
        extra = sorted(set(kwargs) - names)
        if extra:
            raise ValueError(f"{cls.__name__}: extra inputs are not permitted: {extra}")
        init(self, **kwargs)

    cls.__init__ = __init__
    cls.model_fields = {name: None for name in names}
    return cls


class _ConfigBase:
    model_fields: ClassVar[dict[str, None]]

    def model_dump(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class CapacitySchedulerPolicy(enum.StrEnum):
    MAX_UTILIZATION = "MAX_UTILIZATION"
    GUARANTEED_NO_EVICT = "GUARANTEED_NO_EVICT"
    STATIC_BATCH = "STATIC_BATCH"


class ContextChunkingPolicy(enum.StrEnum):
    FIRST_COME_FIRST_SERVED = "FIRST_COME_FIRST_SERVED"
    EQUAL_PROGRESS = "EQUAL_PROGRESS"


class WaitingQueuePolicy(enum.StrEnum):
    FCFS = "fcfs"


@_strict
@dataclass(kw_only=True)
class KvCacheConfig(_ConfigBase):
    """KV cache settings. The double keeps block bookkeeping only (for iteration stats and admission):
    capacity = max_tokens, or free_gpu_memory_fraction x 65536 tokens standing in for GPU memory."""

    enable_block_reuse: bool = True
    max_tokens: int | None = None
    max_attention_window: list[int] | None = None
    sink_token_length: int | None = None
    free_gpu_memory_fraction: float | None = 0.9
    host_cache_size: int | None = None
    disk_cache_size: int | None = None
    disk_cache_path: str | None = None
    cross_kv_cache_fraction: float | None = None
    secondary_offload_min_priority: int | None = None
    event_buffer_max_size: int = 0
    attention_dp_events_gather_period_ms: int = 5
    enable_partial_reuse: bool = True
    copy_on_partial_reuse: bool = True
    use_uvm: bool = False
    max_gpu_total_bytes: int = 0
    iteration_stats_interval: int = 1
    tokens_per_block: int = 32
    dtype: str = "auto"
    mamba_ssm_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        f = self.free_gpu_memory_fraction
        if f is not None and not 0 <= f <= 1:
            raise ValueError(f"free_gpu_memory_fraction must be in [0, 1], got {f}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.tokens_per_block <= 0:
            raise ValueError(f"tokens_per_block must be positive, got {self.tokens_per_block}")
        if self.event_buffer_max_size < 0:
            raise ValueError(f"event_buffer_max_size must be >= 0, got {self.event_buffer_max_size}")


@_strict
@dataclass(kw_only=True)
class SchedulerConfig(_ConfigBase):
    capacity_scheduler_policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    context_chunking_policy: ContextChunkingPolicy | None = None
    dynamic_batch_config: Any | None = None
    waiting_queue_policy: WaitingQueuePolicy = WaitingQueuePolicy.FCFS
    use_python_scheduler: bool = False
    enable_prefix_aware_scheduling: bool = True

    def __post_init__(self) -> None:
        self.capacity_scheduler_policy = CapacitySchedulerPolicy(self.capacity_scheduler_policy)
        if self.context_chunking_policy is not None:
            self.context_chunking_policy = ContextChunkingPolicy(self.context_chunking_policy)
        self.waiting_queue_policy = WaitingQueuePolicy(self.waiting_queue_policy)


# Sizes whose None means "the default" (TorchLlmArgs normalises them back).
_SIZE_DEFAULTS = {"max_batch_size": 2048, "max_num_tokens": 8192, "max_input_len": 1024, "max_beam_width": 1}


@_strict
@dataclass(kw_only=True)
class TorchLlmArgs(_ConfigBase):
    """The LLM's parsed arguments (`llm.args`). Fields the double accepts but does not act on are marked
    "accepted"; unknown ones are refused by the LLM before this class is built."""

    model: str
    tokenizer: Any = None
    tokenizer_mode: Literal["auto", "slow"] = "auto"
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    context_parallel_size: int = 1
    dtype: str = "auto"
    revision: str | None = None
    tokenizer_revision: str | None = None
    backend: Literal["pytorch"] = "pytorch"

    max_batch_size: int | None = 2048
    max_num_tokens: int | None = 8192
    max_seq_len: int | None = None
    max_input_len: int | None = 1024
    max_beam_width: int | None = 1

    kv_cache_config: KvCacheConfig = field(default_factory=KvCacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    enable_chunked_prefill: bool = False
    gather_generation_logits: bool = False
    disable_overlap_scheduler: bool = False
    return_perf_metrics: bool = False
    encode_only: bool | None = None
    enable_iter_perf_stats: bool = False
    enable_iter_req_stats: bool = False
    max_stats_len: int = 1000
    stream_interval: int = 1
    generation_config: Literal["trtllm", "auto"] = "trtllm"
    reasoning_parser: str | None = None
    num_postprocess_workers: int = 0
    postprocess_tokenizer_dir: str | None = None
    orchestrator_type: Literal["ray", "rpc"] | None = None
    env_overrides: dict[str, str] | None = None
    # Accepted (the real field exists; the double has nothing to do with it).
    cuda_graph_config: Any = None
    attn_backend: str = "TRTLLM"
    moe_config: Any = None
    speculative_config: Any = None
    lora_config: Any = None
    enable_attention_dp: bool = False
    print_iter_log: bool = False
    torch_compile_config: Any = None
    checkpoint_format: str | None = None
    load_format: str | int = "auto"
    batched_logits_processor: Any = None
    post_processor_hook: str | None = None
    garbage_collection_gen0_threshold: int = 20000

    def __post_init__(self) -> None:
        for name, default in _SIZE_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
            elif getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_seq_len is not None and self.max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {self.max_seq_len}")
        if self.kv_cache_config is None:
            self.kv_cache_config = KvCacheConfig()
        elif isinstance(self.kv_cache_config, dict):
            self.kv_cache_config = KvCacheConfig(**self.kv_cache_config)
        elif not isinstance(self.kv_cache_config, KvCacheConfig):
            raise ValueError(f"kv_cache_config must be a KvCacheConfig or a dict, got {type(self.kv_cache_config)}")
        if self.scheduler_config is None:
            self.scheduler_config = SchedulerConfig()
        elif isinstance(self.scheduler_config, dict):
            self.scheduler_config = SchedulerConfig(**self.scheduler_config)
        elif not isinstance(self.scheduler_config, SchedulerConfig):
            raise ValueError(f"scheduler_config must be a SchedulerConfig or a dict, "
                             f"got {type(self.scheduler_config)}")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        if self.generation_config not in ("trtllm", "auto"):
            raise ValueError(f"generation_config must be 'trtllm' or 'auto', got {self.generation_config!r}")
        if self.tensor_parallel_size != 1 or self.pipeline_parallel_size != 1 or self.context_parallel_size != 1:
            raise ValueError("the tensorrt_llm test double runs on one device: parallel sizes must be 1")
