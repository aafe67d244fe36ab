"""What a request may ask for: the router's limits, lowered by the caller's auth entry where it has one."""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

from router.auth import ClientPolicy
from trellis_rpc.errors import StatusError
from trellis_rpc.sampling import DEFAULT_MAX_TOKENS
from trellis_rpc.v1 import common_pb2


def lowest(*limits: int | None) -> int:
    """The tightest of some limits (0 or None: no limit); 0 when none applies."""
    return min((x for x in limits if x), default=0)


@dataclass(frozen=True)
class RunLimits:
    """What one run of one client may do, checked as its controller starts tasks. 0: no limit."""

    max_n: int = 0            # samples per generate task
    max_tokens: int = 0       # per generate task
    max_tasks: int = 0        # tasks this run may start (bounds a search tree)


NO_LIMITS = RunLimits()


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, whoever asks (a client's auth entry may lower them). 0: no limit."""

    max_n: int = 64
    max_tokens: int = 0               # per generate task
    max_prompt_chars: int = 0         # the router has no tokenizer; workers check tokens against the context
    max_run_s: float = 0.0            # caps the client's deadline
    max_tasks_per_run: int = 0        # bounds a search's tree

    def max_n_for(self, client: ClientPolicy) -> int:
        return lowest(self.max_n, client.max_n)

    def max_tokens_for(self, client: ClientPolicy) -> int:
        return lowest(self.max_tokens, client.max_tokens)

    def for_run(self, client: ClientPolicy) -> RunLimits:
        return RunLimits(max_n=self.max_n_for(client), max_tokens=self.max_tokens_for(client),
                         max_tasks=self.max_tasks_per_run)

    def deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        """The run's deadline (time.monotonic()): the client's, capped by max_run_s."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        if self.max_run_s:
            cap = time.monotonic() + self.max_run_s
            deadline = cap if deadline is None else min(deadline, cap)
        return deadline

    def check_amounts(self, prompt: common_pb2.Prompt, sampling: common_pb2.SamplingParams, prefix: str,
                      client: ClientPolicy) -> None:
        """Prompt size and max_tokens against the router's limits and the client's."""
        if self.max_prompt_chars:
            kind = prompt.WhichOneof("kind")
            size = (len(prompt.text) if kind == "text" else len(prompt.token_ids.ids) if kind == "token_ids"
                    else sum(len(m.content) for m in prompt.chat.messages))
            if size > self.max_prompt_chars:
                raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"{prefix}prompt: {size} characters (or tokens), "
                                  f"more than this router's limit of {self.max_prompt_chars}", f"{prefix}prompt")
        cap = self.max_tokens_for(client)
        asked = sampling.max_tokens if sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS
        if cap and asked > cap:
            field = f"{prefix}sampling.max_tokens"
            code = grpc.StatusCode.PERMISSION_DENIED if client.max_tokens == cap else grpc.StatusCode.INVALID_ARGUMENT
            who = f"client {client.name!r}" if code == grpc.StatusCode.PERMISSION_DENIED else "this router"
            raise StatusError(code, f"{field}: {asked} is over {who}'s limit of {cap}"
                                    + ("" if sampling.HasField("max_tokens") else " (the default; set max_tokens)"),
                              field)
