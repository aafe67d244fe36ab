"""Prompt -> token ids, and token-id checks, for any engine with a Hugging Face-style tokenizer
(the CPU engine's and TensorRT-LLM's both have one: the same prompt must mean the same ids on either)."""

from __future__ import annotations

from collections.abc import Iterable

from trellis_rpc.errors import invalid
from worker_runtime.engine_api import PromptInput


def check_token_ids(ids: Iterable[int], vocab: int, field: str) -> None:
    """INVALID_ARGUMENT naming field when an id is outside the vocabulary: an engine would index past its logits."""
    bad = [t for t in ids if t >= vocab]
    if bad:
        raise invalid(field, f"token id {bad[0]} is outside the vocabulary (size {vocab})")


def encode_prompt(tokenizer, prompt: PromptInput, vocab: int) -> list[int]:
    """Token ids as given (checked), a chat through the model's template, or text with special tokens."""
    if prompt.token_ids is not None:
        check_token_ids(prompt.token_ids, vocab, "prompt.token_ids.ids")
        return list(prompt.token_ids)
    if prompt.chat is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise invalid("prompt.chat", "this model has no chat template; send prompt.text instead")
        text = tokenizer.apply_chat_template(
            prompt.chat, tokenize=False, add_generation_prompt=not prompt.continue_final_message,
            continue_final_message=prompt.continue_final_message)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt.text)["input_ids"]
