"""Mirrors tensorrt_llm/tokenizer/tokenizer.py: TransformersTokenizer, the LLM's default tokenizer, a thin
wrapper over a Hugging Face tokenizer (`.tokenizer` is the raw one). Streaming detokenization uses the
`tokenizers` DecodeStream, the real default (TLLM_INCREMENTAL_DETOKENIZATION_BACKEND="HF")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase


class TokenizerBase:
    """The tokenizer protocol (upstream it subclasses PreTrainedTokenizerBase; here a plain base)."""


class TransformersTokenizer(TokenizerBase):
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._all_special_tokens_set = set(tokenizer.all_special_tokens)

    def __call__(self, text: str, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer(text, *args, **kwargs)

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def name_or_path(self) -> str:
        return self.tokenizer.name_or_path

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(text, *args, **kwargs)

    def decode(self, token_ids: list[int], *args: Any, **kwargs: Any) -> str:
        # transformers 5 rejects spaces_between_special_tokens on fast tokenizers; it only matters for
        # slow tokenizers with added vocabulary.
        kwargs.pop("spaces_between_special_tokens", None)
        return self.tokenizer.decode(token_ids, *args, **kwargs)

    def batch_encode_plus(self, texts: list[str], *args: Any, **kwargs: Any) -> dict:
        return self.tokenizer(texts, *args, **kwargs)

    def get_chat_template(self, chat_template: str | None = None, tools: list[dict] | None = None) -> str:
        return self.tokenizer.get_chat_template(chat_template, tools)

    def apply_chat_template(self, conversation: list[dict[str, str]] | list[list[dict[str, str]]], *args: Any,
                            **kwargs: Any) -> str | list[int] | list[str] | list[list[int]]:
        return self.tokenizer.apply_chat_template(conversation, *args, **kwargs)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.tokenizer})"

    def __len__(self) -> int:
        return len(self.tokenizer)

    @classmethod
    def from_pretrained(cls, pretrained_model_dir: str, **kwargs: Any) -> TransformersTokenizer:
        return cls(AutoTokenizer.from_pretrained(pretrained_model_dir, **kwargs))

    def save_pretrained(self, pretrained_model_dir: str, **kwargs: Any) -> None:
        self.tokenizer.save_pretrained(pretrained_model_dir, **kwargs)

    def clean_up_tokenization(self, out_string: str) -> str:
        return self.tokenizer.clean_up_tokenization(out_string)

    @property
    def clean_up_tokenization_spaces(self) -> bool:
        return bool(getattr(self.tokenizer, "clean_up_tokenization_spaces", False))

    @property
    def is_fast(self) -> bool:
        return self.tokenizer.is_fast

    def get_added_vocab(self) -> dict[str, int]:
        return self.tokenizer.get_added_vocab()

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | list[str]:
        return self.tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)

    def decode_incrementally(self, token_ids: list[int], prev_text: str | None = None, states: dict | None = None,
                             *, flush: bool = False, skip_special_tokens: bool = False,
                             clean_up_tokenization_spaces: bool | None = None,
                             spaces_between_special_tokens: bool = True,
                             stream_interval: int = 1) -> tuple[str, dict]:
        """Appends the text of `token_ids` to `prev_text`; `states` carries the DecodeStream, which holds
        back bytes of an incomplete character until it completes."""
        from tokenizers.decoders import DecodeStream

        if states is None:
            states = {"decode_stream": DecodeStream(skip_special_tokens=skip_special_tokens)}
        stream = states["decode_stream"]
        pieces = [piece for tid in token_ids if (piece := stream.step(self.tokenizer._tokenizer, tid)) is not None]
        new_text = "".join(pieces)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            new_text = self.clean_up_tokenization(new_text)
        return (new_text if prev_text is None else prev_text + new_text), states


def tokenizer_factory(obj: str | Path | PreTrainedTokenizerBase | TokenizerBase | None = None,
                      **kwargs: Any) -> TokenizerBase | None:
    if obj is None:
        return None
    if isinstance(obj, (str, Path)):
        default_kwargs = {"legacy": False, "padding_side": "left", "truncation_side": "left",
                          "trust_remote_code": True, "use_fast": True}
        default_kwargs.update(kwargs)
        return TransformersTokenizer.from_pretrained(str(obj), **default_kwargs)
    if isinstance(obj, TokenizerBase):
        return obj
    if isinstance(obj, PreTrainedTokenizerBase):
        return TransformersTokenizer(obj)
    raise TypeError(f"Unrecognized tokenizer {obj}")


def load_hf_tokenizer(model_dir: str, trust_remote_code: bool = True, use_fast: bool = True,
                      **kwargs: Any) -> TransformersTokenizer | None:
    try:
        return TransformersTokenizer.from_pretrained(model_dir, legacy=False, padding_side="left",
                                                     truncation_side="left", trust_remote_code=trust_remote_code,
                                                     use_fast=use_fast, **kwargs)
    except Exception:
        return None
