"""The GPU worker without a GPU.

TensorRT-LLM cannot be installed here (PyPI holds only a placeholder), so its adapter
(worker_gpu/trtllm_engine.py, trtllm_sampling.py, trtllm_scoring.py) runs against the test double in
tests/fakes/tensorrt_llm, which mirrors the LLM API of TensorRT-LLM 1.3.0rc24 (class names,
signatures, streaming RequestOutput / CompletionOutput with text_diff, token_ids_diff, logprobs_diff,
finish_reason, Logprob(logprob, rank), context logits, iteration stats) over a real Hugging Face model
on the CPU. `--engine torch` runs the project's PyTorch engine; here on `--device cpu`. Real-GPU runs:
benchmarks/gpu.py on a CUDA machine with TensorRT-LLM installed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from client.launcher import WORKER_SERVICE, _spawn, free_port, start_router
from tests.helpers import chat, run_request
from trellis_rpc.errors import StatusError
from trellis_rpc.sampling import SamplingConfig
from trellis_rpc.v1 import common_pb2, router_pb2_grpc
from worker_gpu.cli import parse_args
from worker_gpu.trtllm_sampling import Support, trtllm_kwargs
from worker_runtime.engine_api import Delta, Finished, PromptInput, RunInfo, ScoreInput

FAKES = Path(__file__).parent / "fakes"


# ---- without TensorRT-LLM -------------------------------------------------------------------------

@pytest.mark.processes
def test_tensorrt_llm_engine_without_tensorrt_llm_exits_with_what_to_install():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "worker_gpu", "--port", "0"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 2
    assert "nvcr.io/nvidia/tensorrt-llm/release" in proc.stderr and "--engine torch" in proc.stderr


# ---- sampling: every field mapped or refused --------------------------------------------------------

def test_every_sampling_field_reaches_tensorrt_llm():
    cfg = SamplingConfig(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, max_tokens=77, min_tokens=3, n=4,
                         seed=123, stop=("\n\n", "END"), stop_token_ids=(7, 9), frequency_penalty=0.5,
                         presence_penalty=-0.25, repetition_penalty=1.1, logprobs=5, ignore_eos=True)
    kw = trtllm_kwargs(cfg, Support.of("1.3.0rc24"))
    assert kw == {
        "max_tokens": 77, "n": 4, "best_of": 4, "temperature": 0.7, "top_k": 40, "top_p": 0.9, "seed": 123,
        "stop": ["\n\n", "END"], "include_stop_str_in_output": False, "stop_token_ids": [7, 9], "min_tokens": 3,
        "repetition_penalty": 1.1, "presence_penalty": -0.25, "frequency_penalty": 0.5, "ignore_eos": True,
        "detokenize": True, "skip_special_tokens": True, "min_p": 0.05, "logprobs": 5}
    # Each SamplingConfig field has a place in the mapping (a new field must be mapped or refused here).
    mapped = {"temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "n", "seed", "stop",
              "stop_token_ids", "frequency_penalty", "presence_penalty", "repetition_penalty", "logprobs",
              "ignore_eos"}
    assert mapped == set(SamplingConfig.__dataclass_fields__)


def test_defaults_and_refusals():
    kw = trtllm_kwargs(SamplingConfig(logprobs=0), Support.of("1.2.0"))
    assert kw["top_k"] is None and kw["stop"] is None and kw["min_tokens"] is None and "min_p" not in kw
    assert kw["logprobs"] == 1          # 1.2 returns nothing for logprobs=0: ask for one, keep none
    with pytest.raises(StatusError) as err:
        trtllm_kwargs(SamplingConfig(min_p=0.1), Support.of("1.2.0rc2"))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "sampling.min_p"


# ---- the adapter over the test double, in process ------------------------------------------------

@pytest.fixture(scope="module")
def trtllm(tiny_model):
    sys.path.insert(0, str(FAKES))
    os.environ.setdefault("TLLM_ALLOW_N_GREEDY_DECODING", "1")
    try:
        from worker_gpu.trtllm_engine import build_trtllm

        args = parse_args(["--model", str(tiny_model), "--max-batch-size", "16", "--prm-tokens", "a,b"])
        engine, scorer = build_trtllm(args)
        yield engine, scorer
        engine.close()
    finally:
        sys.path.remove(str(FAKES))


def collect(engine, prompt: PromptInput, cfg: SamplingConfig, task_id: str = "t", run: RunInfo | None = None):
    async def go():
        deltas, done = [], None
        async for event in engine.generate(task_id, prompt, cfg, run=run):
            if isinstance(event, Delta):
                deltas.append(event)
            else:
                assert isinstance(event, Finished)
                done = event
        return deltas, done
    return asyncio.run(go())


def test_streamed_deltas_add_up_to_each_sample(trtllm):
    engine, _ = trtllm
    cfg = SamplingConfig(temperature=1.0, max_tokens=12, n=3, seed=5, logprobs=2, ignore_eos=True)
    deltas, done = collect(engine, PromptInput(text="the tide and the"), cfg)
    assert len(done.completions) == 3 and done.prompt_tokens > 0 and done.ttft_ms > 0
    for c in done.completions:
        mine = [d for d in deltas if d.index == c.index]
        assert "".join(d.text for d in mine) == c.text
        assert [t for d in mine for t in d.token_ids] == c.token_ids and len(c.token_ids) == 12
        assert c.finish_reason == "length" and mine[-1].finish_reason == "length"
        assert len(c.logprobs) == 12 and all(len(lp.top) == 2 for lp in c.logprobs)
        assert all(lp.logprob <= 0 and lp.top[0].logprob >= lp.top[1].logprob for lp in c.logprobs)
        assert c.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in c.logprobs), abs=1e-3)
    # A seeded task draws the same samples again.
    _, again = collect(engine, PromptInput(text="the tide and the"), cfg, task_id="t2")
    assert [c.token_ids for c in again.completions] == [c.token_ids for c in done.completions]


def test_the_run_order_reaches_tensorrt_llm_as_its_request_priority(trtllm):
    """TensorRT-LLM's scheduler orders waiting requests by `priority` in [0, 1]; the adapter passes the run's place
    in the run order (priority class, then least attained service), and 0.5, its default, for a task without a run."""
    engine, _ = trtllm
    cfg = SamplingConfig(temperature=0.0, max_tokens=2)
    calls = engine.llm.generate_calls
    collect(engine, PromptInput(text="a"), cfg, task_id="p0")
    collect(engine, PromptInput(text="a"), cfg, task_id="p1", run=RunInfo("fresh", tokens=0))
    collect(engine, PromptInput(text="a"), cfg, task_id="p2", run=RunInfo("long", tokens=50_000))
    collect(engine, PromptInput(text="a"), cfg, task_id="p3", run=RunInfo("urgent", priority=2, tokens=50_000))
    none, fresh, long, urgent = (call["priority"] for call in calls[-4:])
    assert none == 0.5 and urgent > fresh > long


def test_stop_string_never_streams(trtllm):
    engine, _ = trtllm
    _, free = collect(engine, PromptInput(text="a b c"), SamplingConfig(temperature=0.0, max_tokens=24,
                                                                       ignore_eos=True))
    text = free.completions[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    deltas, done = collect(engine, PromptInput(text="a b c"), SamplingConfig(temperature=0.0, max_tokens=24,
                                                                            ignore_eos=True, stop=(stop,)))
    c = done.completions[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop and c.text == text[:text.index(stop)]
    assert "".join(d.text for d in deltas) == c.text


def test_cancel_aborts_the_request(trtllm):
    engine, _ = trtllm

    async def go():
        events = []
        async for event in engine.generate("c1", PromptInput(text="go"), SamplingConfig(max_tokens=200,
                                                                                       ignore_eos=True)):
            events.append(event)
            if len(events) == 2:
                engine.cancel("c1")
        return events
    events = asyncio.run(go())
    done = events[-1]
    assert isinstance(done, Finished) and done.completions[0].finish_reason == "cancelled"
    assert len(done.completions[0].token_ids) < 200


def test_requests_the_engine_cannot_serve(trtllm):
    engine, _ = trtllm
    with pytest.raises(StatusError) as err:
        collect(engine, PromptInput(token_ids=[10_000_000]), SamplingConfig())
    assert err.value.field == "prompt.token_ids.ids"
    with pytest.raises(StatusError) as err:
        collect(engine, PromptInput(text="x " * 400), SamplingConfig())
    assert err.value.field == "prompt" and err.value.reason == "CONTEXT_LENGTH_EXCEEDED"
    assert engine.info.keeps_sequences is False and engine.info.engine.startswith("tensorrt-llm")


def test_load_report_from_iteration_stats(trtllm):
    engine, _ = trtllm
    collect(engine, PromptInput(text="numbers"), SamplingConfig(max_tokens=8, ignore_eos=True))
    load = engine.load()
    assert load.kv_blocks_used + load.kv_blocks_free > 0


def test_verifier_and_process_scores_from_context_logits(trtllm):
    _, scorer = trtllm
    assert set(scorer.info.kinds) == {"verifier", "process"}

    async def go(kind: str):
        return await scorer.score("s", ScoreInput(prompt=PromptInput(text="What is 2 + 2?"),
                                                  candidates=["4", "5\n\nso 5"], kind=kind, step_separator="\n\n"))
    verified = asyncio.run(go("verifier"))
    assert [c.index for c in verified.scores] == [0, 1] and all(0 < c.score < 1 for c in verified.scores)
    process = asyncio.run(go("process"))
    assert [len(c.step_scores) for c in process.scores] == [1, 2]
    assert all(c.score == min(c.step_scores) for c in process.scores)


# ---- worker_gpu as a process, behind a router -----------------------------------------------------

def start_gpu_worker(tiny_model: Path, logs: Path, name: str, extra: list[str]):
    port = free_port()
    env = {"PYTHONPATH": os.pathsep.join([str(FAKES), str(Path(__file__).parent.parent)])}
    return _spawn(name, "worker_gpu", ["--model", str(tiny_model), "--port", str(port), *extra], port,
                  WORKER_SERVICE, logs, env)


@pytest.mark.processes
@pytest.mark.parametrize("engine", ["tensorrt-llm", "torch"])
def test_gpu_worker_serves_runs_and_scores_through_a_router(tiny_model, logs, engine):
    extra = ["--engine", engine] + (["--device", "cpu", "--kv-cache-tokens", "4096"] if engine == "torch" else [])
    worker = start_gpu_worker(tiny_model, logs, f"gpu-worker-{engine}", extra)
    router = None
    try:
        worker.wait_serving(timeout=120)
        router = start_router([worker.address], logs, name=f"router-gpu-{engine}")
        router.wait_serving(timeout=60)
        with grpc.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            events = list(stub.RunStream(run_request("majority_vote", params={"n": 3}, max_tokens=8, seed=2),
                                         timeout=120))
            result = events[-1].result
            assert len(result.candidates) == 3 and result.usage.completion_tokens > 0
            streamed = sum(e.delta.token_count for e in events if e.WhichOneof("event") == "delta")
            assert streamed == result.usage.completion_tokens
            scored = stub.Score(common_pb2.ScoreRequest(prompt=chat("What is 2 + 2?"), candidates=["4", "5"],
                                                        kind=common_pb2.SCORE_KIND_VERIFIER), timeout=60)
            assert len(scored.scores) == 2 and all(0 < s.score < 1 for s in scored.scores)
            with pytest.raises(grpc.RpcError) as err:
                stub.Run(run_request(temperature=-1.0), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        for proc in (router, worker):
            if proc is not None:
                proc.stop()


def test_tensorrt_llm_runs_no_code_from_the_model_directory_unless_trusted(tmp_path):
    from tests.tiny_model import build_remote_code_reward_model

    model = build_remote_code_reward_model(tmp_path / "custom-orm")
    sys.path.insert(0, str(FAKES))
    try:
        from worker_gpu.trtllm_engine import build_trtllm

        with pytest.raises(ValueError, match="--trust-remote-code"):
            build_trtllm(parse_args(["--model", str(model)]))
    finally:
        sys.path.remove(str(FAKES))
    assert parse_args(["--trust-remote-code"]).trust_remote_code and not parse_args([]).trust_remote_code


def test_cli_refuses_bad_flags():
    with pytest.raises(SystemExit):
        parse_args(["--kv-cache-free-gpu-memory-fraction", "1.5"])
    with pytest.raises(SystemExit):
        parse_args(["--prm-tokens", "+"])
    with pytest.raises(SystemExit):
        parse_args(["--max-context-tokens", "-1"])
    assert isinstance(parse_args([]), argparse.Namespace)
