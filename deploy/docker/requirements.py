"""Print pyproject.toml's pinned runtime dependencies as a requirements file, for the image builds.

    python requirements.py pyproject.toml                                  # everything (the CPU worker image)
    python requirements.py --without-ml pyproject.toml                     # minus the model stack (router, GPU worker)
    python requirements.py --without torch,accelerate,gguf pyproject.toml  # minus the named packages (OpenAI worker)

The pins stay in one place (pyproject.toml). The router imports neither torch nor transformers
(docs/ARCHITECTURE.md), and the GPU worker runs on the torch, transformers and tokenizers that NVIDIA's
TensorRT-LLM image was built with, so both images install the rest and then the project with --no-deps.
The OpenAI-compatible worker forwards to a server that runs the model: it keeps transformers and tokenizers
(and safetensors, which transformers requires) for --tokenizer, and leaves out torch and what only torch
uses. --without names must be dependencies in pyproject.toml, so a misspelt one fails the build instead of
installing the package it meant to leave out. What every process imports (pydantic: the settings of every
process, trellis_settings; grpc and protobuf; structlog) cannot be left out.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib

# The model stack: torch_engine's dependencies that no other process imports.
ML_PACKAGES = frozenset({"torch", "transformers", "tokenizers", "safetensors", "accelerate", "gguf", "jinja2"})
# What every process imports, whatever its image: trellis_settings (pydantic), trellis_rpc (grpc, protobuf,
# structlog).
EVERY_PROCESS = frozenset({"pydantic", "grpcio", "protobuf", "structlog"})


def package_name(requirement: str) -> str:
    """'grpcio-health-checking==1.85.1' -> 'grpcio-health-checking' (PEP 503 normalised)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if name is None:
        raise ValueError(f"cannot read a package name from {requirement!r}")
    return re.sub(r"[-_.]+", "-", name.group(1)).lower()


def requirements(pyproject: str, without: frozenset[str] = frozenset()) -> list[str]:
    """pyproject's dependencies minus the packages named in without (any spelling PEP 503 normalises)."""
    with open(pyproject, "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    left_out = {package_name(n) for n in without}
    unknown = left_out - {package_name(r) for r in dependencies}
    if unknown:
        raise ValueError(f"not dependencies in {pyproject}: {', '.join(sorted(unknown))}")
    needed = left_out & EVERY_PROCESS
    if needed:
        raise ValueError(f"every process imports {', '.join(sorted(needed))}: it cannot be left out")
    return [r for r in dependencies if package_name(r) not in left_out]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pyproject")
    p.add_argument("--without-ml", action="store_true", help="leave out " + ", ".join(sorted(ML_PACKAGES)))
    p.add_argument("--without", default="", metavar="PKG[,PKG...]", help="leave out these packages")
    args = p.parse_args(argv)
    without = {n.strip() for n in args.without.split(",") if n.strip()} | (ML_PACKAGES if args.without_ml else set())
    try:
        pins = requirements(args.pyproject, frozenset(without))
    except ValueError as err:
        p.error(str(err))
    print("\n".join(pins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
