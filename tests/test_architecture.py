"""docs/ARCHITECTURE.md's import rules, checked on the source: which way imports may point."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> top-level modules it must never import
# Clients of the router's public API: no package on the serving side may depend on them.
CLIENTS = {"client", "trellis_client", "gateway"}
WORKERS = {"worker_cpu", "worker_gpu", "worker_openai"}

# package -> top-level modules it must never import
FORBIDDEN = {
    "controllers": {"grpc", "grpc_health", "grpc_reflection", "google", "torch", "transformers", "trellis_rpc",
                    "router", "worker_runtime", "torch_engine", *WORKERS, *CLIENTS},
    "router": {"torch", "transformers", "worker_runtime", "torch_engine", *WORKERS, *CLIENTS},
    # The worker side of the contract: every worker kind runs it, including ones that forward to another server.
    "worker_runtime": {"torch", "transformers", "router", "controllers", "torch_engine", *WORKERS, *CLIENTS},
    # The PyTorch engine is a library that two worker processes share: no process, no wire, no router.
    "torch_engine": {"grpc", "grpc_health", "grpc_reflection", "router", "controllers", *WORKERS, *CLIENTS},
    "worker_cpu": {"router", "controllers", "worker_gpu", "worker_openai", *CLIENTS},
    "worker_gpu": {"router", "controllers", "worker_cpu", "worker_openai", *CLIENTS},
    # Forwards to an OpenAI-compatible server: no model of its own, so no torch (its image has none).
    "worker_openai": {"torch", "torch_engine", "router", "controllers", "worker_cpu", "worker_gpu", *CLIENTS},
    "trellis_rpc": {"router", "controllers", "worker_runtime", "torch_engine", *WORKERS, *CLIENTS, "torch",
                    "transformers"},
    # The Python client library: the public contract only, importable in any program (no HTTP stack, no model).
    "trellis_client": {"router", "controllers", "worker_runtime", "torch_engine", *WORKERS, "client", "gateway",
                       "torch", "transformers", "starlette", "uvicorn"},
    # The HTTP gateway reaches the router through trellis_client like any other client; it has no model.
    "gateway": {"router", "controllers", "worker_runtime", "torch_engine", *WORKERS, "client", "torch",
                "transformers"},
    "client": {"router", "controllers", "worker_runtime", "torch_engine", *WORKERS, "gateway", "torch",
               "transformers"},
    # Settings for every process: it knows their models only by name (trellis_settings.reference imports
    # `<process>.settings` by string), never the processes themselves.
    "trellis_settings": {"router", "controllers", "worker_runtime", "torch_engine", *WORKERS, *CLIENTS, "torch",
                         "transformers", "grpc", "trellis_rpc"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = imported_roots(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)
