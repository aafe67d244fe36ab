"""The OpenAI-compatible gateway as OpenAI users meet it: the official `openai` SDK (a client no one here wrote)
and raw HTTP read by an independent SSE parser, against real gateway, router and worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
import time

import httpx
import openai
import pytest

from client.launcher import start_gateway, start_router
from tests.helpers import eventually
from tests.test_client_library import LONG, QUESTION, VOTE, idle, occupy, worker_load
from tests.test_observability import scrape, total
from trellis_client import Client

MESSAGES = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def sdk(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key="unused", max_retries=0)


def sse_events(response: httpx.Response) -> list[str]:
    """The data fields of a text/event-stream, parsed line by line per the SSE spec (comments skipped)."""
    events, data = [], []
    for line in response.iter_lines():
        if line == "":
            if data:
                events.append("\n".join(data))
                data = []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            assert name == "data", f"unexpected SSE field {line!r}"
            data.append(value[1:] if value.startswith(" ") else value)
    assert not data, "the stream ended inside an event"
    return events


def test_models_lists_controllers_and_the_workers_model(sdk, client_stack):
    ids = [m.id for m in sdk.models.list().data]
    assert {"native_generation", "majority_vote", "best_of_n", "mcts"} <= set(ids)
    with Client(client_stack["router"].address) as client:
        assert set(client.catalog().models) <= set(ids)
    # a worker model's own id runs native generation on that pool
    reply = sdk.chat.completions.create(model=ids[-1], messages=MESSAGES, max_tokens=3)
    assert reply.choices[0].model_extra["trellis"]["controller"] == "native_generation"
    assert sdk.models.retrieve("majority_vote").model_extra["trellis"]["kind"] == "controller"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-4o")


def test_chat_completion_matches_the_library_run(sdk, client_stack):
    reply = sdk.chat.completions.create(model="majority_vote?n=3&extractor=regex&pattern=(\\S)", messages=MESSAGES,
                                        max_tokens=6, seed=11, temperature=0.8)
    with Client(client_stack["router"].address) as client:
        direct = client.run("majority_vote", QUESTION, params={"n": 3, **VOTE},
                            sampling={"max_tokens": 6, "seed": 11, "temperature": 0.8})
    assert reply.object == "chat.completion" and reply.model == "majority_vote?n=3&extractor=regex&pattern=(\\S)"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == direct.text
    extra = choice.model_extra["trellis"]
    assert extra["answer"] == direct.answer and extra["details"]["votes"] == direct.details["votes"]
    assert extra["candidates"] == 3
    # usage: every token the method spent, all three samples
    assert reply.usage.completion_tokens == direct.usage.completion_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_is_the_same_text_and_reports_usage(sdk):
    kwargs = dict(model="native_generation", messages=MESSAGES, max_tokens=12, seed=5, temperature=0.7)
    whole = sdk.chat.completions.create(**kwargs)
    chunks = list(sdk.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_means_independent_choices_and_length_is_reported(sdk):
    reply = sdk.chat.completions.create(model="native_generation", messages=MESSAGES, max_tokens=5, n=3,
                                        extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in reply.choices)
    assert len({c.model_extra["trellis"]["run_id"] for c in reply.choices}) == 3
    assert reply.usage.completion_tokens == 15


def test_completions_streamed_and_not_with_several_prompts(sdk):
    reply = sdk.completions.create(model="native_generation", prompt=["1 + 1 =", "2 + 2 ="], max_tokens=3, n=2,
                                   seed=2)
    assert reply.object == "text_completion" and [c.index for c in reply.choices] == [0, 1, 2, 3]
    stream = list(sdk.completions.create(model="native_generation", prompt=["1 + 1 =", "2 + 2 ="], max_tokens=3,
                                         n=2, seed=2, stream=True))
    by_index: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            by_index[c.index] = by_index.get(c.index, "") + c.text
    assert by_index == {c.index: c.text for c in reply.choices}


def test_extra_body_chooses_the_controller_and_its_params(sdk):
    reply = sdk.chat.completions.create(
        model="native_generation", messages=MESSAGES, max_tokens=4,
        extra_body={"trellis": {"controller": "majority_vote", "params": {"n": 2, **VOTE}}})
    extra = reply.choices[0].model_extra["trellis"]
    assert extra["controller"] == "majority_vote" and extra["candidates"] == 2


def test_a_vote_streams_progress_in_the_trellis_field_and_the_chosen_text_as_content(sdk):
    chunks = list(sdk.chat.completions.create(model="majority_vote", messages=MESSAGES, max_tokens=6, stream=True,
                                              extra_body={"trellis": {"params": {"n": 3, **VOTE}}}))
    kinds = [c.model_extra.get("trellis", {}).get("type") for c in chunks]
    assert kinds[1] == "started" and "delta" in kinds and "intermediate" in kinds and kinds[-1] == "result"
    branches = {c.model_extra["trellis"]["branch"] for c in chunks if kinds[chunks.index(c)] == "delta"}
    assert len(branches) == 3
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    result = chunks[-1].model_extra["trellis"]
    assert result["candidates"] == 3 and content   # the winning sample's text, as content, once chosen
    # a plain client sees a normal completion: every chunk has one choice with a delta
    assert all(len(c.choices) == 1 and c.choices[0].delta is not None for c in chunks)


def test_errors_in_openai_shape(sdk, gateway):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="majority_vote?n=-2", messages=MESSAGES)
    assert info.value.status_code == 400 and info.value.body["param"] == "params.n"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="majority_vote?n=eight", messages=MESSAGES)
    assert info.value.body["param"] == "params.n"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="native_generation", messages=MESSAGES, temperature=-1)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="native_generation", messages=MESSAGES, max_tokens=0)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="native_generation", messages=MESSAGES, tools=[{
            "type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert info.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="native_generation", messages=[{"role": "user", "content": "x " * 3000}],
                                    max_tokens=2)
    assert info.value.body["param"] == "messages" and info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as info:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as info:    # errors of streamed requests before the stream: HTTP
        sdk.chat.completions.create(model="majority_vote?n=999", messages=MESSAGES, stream=True)
    assert info.value.body["param"] == "params.n"
    bad_json = httpx.post(f"http://{gateway.address}/v1/chat/completions", content=b"{nope",
                          headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]


def test_full_router_is_429_with_retry_after(client_stack, logs):
    router = start_router([client_stack["worker"].address], logs, name="gw-full-router",
                          extra=["--max-running-runs", "1", "--max-queued-runs", "0"])
    gw = None
    try:
        router.wait_serving(timeout=60)
        gw = start_gateway(router.address, logs, name="gw-full")
        gw.wait_serving(timeout=60)
        thread, _ = occupy(router.address)
        sdk = openai.OpenAI(base_url=f"http://{gw.address}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError) as info:
            sdk.chat.completions.create(model="native_generation", messages=MESSAGES, max_tokens=2)
        assert info.value.status_code == 429 and int(info.value.response.headers["retry-after"]) >= 1
        assert int(info.value.response.headers["retry-after-ms"]) >= 100
        # the SDK's own retry honours Retry-After and gets through once the slot frees
        patient = openai.OpenAI(base_url=f"http://{gw.address}/v1", api_key="unused", max_retries=8)
        assert patient.chat.completions.create(model="native_generation", messages=MESSAGES,
                                               max_tokens=2).choices[0].message.content is not None
        thread.join(60)
    finally:
        for proc in (gw, router):
            if proc is not None:
                proc.stop()


def test_bearer_token_passes_through_to_the_routers_auth(client_stack, logs, tmp_path):
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"clients": [{"name": "app", "token_sha256": hashlib.sha256(b"k3y").hexdigest(),
                                             "controllers": ["native_generation"]}]}))
    router = start_router([client_stack["worker"].address], logs, name="gw-auth-router",
                          extra=["--auth-file", str(auth)])
    gw = None
    try:
        router.wait_serving(timeout=60)
        gw = start_gateway(router.address, logs, name="gw-auth")
        gw.wait_serving(timeout=60)
        base = f"http://{gw.address}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).chat.completions.create(
                model="native_generation", messages=MESSAGES, max_tokens=2)
        good = openai.OpenAI(base_url=base, api_key="k3y", max_retries=0)
        assert good.chat.completions.create(model="native_generation", messages=MESSAGES, max_tokens=2).choices
        with pytest.raises(openai.PermissionDeniedError):
            good.chat.completions.create(model="majority_vote", messages=MESSAGES, max_tokens=2)
    finally:
        for proc in (gw, router):
            if proc is not None:
                proc.stop()


@pytest.mark.processes
def test_no_worker_is_503(logs):
    router = start_router(["127.0.0.1:1"], logs, name="gw-empty-router", extra=["--worker-wait-seconds", "0.5"])
    gw = None
    try:
        router.wait_serving(timeout=60)
        gw = start_gateway(router.address, logs, name="gw-empty")
        gw.wait_serving(timeout=60)
        sdk = openai.OpenAI(base_url=f"http://{gw.address}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            sdk.chat.completions.create(model="native_generation", messages=MESSAGES, max_tokens=2)
        assert info.value.status_code == 503
    finally:
        for proc in (gw, router):
            if proc is not None:
                proc.stop()


def cancelled_tasks(stack: dict) -> float:
    return total(scrape(stack["worker_metrics"]), "trellis_worker_tasks_total", kind="generate", code="CANCELLED")


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_run(gateway, client_stack, stream):
    """The client leaves while its run is on the worker: the worker's task ends CANCELLED and its KV is freed."""
    body = {"model": "majority_vote", "messages": MESSAGES, "stream": stream, **LONG,
            "trellis": {"params": {"n": 16}}}
    url = f"http://{gateway.address}/v1/chat/completions"
    before = cancelled_tasks(client_stack)

    async def leave_while_busy() -> tuple[float, float]:
        async with httpx.AsyncClient(timeout=60) as http:
            async def request():
                if not stream:
                    return await http.post(url, json=body)
                async with http.stream("POST", url, json=body) as response:
                    async for _ in response.aiter_lines():
                        pass

            task = asyncio.create_task(request())
            for _ in range(3000):       # until the worker holds the run's KV
                busy = worker_load(client_stack)
                if busy[0] > 0:
                    break
                await asyncio.sleep(0.005)
            task.cancel()               # closes the connection: the client is gone
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return busy

    busy_seen = asyncio.run(leave_while_busy())
    assert busy_seen[0] > 0, "the run never reached the worker"
    eventually(lambda: cancelled_tasks(client_stack) > before and idle(client_stack), timeout_s=5)
    assert cancelled_tasks(client_stack) == before + 1
    assert idle(client_stack), "the worker still holds the run's KV"


def test_sse_wire_format_read_by_an_independent_parser(gateway):
    body = {"model": "native_generation", "messages": MESSAGES, "stream": True, "max_tokens": 8, "seed": 3,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"http://{gateway.address}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "native_generation" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1
    last = chunks[-2]["choices"][0]
    assert last["finish_reason"] in ("stop", "length") and chunks[-2]["trellis"]["type"] == "result"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    plain = httpx.post(f"http://{gateway.address}/v1/chat/completions", timeout=60,
                       json={**body, "stream": False, "stream_options": None}).json()
    assert content == plain["choices"][0]["message"]["content"]
    assert "\ufffd" not in "".join(events) or "\ufffd" in content   # nothing the text did not hold


def test_health_and_metrics_endpoints(gateway):
    assert httpx.get(f"http://{gateway.address}/health", timeout=5).json()["status"] == "ok"
    assert httpx.get(f"http://{gateway.address}/health/live", timeout=5).status_code == 200


def test_concurrent_streams_all_complete(sdk):
    """Many streaming clients at once through one gateway: each gets its own whole answer."""
    results: dict[int, str] = {}

    def one(i: int) -> None:
        chunks = sdk.chat.completions.create(model="native_generation", messages=MESSAGES, max_tokens=4, seed=i,
                                             stream=True)
        results[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 12 and time.monotonic() - started < 60
