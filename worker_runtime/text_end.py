"""The end of a sequence's text: no character that the sequence cut short.

A sequence can end (max_tokens, a stop token or string, a cancel) between the bytes of one UTF-8 character, and
decoders render such bytes as U+FFFD, a character the model never wrote. So at the end of a sequence those bytes are
not emitted as text; its token ids still carry them. A U+FFFD the model did produce stays: one followed by more
text (invalid bytes mid-text), or one whose bytes are EF BF BD. Every worker kind applies this one rule: the torch
engine's detokenizer and the TensorRT-LLM adapter know the bytes of their tokens (`token_bytes`), the
OpenAI-compatible worker only sees the upstream's text and takes a trailing U+FFFD for a cut character.
"""

from __future__ import annotations

import codecs
import json
import re
import weakref
from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))


def trailing_replacements(text: str) -> int:
    """How many U+FFFD text ends with."""
    return len(text) - len(text.rstrip(REPLACEMENT))


def incomplete_tail(data: bytes) -> int:
    """How many bytes at the end of data begin a UTF-8 character without finishing it (0 to 3)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data, final=False)     # keeps back exactly a valid but unfinished character
    return len(decoder.getstate()[0])


def trim_cut_character(text: str, tokenizer=None, token_ids: Sequence[int] = ()) -> str:
    """`text`, which ends a sequence, less the U+FFFD that stand for a character the sequence cut short.

    With the tokenizer and the token ids behind the end of `text`, a U+FFFD is dropped only when those tokens'
    bytes end in an unfinished character, and as many stay as the finished bytes before it decode to (the model's
    own U+FFFD, or invalid bytes). Without them (an upstream that streams text), every trailing U+FFFD is taken
    for a cut character: a model writing U+FFFD as its very last character is far rarer than a cut at a limit.
    """
    ending = trailing_replacements(text)
    if not ending:
        return text
    real = 0
    if tokenizer is not None:
        # Enough tokens to reach back before the run: a U+FFFD stands for at most 3 bytes, a token for at least 1.
        window = 3 * ending + 8
        tail = token_bytes(tokenizer, token_ids[-window:])
        if tail is not None:
            cut = incomplete_tail(tail)
            if not cut:
                return text
            finished = tail[:-cut]
            if len(token_ids) > window:   # the window may start inside a character: not the model's garbage
                finished = finished.lstrip(_CONTINUATION_BYTES)
            real = trailing_replacements(finished.decode("utf-8", "replace"))
    return text[:len(text) - max(0, ending - real)]


# ---- the raw bytes behind token ids -------------------------------------------------------------------------

def token_bytes(tokenizer, token_ids: Sequence[int]) -> bytes | None:
    """The bytes that `token_ids` (special tokens skipped, as the engines decode) stand for, or None when the
    tokenizer does not say: only a Hugging Face fast tokenizer with a byte-level (GPT-2, Llama 3, Qwen, SmolLM)
    or byte-fallback (Llama 2, Mistral) decoder does."""
    spell = _speller(tokenizer)
    if spell is None:
        return None
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    tokens = tokenizer.convert_ids_to_tokens([int(t) for t in token_ids if t not in special])
    return b"".join(spell(t) for t in tokens if t)


_spellers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _speller(tokenizer) -> Callable[[str], bytes] | None:
    try:
        return _spellers[tokenizer]
    except KeyError:
        pass
    except TypeError:           # not weak-referenceable or not hashable: work it out each time
        return _speller_of(tokenizer)
    spell = _spellers[tokenizer] = _speller_of(tokenizer)
    return spell


def _speller_of(tokenizer) -> Callable[[str], bytes] | None:
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    try:
        spec = json.loads(decoder.__getstate__())
    except Exception:           # a slow tokenizer, or a decoder that does not describe itself
        return None
    kinds = {d.get("type") for d in spec.get("decoders") or [spec]}
    if "ByteLevel" in kinds:
        return _byte_level
    if "ByteFallback" in kinds:
        return _byte_fallback
    return None


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_OF_CHAR = {c: b for b, c in _gpt2_bytes_to_unicode().items()}


def _byte_level(token: str) -> bytes:
    # An added token's content is plain text, not the byte alphabet: its other characters are spelt in UTF-8.
    return b"".join(bytes([_BYTE_OF_CHAR[c]]) if c in _BYTE_OF_CHAR else c.encode() for c in token)


def _byte_fallback(token: str) -> bytes:
    match = _BYTE_TOKEN.fullmatch(token)
    return bytes([int(match.group(1), 16)]) if match else token.replace("\u2581", " ").encode()
