"""Moving a generate task off a worker that failed mid-stream (Dynamo calls it request migration).

gRPC's retry policy cannot retry a stream that has already answered, so the router does it: it
remembers what each sample streamed, and when the worker's link breaks, sends every sample that had
not finished to another worker as its prompt plus the text so far, for the tokens it still had to
generate. Finished samples stay as they were. The client sees one uninterrupted stream per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trellis_rpc.v1 import common_pb2, worker_pb2


@dataclass
class SampleSoFar:
    """What one sample of a task has streamed, across every worker it ran on."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED   # set by its last delta or its result
    stop_reason: str = ""
    cumulative_logprob: float = 0.0
    handle: str = ""

    def add(self, delta: worker_pb2.TokenDelta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason

    @property
    def finished(self) -> bool:
        return self.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


def continued_prompt(prompt: common_pb2.Prompt, sample: SampleSoFar) -> common_pb2.Prompt:
    """The prompt with the sample's output so far as the start of the answer."""
    kind = prompt.WhichOneof("kind")
    if kind == "token_ids":
        return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[*prompt.token_ids.ids, *sample.token_ids]))
    if kind == "chat":
        chat = common_pb2.ChatMessages()
        chat.CopyFrom(prompt.chat)
        last = chat.messages[-1] if chat.messages else None
        if chat.continue_final_message and last is not None and last.role == "assistant":
            last.content += sample.text
        else:
            chat.messages.append(common_pb2.ChatMessage(role="assistant", content=sample.text))
        chat.continue_final_message = True
        return common_pb2.Prompt(chat=chat)
    return common_pb2.Prompt(text=prompt.text + sample.text)


def continuation(task: worker_pb2.GenerateTask, sample: SampleSoFar, max_tokens: int,
                 attempt: int) -> worker_pb2.GenerateTask:
    """One sample of `task`, resumed: n=1, the tokens it has left, a seed of its own."""
    resumed = worker_pb2.GenerateTask()
    resumed.CopyFrom(task)
    resumed.prompt.CopyFrom(continued_prompt(task.prompt, sample))
    resumed.sampling.n = 1
    resumed.sampling.max_tokens = max(1, max_tokens - len(sample.token_ids))
    if resumed.sampling.HasField("min_tokens"):
        resumed.sampling.min_tokens = max(0, resumed.sampling.min_tokens - len(sample.token_ids))
    if resumed.sampling.HasField("seed"):
        resumed.sampling.seed = (resumed.sampling.seed + 104_729 * attempt + len(sample.token_ids)) % 2**63
    return resumed


def merged_result(samples: list[SampleSoFar], prompt_tokens: int, cached: int, model_id: str,
                  worker_ids: list[str]) -> common_pb2.GenerateResult:
    completions = [
        common_pb2.Completion(index=i, text=s.text, token_ids=s.token_ids, finish_reason=s.finish_reason,
                              stop_reason=s.stop_reason, logprobs=s.logprobs, cumulative_logprob=s.cumulative_logprob)
        for i, s in enumerate(samples)
    ]
    usage = common_pb2.Usage(prompt_tokens=prompt_tokens, cached_prompt_tokens=cached,
                             completion_tokens=sum(len(s.token_ids) for s in samples), tasks=1)
    return common_pb2.GenerateResult(completions=completions, usage=usage, model_id=model_id,
                                     worker_id=",".join(dict.fromkeys(w for w in worker_ids if w)),
                                     sequence_handles=[s.handle for s in samples] if any(s.handle for s in samples)
                                     else [])
