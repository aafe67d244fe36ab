"""Print pyproject.toml's pinned runtime dependencies as a requirements file, for the image builds.

    python requirements.py pyproject.toml                 # everything (the CPU worker image)
    python requirements.py --without-ml pyproject.toml    # minus the model stack (router, GPU worker)

The pins stay in one place (pyproject.toml). The router imports neither torch nor transformers
(docs/ARCHITECTURE.md), and the GPU worker runs on the torch, transformers and tokenizers that NVIDIA's
TensorRT-LLM image was built with, so both images install the rest and then the project with --no-deps.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib

# The model stack: torch_engine's dependencies that no other process imports.
ML_PACKAGES = frozenset({"torch", "transformers", "tokenizers", "safetensors", "accelerate", "gguf"})


def package_name(requirement: str) -> str:
    """'grpcio-health-checking==1.85.1' -> 'grpcio-health-checking' (PEP 503 normalised)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if name is None:
        raise ValueError(f"cannot read a package name from {requirement!r}")
    return re.sub(r"[-_.]+", "-", name.group(1)).lower()


def requirements(pyproject: str, without_ml: bool) -> list[str]:
    with open(pyproject, "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    return [r for r in dependencies if not (without_ml and package_name(r) in ML_PACKAGES)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pyproject")
    p.add_argument("--without-ml", action="store_true", help="leave out " + ", ".join(sorted(ML_PACKAGES)))
    args = p.parse_args(argv)
    print("\n".join(requirements(args.pyproject, args.without_ml)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
