"""Validation of SamplingParams: one place, used by the router at the edge and by every worker."""

from __future__ import annotations

import math
from dataclasses import dataclass

from trellis_rpc.errors import invalid
from trellis_rpc.v1 import common_pb2

DEFAULT_MAX_TOKENS = 256
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
_SEED_MODULUS = 2**63
_SEED_MULTIPLIER = 1_000_003


def derive_seed(seed: int, *salts: int) -> int:
    """A seed for one part of a seeded request (a task of a run, a resumed sample, a sample of a task),
    reproducible from the client's seed and the part's numbers, and different for different numbers:
    parts drawing from the client's seed itself would all draw the same tokens."""
    for salt in salts:
        seed = (seed * _SEED_MULTIPLIER + salt) % _SEED_MODULUS
    return seed


@dataclass(frozen=True)
class SamplingConfig:
    """SamplingParams with defaults applied and every value checked."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = DEFAULT_MAX_TOKENS
    min_tokens: int = 0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _float(p: common_pb2.SamplingParams, name: str, prefix: str, default: float, lo: float, hi: float,
           lo_open: bool = False) -> float:
    if not p.HasField(name):
        return default
    value = getattr(p, name)
    where = f"{prefix}.{name}"
    if math.isnan(value) or math.isinf(value):
        raise invalid(where, f"must be a finite number, got {value}")
    if value < lo or (lo_open and value == lo) or value > hi:
        bracket = "(" if lo_open else "["
        raise invalid(where, f"must be in {bracket}{lo:g}, {hi:g}], got {value:g}")
    return float(value)


def _int(p: common_pb2.SamplingParams, name: str, prefix: str, default: int | None, lo: int,
         hi: int | None = None) -> int | None:
    if not p.HasField(name):
        return default
    value = getattr(p, name)
    where = f"{prefix}.{name}"
    if value < lo:
        raise invalid(where, f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise invalid(where, f"must be <= {hi}, got {value}")
    return int(value)


def resolve_sampling(p: common_pb2.SamplingParams, *, max_n: int | None = None,
                     prefix: str = "sampling") -> SamplingConfig:
    """Apply defaults and check ranges; raises StatusError(INVALID_ARGUMENT) naming the field."""
    temperature = _float(p, "temperature", prefix, 1.0, 0.0, 100.0)
    top_p = _float(p, "top_p", prefix, 1.0, 0.0, 1.0, lo_open=True)
    min_p = _float(p, "min_p", prefix, 0.0, 0.0, 1.0)
    top_k = _int(p, "top_k", prefix, 0, 0)
    max_tokens = _int(p, "max_tokens", prefix, DEFAULT_MAX_TOKENS, 1)
    min_tokens = _int(p, "min_tokens", prefix, 0, 0)
    if min_tokens > max_tokens:
        raise invalid(f"{prefix}.min_tokens", f"must be <= max_tokens ({max_tokens}), got {min_tokens}")
    n = _int(p, "n", prefix, 1, 1, max_n)
    logprobs = _int(p, "logprobs", prefix, None, 0, MAX_LOGPROBS)
    frequency_penalty = _float(p, "frequency_penalty", prefix, 0.0, -2.0, 2.0)
    presence_penalty = _float(p, "presence_penalty", prefix, 0.0, -2.0, 2.0)
    repetition_penalty = _float(p, "repetition_penalty", prefix, 1.0, 0.0, 10.0, lo_open=True)
    if len(p.stop) > MAX_STOP_STRINGS:
        raise invalid(f"{prefix}.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(p.stop)}")
    for i, s in enumerate(p.stop):
        if not s:
            raise invalid(f"{prefix}.stop[{i}]", "must not be empty")
        if len(s) > MAX_STOP_STRING_CHARS:
            raise invalid(f"{prefix}.stop[{i}]", f"longer than {MAX_STOP_STRING_CHARS} characters")
    for i, t in enumerate(p.stop_token_ids):
        if t < 0:
            raise invalid(f"{prefix}.stop_token_ids[{i}]", f"must be >= 0, got {t}")
    return SamplingConfig(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        max_tokens=max_tokens, min_tokens=min_tokens, n=n,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids),
        frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        repetition_penalty=repetition_penalty, logprobs=logprobs, ignore_eos=p.ignore_eos,
    )


def check_prompt(prompt: common_pb2.Prompt, field: str = "prompt") -> None:
    """A prompt must say something: empty text, chat or token list is rejected."""
    kind = prompt.WhichOneof("kind")
    if kind is None:
        raise invalid(field, "must be set (text, chat or token_ids)")
    if kind == "text" and not prompt.text.strip():
        raise invalid(f"{field}.text", "must not be empty")
    if kind == "chat":
        if not prompt.chat.messages:
            raise invalid(f"{field}.chat.messages", "must not be empty")
        for i, m in enumerate(prompt.chat.messages):
            if not m.role:
                raise invalid(f"{field}.chat.messages[{i}].role", "must not be empty")
        if not any(m.content.strip() for m in prompt.chat.messages):
            raise invalid(f"{field}.chat.messages", "every message is empty")
    if kind == "token_ids":
        if not prompt.token_ids.ids:
            raise invalid(f"{field}.token_ids.ids", "must not be empty")
        if any(t < 0 for t in prompt.token_ids.ids):
            raise invalid(f"{field}.token_ids.ids", "token ids must be >= 0")
