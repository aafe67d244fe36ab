"""worker_openai against a real OpenAI-compatible server: `transformers serve` on the tiny Llama, started here,
with tests/openai_proxy.py in front of it where a test needs a fault the server cannot be made to produce
(429, 500, a slow stream, an API key, being killed).

router -> worker_openai -> proxy -> transformers serve, all real processes on loopback.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest

from client.launcher import free_port, start_openai_worker, start_router, start_worker
from tests.helpers import chat, eventually, run_request
from tests.openai_servers import HttpServer, control, start_proxy, start_transformers_serve, start_vllm_classify
from tests.test_controllers_e2e import PARAMS, router_with_reward_models
from tests.test_observability import scrape, total
from tests.test_worker_stream import Stream, ends, generate
from tests.tiny_model import build_tiny_reward_model
from trellis_rpc.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.processes

MODEL_ID = "tiny-upstream"
# transformers serve returns no logprobs, so this pool has no verifier: the verifier's controllers score with
# the reward-model workers instead, and DeepConf (which needs logprobs) is refused, naming the field.
OPENAI_PARAMS = {**PARAMS, "mcts": {**PARAMS["mcts"], "kind": "outcome"},
                 "tree_of_thoughts": {**PARAMS["tree_of_thoughts"], "kind": "outcome"}}
NEEDS_LOGPROBS = {"deepconf_offline", "deepconf_online"}


def holds(check, timeout_s: float) -> None:
    eventually(check, timeout_s=timeout_s, every_s=0.05)
    assert check()


def worker_args(tokenizer, *more: str) -> list[str]:
    return ["--model", str(tokenizer), "--served-model-id", MODEL_ID, "--upstream-kind", "transformers",
            "--tokenizer", str(tokenizer), "--health-interval", "0.3", *more]


@pytest.fixture(scope="module")
def upstream(tiny_model, logs) -> HttpServer:
    server = start_transformers_serve(tiny_model, logs)
    try:
        server.wait_healthy(timeout=180)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def proxy(upstream, logs) -> HttpServer:
    server = start_proxy(upstream.root, logs)
    try:
        server.wait_healthy(timeout=60)
        yield server
    finally:
        server.stop()


@pytest.fixture
def clean_proxy(proxy) -> HttpServer:
    control(proxy, fail_status=0, fail_count=0, delay_s=0.0, chunk_delay_s=0.0, api_key="")
    return proxy


@pytest.fixture(scope="module")
def openai_worker(proxy, tiny_model, logs):
    worker = start_openai_worker(proxy.base_url, logs, extra=worker_args(tiny_model), name="worker-openai",
                                 env={"OTEL_TRACES_EXPORTER": "console"})
    try:
        worker.wait_serving(timeout=60)
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def openai_stub(openai_worker, clean_proxy):
    with grpc.insecure_channel(openai_worker.address) as channel:
        yield worker_pb2_grpc.WorkerStub(channel)


@pytest.fixture(scope="module")
def openai_router(openai_worker, logs, tmp_path_factory):
    """The worker_openai pool plus reward-model workers (the controllers that score need them)."""
    with router_with_reward_models(openai_worker.address, logs, tmp_path_factory, "oa") as stub:
        yield stub


# ---- every controller, end to end ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OPENAI_PARAMS))
def test_every_controller_runs_on_an_openai_compatible_upstream(openai_router, clean_proxy, name):
    request = run_request(name, prompt=chat("What is 3 + 4? Answer with a number."), params=OPENAI_PARAMS[name],
                          max_tokens=12, seed=5, temperature=0.8)
    if name in NEEDS_LOGPROBS:
        with pytest.raises(grpc.RpcError) as err:
            list(openai_router.RunStream(request, timeout=120))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "sampling.logprobs" in err.value.details() and "transformers" in err.value.details()
        return
    events = list(openai_router.RunStream(request, timeout=120))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "result", kinds
    assert "delta" in kinds, f"{name} streamed no tokens"
    result = events[-1].result
    assert result.usage.completion_tokens > 0
    streamed = sum(e.delta.token_count for e in events if e.WhichOneof("event") == "delta")
    assert 0 < streamed <= result.usage.completion_tokens


def test_dynasor_continues_and_forks_kept_sequences_on_the_worker(openai_router, clean_proxy):
    """Dynasor keeps its reasoning on the worker (continue_from / fork_from): worker_openai re-sends the prompt
    plus the kept text, so the upstream sees the reasoning so far followed by the probe."""
    request = run_request("dynasor_cot", prompt=chat("What is 3 + 4?"), max_tokens=40, temperature=0.0,
                          params={"max_tokens": 32, "probe_interval": 8, "agree": 3, "probe_tokens": 4})
    result = openai_router.Run(request, timeout=120)
    assert result.usage.completion_tokens > 0
    bodies = control(clean_proxy)["bodies"]
    probes = [b for b in bodies if "answer is" in b.lower() or "final answer" in b.lower()]
    assert probes, "no probe reached the upstream"


# ---- generation on the worker contract -----------------------------------------------------------------

def test_worker_info_advertises_kept_sequences_and_no_verifier(openai_stub):
    info = openai_stub.Info(worker_pb2.InfoRequest(), timeout=10)
    assert info.model_id == MODEL_ID and info.engine == "openai-compatible (transformers)"
    assert common_pb2.CAPABILITY_GENERATE in info.capabilities
    assert common_pb2.CAPABILITY_KEEP_SEQUENCES in info.capabilities
    assert common_pb2.CAPABILITY_SCORE_VERIFIER not in info.capabilities   # no logprobs from this upstream


def _result(stub, task: worker_pb2.WorkerRequest, limit_s: float = 60):
    s = Stream(stub)
    try:
        s.send(task)
        seen = s.until(ends(task.task_id), deadline=time.monotonic() + limit_s)
    finally:
        s.close()
    return seen


def test_deltas_stream_as_they_arrive_and_add_up_to_the_result(openai_stub):
    seen = _result(openai_stub, generate("s1", prompt=common_pb2.Prompt(text="Once upon a time"), max_tokens=16,
                                         temperature=0.0))
    deltas = [r.delta for r in seen if r.WhichOneof("kind") == "delta"]
    result = seen[-1].generate_result
    assert len(deltas) > 1
    assert "".join(d.text for d in deltas) == result.completions[0].text
    assert sum(len(d.token_ids) for d in deltas) == len(result.completions[0].token_ids)
    assert result.completions[0].finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)
    assert result.usage.prompt_tokens > 0 and result.timings.ttft_ms > 0


def test_greedy_is_deterministic_and_stop_strings_cut_the_text(openai_stub):
    prompt = common_pb2.Prompt(text="The list of words:")
    first = _result(openai_stub, generate("g1", stream=False, prompt=prompt, max_tokens=24, temperature=0.0))[-1]
    again = _result(openai_stub, generate("g2", stream=False, prompt=prompt, max_tokens=24, temperature=0.0))[-1]
    text = first.generate_result.completions[0].text
    assert text and text == again.generate_result.completions[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = _result(openai_stub, generate("g3", stream=False, prompt=prompt, max_tokens=24, temperature=0.0,
                                        stop=[stop]))[-1].generate_result.completions[0]
    assert cut.finish_reason == common_pb2.FINISH_REASON_STOP
    assert cut.text == text[:text.index(stop)]


def test_a_seed_reproduces_a_sample(openai_stub):
    prompt = common_pb2.Prompt(text="Tell me a story")
    texts = [_result(openai_stub, generate(f"seed{i}", stream=False, prompt=prompt, max_tokens=16, temperature=1.0,
                                           seed=1234))[-1].generate_result.completions[0].text for i in range(2)]
    assert texts[0] and texts[0] == texts[1]


@pytest.mark.parametrize("field, value", [("top_k", 5), ("min_p", 0.1), ("logprobs", 2), ("ignore_eos", True),
                                          ("presence_penalty", 0.5), ("repetition_penalty", 1.2)])
def test_fields_the_upstream_cannot_honour_are_refused_by_name(openai_stub, field, value):
    seen = _result(openai_stub, generate("r-" + field, prompt=common_pb2.Prompt(text="hi"), max_tokens=4,
                                         **{field: value}))
    error = seen[-1].error
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert error.field == f"sampling.{field}" and "transformers" in error.message


def test_n_samples_are_separate_requests_each_seeded(openai_stub, clean_proxy):
    before = control(clean_proxy)["requests"]
    seen = _result(openai_stub, generate("n3", stream=False, prompt=common_pb2.Prompt(text="Say"), max_tokens=8,
                                         n=3, seed=7, temperature=1.0))
    result = seen[-1].generate_result
    assert [c.index for c in result.completions] == [0, 1, 2]
    assert control(clean_proxy)["requests"] - before == 3


# ---- cancellation and deadlines close the upstream's request -------------------------------------------

def test_cancel_closes_the_upstream_stream(openai_stub, clean_proxy):
    control(clean_proxy, chunk_delay_s=0.05)
    s = Stream(openai_stub)
    try:
        s.send(generate("c1", prompt=common_pb2.Prompt(text="Count:"), max_tokens=400, temperature=0.0))
        s.until(lambda r: r.task_id == "c1" and r.WhichOneof("kind") == "delta", deadline=time.monotonic() + 30)
        assert control(clean_proxy)["open_streams"] == 1
        s.send(worker_pb2.WorkerRequest(task_id="x", cancel=worker_pb2.CancelTask(target_task_id="c1")))
        last = s.until(ends("c1"), deadline=time.monotonic() + 30)[-1]
    finally:
        s.close()
    completion = last.generate_result.completions[0]
    assert completion.finish_reason == common_pb2.FINISH_REASON_CANCELLED and len(completion.token_ids) < 400
    holds(lambda: control(clean_proxy)["open_streams"] == 0, 5)


def test_a_deadline_ends_the_task_and_its_upstream_request(openai_stub, clean_proxy):
    control(clean_proxy, chunk_delay_s=0.2)
    seen = _result(openai_stub, generate("d1", prompt=common_pb2.Prompt(text="Count:"), max_tokens=200,
                                         temperature=0.0, timeout_ms=1000))
    assert seen[-1].error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    holds(lambda: control(clean_proxy)["open_streams"] == 0, 5)


# ---- upstream errors -> gRPC codes ---------------------------------------------------------------------

def test_429_is_resource_exhausted_with_the_retry_hint(openai_stub, clean_proxy):
    control(clean_proxy, fail_status=429, fail_count=1)
    error = _result(openai_stub, generate("e429", prompt=common_pb2.Prompt(text="hi"), max_tokens=4))[-1].error
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "429" in error.message and "retry after 2 s" in error.message


def test_500_is_unavailable_so_the_router_migrates(openai_stub, clean_proxy):
    control(clean_proxy, fail_status=500, fail_count=1)
    error = _result(openai_stub, generate("e500", prompt=common_pb2.Prompt(text="hi"), max_tokens=4))[-1].error
    assert error.code == grpc.StatusCode.UNAVAILABLE.value[0] and "injected 500" in error.message


def test_503_before_anything_streamed_is_retried(openai_stub, clean_proxy):
    before = control(clean_proxy)["requests"]
    control(clean_proxy, fail_status=503, fail_count=2)
    result = _result(openai_stub, generate("e503", stream=False, prompt=common_pb2.Prompt(text="hi"),
                                           max_tokens=4))[-1]
    assert result.WhichOneof("kind") == "generate_result"
    assert control(clean_proxy)["requests"] - before == 3


def test_the_trace_context_is_forwarded_upstream(openai_stub, clean_proxy):
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    task = generate("t1", stream=False, prompt=common_pb2.Prompt(text="hi"), max_tokens=2)
    task.trace_context["traceparent"] = parent
    _result(openai_stub, task)
    sent = control(clean_proxy)["traceparent"]
    assert sent.startswith("00-0af7651916cd43dd8448eb211c80319c-") and sent != parent   # same trace, its own span


# ---- the API key, and the upstream going away ----------------------------------------------------------

def test_a_refused_api_key_stops_the_worker_at_start_with_a_clear_message(proxy, tiny_model, logs, tmp_path):
    control(proxy, api_key="s3cret", fail_count=0, chunk_delay_s=0.0)
    try:
        bad = start_openai_worker(proxy.base_url, logs, extra=worker_args(tiny_model), name="worker-openai-badkey",
                                  env={"OPENAI_API_KEY": "wrong"})
        assert bad.popen.wait(60) == 2
        assert "refused this worker's API key" in bad.log_tail() and "UNAUTHENTICATED" in bad.log_tail()
        assert "wrong" not in bad.log_path.read_text()     # the key itself is never logged
        key_file = tmp_path / "key"
        key_file.write_text("s3cret\n")
        good = start_openai_worker(proxy.base_url, logs, extra=worker_args(tiny_model, "--api-key-file",
                                                                            str(key_file)), name="worker-openai-key")
        try:
            good.wait_serving(timeout=60)
            with grpc.insecure_channel(good.address) as channel:
                result = _result(worker_pb2_grpc.WorkerStub(channel),
                                 generate("k1", stream=False, prompt=common_pb2.Prompt(text="hi"), max_tokens=2))[-1]
            assert result.WhichOneof("kind") == "generate_result"
        finally:
            good.stop()
    finally:
        control(proxy, api_key="")


def test_upstream_killed_mid_stream_migrates_and_the_worker_follows_its_health(upstream, tiny_model, logs):
    """Two worker_openai workers: A through a proxy that gets killed mid-stream, B straight to the server. The
    runs on A migrate to B and complete; A is NOT_SERVING while its upstream is gone, SERVING when it is back."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    doomed = start_proxy(upstream.root, logs, name="openai-proxy-doomed")
    doomed.wait_healthy(timeout=60)
    control(doomed, chunk_delay_s=0.05)
    a = start_openai_worker(doomed.base_url, logs, extra=worker_args(tiny_model), name="worker-openai-a")
    b = start_openai_worker(upstream.base_url, logs, extra=worker_args(tiny_model), name="worker-openai-b")
    router = revived = None
    try:
        a.wait_serving(timeout=60)
        b.wait_serving(timeout=60)
        metrics_port = free_port()
        router = start_router([a.address, b.address], logs, name="oa-router-faults",
                              extra=["--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"])
        router.wait_serving(timeout=60)
        with grpc.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            requests = [run_request("majority_vote", prompt=common_pb2.Prompt(text=f"Count {i}:"), params={"n": 2},
                                    max_tokens=60, temperature=0.0) for i in range(4)]
            futures = [stub.Run.future(r, timeout=120) for r in requests]
            holds(lambda: control(doomed)["open_streams"] > 0, 30)
            doomed.kill()
            results = [f.result() for f in futures]
        assert all(r.usage.completion_tokens > 0 for r in results)
        assert total(scrape(metrics_port), "trellis_router_migrations_total") >= 1

        def health(worker, service: str = "trellis.v1.Worker") -> int:
            with grpc.insecure_channel(worker.address) as ch:
                return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                            timeout=2).status

        holds(lambda: health(a) == health_pb2.HealthCheckResponse.NOT_SERVING, 10)
        assert health(a, "") == health_pb2.HealthCheckResponse.SERVING   # the process is fine: no liveness restart
        revived = start_proxy(upstream.root, logs, name="openai-proxy-revived", port=doomed.port)
        revived.wait_healthy(timeout=60)
        holds(lambda: health(a) == health_pb2.HealthCheckResponse.SERVING, 10)
    finally:
        for proc in (router, a, b):
            if proc is not None:
                proc.stop()
        for server in (doomed, revived):
            if server is not None:
                server.stop()


def test_generate_through_the_router_names_the_pool(openai_router):
    reply = openai_router.Generate(router_pb2.GenerateRequest(prompt=common_pb2.Prompt(text="Hello"),
                                                              sampling=common_pb2.SamplingParams(max_tokens=4)),
                                   timeout=60)
    assert reply.model_id == MODEL_ID and reply.completions[0].token_ids
    assert reply.worker_id.startswith("worker-")


# ---- an outcome reward model behind vLLM's classification API -------------------------------------------

def test_an_outcome_reward_model_served_by_the_upstream_scores_like_the_cpu_worker(openai_worker, logs, tmp_path):
    """worker_openai --reward-api classify over vLLM's /classify (served here by tests/vllm_classify_server.py
    on the tiny reward model): the same rendering and the same model as the CPU worker's, so its scores are the
    CPU worker's raw logits through vLLM's sigmoid; a router sends it the score tasks of its pool."""
    import math

    orm = build_tiny_reward_model(tmp_path / "orm", head="sequence", num_labels=1)
    server = start_vllm_classify(orm, logs, served_name="tiny-orm")
    reward = cpu = router = None
    try:
        server.wait_healthy(timeout=120)
        reward = start_openai_worker(server.base_url, logs, name="worker-openai-reward",
                                     extra=["--model", "tiny-orm", "--upstream-kind", "vllm", "--reward-api",
                                            "classify", "--tokenizer", str(orm)])
        cpu = start_worker(str(orm), logs, name="cpu-orm", extra=["--threads", "1", "--dtype", "float32"])
        reward.wait_serving(timeout=60)
        cpu.wait_serving(timeout=120)
        request = common_pb2.ScoreRequest(prompt=chat("What is 3 + 4?"), candidates=["7", "It is 8.", "seven"],
                                          kind=common_pb2.SCORE_KIND_OUTCOME)
        scores, infos = [], []
        for proc in (reward, cpu):
            with grpc.insecure_channel(proc.address) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                infos.append(stub.Info(worker_pb2.InfoRequest(), timeout=10))
                s = Stream(stub)
                try:
                    s.send(worker_pb2.WorkerRequest(task_id="sc", score=worker_pb2.ScoreTask(request=request)))
                    done = s.until(lambda r: r.task_id == "sc", deadline=time.monotonic() + 60)[-1]
                finally:
                    s.close()
                scores.append([c.score for c in done.score_result.scores])
        upstream_scores, cpu_logits = scores
        assert upstream_scores == pytest.approx([1 / (1 + math.exp(-x)) for x in cpu_logits], abs=1e-4)
        assert list(infos[0].capabilities) == [common_pb2.CAPABILITY_SCORE_OUTCOME]   # a reward model: no generate
        assert infos[0].model_id == "tiny-orm"
        router = start_router([openai_worker.address, reward.address], logs, name="oa-router-reward")
        router.wait_serving(timeout=60)
        with grpc.insecure_channel(router.address) as channel:
            scored = router_pb2_grpc.RouterStub(channel).Score(request, timeout=60)
        assert scored.worker_id == infos[0].worker_id
        assert [c.score for c in scored.scores] == pytest.approx(upstream_scores, abs=1e-6)
    finally:
        for proc in (router, reward, cpu):
            if proc is not None:
                proc.stop()
        server.stop()


def test_a_token_id_prompt_is_decoded_for_an_upstream_that_takes_text_only(openai_stub, clean_proxy, tiny_model):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model)("Once upon a time", add_special_tokens=False)["input_ids"]
    seen = _result(openai_stub, generate("tok1", stream=False, prompt=common_pb2.Prompt(
        token_ids=common_pb2.TokenIds(ids=ids)), max_tokens=4, temperature=0.0))
    assert seen[-1].WhichOneof("kind") == "generate_result", seen[-1]
    assert json.loads(control(clean_proxy)["bodies"][-1])["prompt"] == "Once upon a time"


def test_without_a_tokenizer_chats_use_chat_completions_and_concurrency_is_admitted(clean_proxy, tiny_model, logs):
    """No --tokenizer: a chat goes to /chat/completions as messages (continuing one needs an upstream that can,
    refused here by name); --max-concurrency 2 admits two requests and refuses a third with RESOURCE_EXHAUSTED,
    and the load report counts what is in flight."""
    worker = start_openai_worker(clean_proxy.base_url, logs, name="worker-openai-notok",
                                 extra=["--model", str(tiny_model), "--upstream-kind", "transformers",
                                        "--max-concurrency", "2", "--health-interval", "0.3"])
    try:
        worker.wait_serving(timeout=60)
        with grpc.insecure_channel(worker.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            done = _result(stub, generate("chat1", stream=False, prompt=chat("Hello there"), max_tokens=4))[-1]
            assert done.WhichOneof("kind") == "generate_result"
            body = json.loads(control(clean_proxy)["bodies"][-1])
            assert body["messages"] == [{"role": "user", "content": "Hello there"}] and "prompt" not in body

            continued = common_pb2.Prompt(chat=common_pb2.ChatMessages(
                messages=[common_pb2.ChatMessage(role="user", content="Hi"),
                          common_pb2.ChatMessage(role="assistant", content="Hel")], continue_final_message=True))
            error = _result(stub, generate("chat2", prompt=continued, max_tokens=4))[-1].error
            assert error.field == "prompt.chat.continue_final_message" and "--tokenizer" in error.message

            control(clean_proxy, chunk_delay_s=0.05)
            s = Stream(stub)
            try:
                s.send(generate("busy", prompt=common_pb2.Prompt(text="Count:"), max_tokens=200, n=2,
                                temperature=0.0))
                s.until(lambda r: r.WhichOneof("kind") == "load" and r.load.running_sequences == 2,
                        deadline=time.monotonic() + 30)   # the load report counts both requests in flight
                s.send(generate("third", prompt=common_pb2.Prompt(text="Hi"), max_tokens=2))
                refused = s.until(ends("third"), deadline=time.monotonic() + 30)
                s.send(worker_pb2.WorkerRequest(task_id="x", cancel=worker_pb2.CancelTask(target_task_id="busy")))
                s.until(ends("busy"), deadline=time.monotonic() + 30)
            finally:
                s.close()
            error = refused[-1].error
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "2 of its 2" in error.message
    finally:
        worker.stop()


def test_the_workers_spans_time_the_upstream_and_its_trace_continues_upstream(clean_proxy, tiny_model, logs):
    """With tracing on, worker.generate names the upstream and has the upstream's TTFT (worker.prefill) and its
    streaming (worker.decode) as phases; the traceparent the upstream gets is worker.generate's own."""
    import secrets

    from tests.test_observability import attrs, collector

    with collector() as (sink, env):
        worker = start_openai_worker(clean_proxy.base_url, logs, extra=worker_args(tiny_model), env=env,
                                     name="worker-openai-traced")
        try:
            worker.wait_serving(timeout=60)
            trace_id = secrets.token_hex(16)
            task = generate("tr1", stream=False, prompt=common_pb2.Prompt(text="hi"), max_tokens=6, temperature=0.0)
            task.trace_context["traceparent"] = f"00-{trace_id}-{secrets.token_hex(8)}-01"
            with grpc.insecure_channel(worker.address) as channel:
                _result(worker_pb2_grpc.WorkerStub(channel), task)
            spans = {s.name: s for _, s in sink.trace(trace_id, lambda got: {"worker.generate", "worker.decode"}
                                                      <= {s.name for s in got})}
        finally:
            worker.stop()
    generate_span = spans["worker.generate"]
    assert attrs(generate_span)["trellis.upstream"] == f"transformers {clean_proxy.base_url}"
    for phase in ("worker.prefill", "worker.decode"):
        assert spans[phase].parent_span_id == generate_span.span_id
    assert control(clean_proxy)["traceparent"] == f"00-{trace_id}-{generate_span.span_id.hex()}-01"
