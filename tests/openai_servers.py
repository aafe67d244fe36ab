"""Real OpenAI-compatible servers on loopback for worker_openai's tests: `transformers serve` (transformers'
own server, from its serving extra) and the fault-injecting proxy (tests/openai_proxy.py) in front of it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from client.launcher import free_port


@dataclass
class HttpServer:
    name: str
    popen: subprocess.Popen
    port: int
    log_path: Path

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root + "/v1"

    def wait_healthy(self, timeout: float = 120.0, path: str = "/health") -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.root + path, timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not healthy after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def _spawn(name: str, argv: list[str], port: int, log_dir: Path) -> HttpServer:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return HttpServer(name, popen, port, log_path)


def start_transformers_serve(model_dir: Path, log_dir: Path, name: str = "transformers-serve") -> HttpServer:
    """`transformers serve` with the model loaded up front (it would otherwise load on the first request)."""
    port = free_port()
    cli = Path(sys.executable).parent / "transformers"
    return _spawn(name, [str(cli), "serve", "--host", "127.0.0.1", "--port", str(port), "--model-timeout", "86400",
                         "--log-level", "warning", str(model_dir)], port, log_dir)


def start_proxy(upstream_root: str, log_dir: Path, name: str = "openai-proxy", port: int | None = None) -> HttpServer:
    port = port or free_port()
    return _spawn(name, [sys.executable, "-m", "tests.openai_proxy", "--port", str(port), "--upstream", upstream_root],
                  port, log_dir)


def start_vllm_classify(model_dir: Path, log_dir: Path, served_name: str,
                        name: str = "vllm-classify") -> HttpServer:
    """tests/vllm_classify_server.py: vLLM's classification API over a real reward model (vLLM needs CUDA)."""
    port = free_port()
    return _spawn(name, [sys.executable, "-m", "tests.vllm_classify_server", "--port", str(port), "--model",
                         str(model_dir), "--served-model-name", served_name], port, log_dir)


def control(proxy: HttpServer, **changes) -> dict:
    """Set the proxy's faults (see tests/openai_proxy.py) and return what it has seen."""
    data = json.dumps(changes).encode() if changes else None
    request = urllib.request.Request(proxy.root + "/_control", data=data, method="POST" if changes else "GET",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        return json.loads(reply.read())


# llama-cpp-python's server compiles llama.cpp on install (about 10 minutes on 2 cores), so it lives in a venv of
# its own that `make llamacpp` builds; the tests that need it are skipped without it.
LLAMACPP_PYTHON = Path(os.environ.get("TRELLIS_LLAMACPP_PYTHON", Path(__file__).resolve().parent.parent
                                      / ".cache" / "llamacpp-venv" / "bin" / "python"))


def llamacpp_available() -> bool:
    if not LLAMACPP_PYTHON.exists():
        return False
    return subprocess.run([str(LLAMACPP_PYTHON), "-c", "import llama_cpp.server, uvicorn"],
                          capture_output=True).returncode == 0


def start_llamacpp_server(gguf: Path, log_dir: Path, alias: str, name: str = "llama-cpp-server",
                          n_ctx: int = 2048, threads: int = 1) -> HttpServer:
    """llama-cpp-python's OpenAI-compatible server on a .gguf (no /health: probe /v1/models)."""
    port = free_port()
    return _spawn(name, [str(LLAMACPP_PYTHON), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                         "--port", str(port), "--n_ctx", str(n_ctx), "--model_alias", alias,
                         "--n_threads", str(threads), "--verbose", "False",
                         # by default a new request ends the stream in flight (with [DONE] and no finish reason)
                         "--interrupt_requests", "False"], port, log_dir)
