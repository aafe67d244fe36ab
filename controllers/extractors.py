"""Answer extractors: turn a sample's text into a comparable answer string ('' when none is found)."""

from __future__ import annotations

import re
from collections.abc import Callable

Extractor = Callable[[str], str]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(raw: str) -> str:
    """'1,234.50' -> '1234.5', '19.0' -> '19': equal numbers vote together."""
    cleaned = raw.replace(",", "")
    try:
        value = float(cleaned)
    except ValueError:
        return raw.strip()
    return str(int(value)) if value.is_integer() else repr(value)


def boxed(text: str) -> str:
    """Content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return ""
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                inner = text[i:j].strip()
                return normalize_number(inner) if _NUMBER.fullmatch(inner.replace(" ", "")) else inner
    return ""


def last_number(text: str) -> str:
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else ""


def auto(text: str) -> str:
    """\\boxed{} when the model used it, else the last number."""
    return boxed(text) or last_number(text)


def regex(pattern: str) -> Extractor:
    """The first capture group (or the whole match) of the last match of pattern."""
    compiled = re.compile(pattern)

    def extract(text: str) -> str:
        matches = list(compiled.finditer(text))
        if not matches:
            return ""
        m = matches[-1]
        return (m.group(1) if m.groups() else m.group(0)).strip()

    return extract


EXTRACTORS: dict[str, Extractor] = {"auto": auto, "boxed": boxed, "last_number": last_number}


def register(name: str, extractor: Extractor) -> None:
    """Plug in an extractor under a name every controller's `extractor` parameter accepts."""
    EXTRACTORS[name] = extractor


def get(name: str, pattern: str = "") -> Extractor:
    if name == "regex":
        return regex(pattern)
    return EXTRACTORS[name]
