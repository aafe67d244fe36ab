"""What one upstream request sends as its prompt, and the sequences kept for later continuation.

Controllers continue partial text (Dynasor's probes, the searches' steps), which only the completions API
does faithfully: so text goes to /completions as is, and a chat is rendered by the model's own chat template
(--tokenizer) into text for /completions too. Without a tokenizer a chat goes to /chat/completions, and its
continuation needs the upstream's continue_final_message (vLLM, SGLang).

An OpenAI API keeps no state, so a kept sequence is its prompt plus its text, re-sent on continue or fork;
an upstream with a prefix cache (vLLM, SGLang) finds the shared prefix there and does not prefill it again.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, replace

from trellis_rpc.errors import invalid, not_found
from worker_runtime.engine_api import PromptInput


@dataclass(frozen=True)
class UpstreamPrompt:
    """Exactly one of text, token_ids (both /completions) or messages (/chat/completions)."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: tuple[dict[str, str], ...] | None = None
    continue_final: bool = False   # messages: the last (assistant) message is continued, not answered

    @property
    def chat(self) -> bool:
        return self.messages is not None

    def extended(self, text: str, tokenizer=None) -> UpstreamPrompt:
        """This prompt followed by `text` (what was generated, or what a continuation appends)."""
        if not text:
            return self
        if self.text is not None:
            return replace(self, text=self.text + text)
        if self.token_ids is not None:
            if tokenizer is None:
                raise invalid("prompt.token_ids", "continuing a token-id prompt with text needs --tokenizer on "
                                                  "this worker")
            return UpstreamPrompt(text=tokenizer.decode(list(self.token_ids)) + text)
        messages = list(self.messages)
        if self.continue_final:
            last = messages[-1]
            messages[-1] = {"role": last["role"], "content": last["content"] + text}
        else:
            messages.append({"role": "assistant", "content": text})
        return UpstreamPrompt(messages=tuple(messages), continue_final=True)

    def body(self) -> dict:
        if self.messages is not None:
            return {"messages": list(self.messages)}
        return {"prompt": self.text if self.text is not None else list(self.token_ids)}


def render(prompt: PromptInput, tokenizer=None) -> UpstreamPrompt:
    """A task's prompt as the upstream will see it."""
    if prompt.token_ids is not None:
        return UpstreamPrompt(token_ids=tuple(prompt.token_ids))
    if prompt.chat is None:
        return UpstreamPrompt(text=prompt.text or "")
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return UpstreamPrompt(text=tokenizer.apply_chat_template(
            prompt.chat, tokenize=False, add_generation_prompt=not prompt.continue_final_message,
            continue_final_message=prompt.continue_final_message))
    return UpstreamPrompt(messages=tuple(dict(m) for m in prompt.chat), continue_final=prompt.continue_final_message)


def appended_text(prompt: PromptInput) -> str:
    """What a continuation or fork adds to its kept sequence: text (a chat cannot be appended)."""
    if prompt.chat is not None:
        raise invalid("prompt.chat", "a continuation or fork appends text, not a chat")
    if prompt.token_ids:
        raise invalid("prompt.token_ids", "this worker keeps sequences as text: a continuation appends text")
    return prompt.text or ""


@dataclass
class _Kept:
    prompt: UpstreamPrompt
    expires: float


class KeptPrompts:
    """Finished samples kept under handles '<task_id>/<index>' until their TTL, a continuation using them up,
    or the router releasing their run. Bounded: beyond `capacity` the oldest goes first."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._kept: collections.OrderedDict[str, _Kept] = collections.OrderedDict()

    def keep(self, handle: str, prompt: UpstreamPrompt, ttl_s: float) -> None:
        self._tidy()
        self._kept.pop(handle, None)
        self._kept[handle] = _Kept(prompt, time.monotonic() + ttl_s)
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)

    def get(self, handle: str) -> UpstreamPrompt:
        """The kept prompt; NOT_FOUND naming generate.source when there is none."""
        self._tidy()
        kept = self._kept.get(handle)
        if kept is None:
            raise not_found(f"generate.source: no kept sequence {handle!r} (expired, used up or never kept)",
                            "generate.source")
        return kept.prompt

    def use_up(self, handle: str) -> None:
        """A continuation took the sequence over: the handle is gone (a fork leaves it)."""
        self._kept.pop(handle, None)

    def release(self, task_prefix: str) -> None:
        prefix = task_prefix + "/"
        for handle in [h for h in self._kept if h.startswith(prefix)]:
            del self._kept[handle]

    def __len__(self) -> int:
        return len(self._kept)

    def _tidy(self) -> None:
        now = time.monotonic()
        for handle in [h for h, k in self._kept.items() if k.expires <= now]:
            del self._kept[handle]
