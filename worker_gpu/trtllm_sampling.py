"""Trellis sampling parameters -> TensorRT-LLM's SamplingParams, every field accounted for.

TensorRT-LLM's own scaffolding worker maps max_tokens, temperature, top_p, top_k, logprobs and
ignore_eos and silently drops the rest (stop strings, seed, n, penalties, min_tokens...). Here each
field of trellis_rpc.sampling.SamplingConfig is either passed on with the same meaning or the task is
rejected with INVALID_ARGUMENT naming the field. Written against TensorRT-LLM 1.2/1.3
(`tensorrt_llm/executor/params/sampling.py`, formerly `tensorrt_llm/sampling_params.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from trellis_rpc.errors import invalid
from trellis_rpc.sampling import SamplingConfig

# TensorRT-LLM refuses n > 1 under greedy decoding unless this is set; Trellis allows it (n identical
# samples, as the CPU engine gives), so the worker sets it before tensorrt_llm is imported.
ALLOW_N_GREEDY = "TLLM_ALLOW_N_GREEDY_DECODING"


def allow_greedy_n() -> None:
    os.environ.setdefault(ALLOW_N_GREEDY, "1")


@dataclass(frozen=True)
class Support:
    """What the installed TensorRT-LLM's PyTorch backend honours beyond the basics."""

    min_p: bool            # TorchSampler applies min_p only since PR #16590 (1.3 line); earlier it was ignored

    @classmethod
    def of(cls, version: str) -> Support:
        return cls(min_p=_version_tuple(version) >= (1, 3))


def _version_tuple(version: str) -> tuple[int, int]:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def trtllm_kwargs(cfg: SamplingConfig, support: Support) -> dict:
    """Keyword arguments for tensorrt_llm.SamplingParams. Raises StatusError(INVALID_ARGUMENT) for a field
    the engine would not honour."""
    if cfg.min_p > 0 and not support.min_p:
        raise invalid("sampling.min_p", "this worker's TensorRT-LLM (before 1.3) does not apply min_p on its "
                                        "PyTorch backend; leave min_p unset or use a CPU worker")
    kwargs: dict = {
        "max_tokens": cfg.max_tokens,
        "n": cfg.n,
        "best_of": cfg.n,
        # temperature 0 is TensorRT-LLM's greedy decoding too.
        "temperature": cfg.temperature,
        "top_k": cfg.top_k or None,        # Trellis 0 = off; TensorRT-LLM None = off
        "top_p": cfg.top_p,
        "seed": cfg.seed,
        "stop": list(cfg.stop) or None,
        "include_stop_str_in_output": False,   # Trellis text ends before the stop string
        "stop_token_ids": list(cfg.stop_token_ids) or None,
        "min_tokens": cfg.min_tokens or None,
        "repetition_penalty": cfg.repetition_penalty,
        "presence_penalty": cfg.presence_penalty,
        "frequency_penalty": cfg.frequency_penalty,
        "ignore_eos": cfg.ignore_eos,
        "detokenize": True,
        "skip_special_tokens": True,
    }
    if cfg.min_p > 0:
        kwargs["min_p"] = cfg.min_p
    if cfg.logprobs is not None:
        # Trellis logprobs=K: the sampled token's logprob plus the top K. TensorRT-LLM 1.2 returns nothing
        # for 0, so ask for at least one and keep K alternatives.
        kwargs["logprobs"] = max(1, cfg.logprobs)
    return kwargs
