"""The README's client examples run as written (addresses aside) against a real router, worker and gateway:
the Python library, sync and async, and the official openai SDK through the gateway."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## The API: three ways in"):text.index("## Controllers")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_the_three_python_examples():
    blocks = python_blocks()
    assert len(blocks) == 3
    assert "from trellis_client import Client" in blocks[0] and "AsyncClient" in blocks[1]
    assert "from openai import OpenAI" in blocks[2]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_readme_example_runs(index, client_stack, gateway):
    code = python_blocks()[index]
    code = code.replace("127.0.0.1:50051", client_stack["router"].address)
    code = code.replace("127.0.0.1:8080", gateway.address)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme"})
    assert out.getvalue().strip(), "the example printed nothing"
