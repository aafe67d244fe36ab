"""Reward scoring: outcome and process reward models on their own workers, the verifier on the causal LM's
worker. Scores from the worker processes must equal what the Hugging Face model computes here, one
candidate at a time and unpadded; the router must route score tasks by capability."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from client.launcher import start_router, start_worker
from tests.helpers import chat
from tests.test_worker_stream import Stream, generate
from tests.tiny_model import build_tiny_reward_model
from trellis_rpc.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

QUESTION = "What is 3 + 4?"
CANDIDATES = [
    "7",
    "The answer is 7.",
    "Step 1: add the numbers.\n\nStep 2: 3 + 4 = 7.\n\nTherefore the final answer is \\boxed{7}.",
    "Step 1: add the numbers.\n\nThe answer is 12.\n\n",   # a trailing separator ends no extra step
]
OUTCOME, PROCESS = common_pb2.SCORE_KIND_OUTCOME, common_pb2.SCORE_KIND_PROCESS
VERIFIER = common_pb2.SCORE_KIND_VERIFIER
INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION


def im(role: str, content: str) -> str:
    """tests.tiny_model.CHAT_TEMPLATE, written out."""
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def score_request(kind=OUTCOME, candidates=None, prompt=None, **fields) -> common_pb2.ScoreRequest:
    return common_pb2.ScoreRequest(prompt=prompt or common_pb2.Prompt(text=QUESTION),
                                   candidates=CANDIDATES if candidates is None else candidates, kind=kind, **fields)


def ends(task_id: str):
    return lambda r: r.task_id == task_id and r.WhichOneof("kind") in ("score_result", "generate_result", "error")


def on_worker(address: str, *requests: worker_pb2.WorkerRequest) -> list[worker_pb2.WorkerResponse]:
    """Send tasks on one Connect stream; the last response of each, in order."""
    with grpc.insecure_channel(address) as channel:
        s = Stream(worker_pb2_grpc.WorkerStub(channel))
        try:
            out = []
            for req in requests:
                s.send(req)
                out.append(s.until(ends(req.task_id))[-1])
            return out
        finally:
            s.close()


def score_task(task_id: str, request: common_pb2.ScoreRequest, timeout_ms: int = 0) -> worker_pb2.WorkerRequest:
    return worker_pb2.WorkerRequest(task_id=task_id, timeout_ms=timeout_ms,
                                    score=worker_pb2.ScoreTask(request=request))


def score(address: str, request: common_pb2.ScoreRequest) -> common_pb2.ScoreResult:
    response = on_worker(address, score_task("s", request))[0]
    assert response.WhichOneof("kind") == "score_result", response
    return response.score_result


# ---- fixtures: two reward-model workers, started together ---------------------------------------------

@pytest.fixture(scope="module")
def orm_dir(tmp_path_factory):
    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny-orm"), head="sequence", num_labels=1, arch="llama")


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory):
    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny-prm"), head="token", num_labels=2, arch="qwen2",
                                   seed=1)


@pytest.fixture(scope="module")
def reward_workers(orm_dir, prm_dir, logs):
    # float32: the scores are checked against the HF model's own in float32 (--dtype auto may pick bfloat16)
    procs = [start_worker(str(path), logs, name=name, extra=["--threads", "1", "--dtype", "float32"])
             for path, name in ((orm_dir, "orm-worker"), (prm_dir, "prm-worker"))]
    try:
        for p in procs:
            p.wait_serving(timeout=120)
        yield procs
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def orm_worker(reward_workers):
    return reward_workers[0]


@pytest.fixture(scope="module")
def prm_worker(reward_workers):
    return reward_workers[1]


@pytest.fixture(scope="module")
def score_router(tiny_worker, orm_worker, logs):
    proc = start_router([tiny_worker.address, orm_worker.address], logs, name="score-router",
                        extra=["--worker-wait-seconds", "0.5"])
    try:
        proc.wait_serving(timeout=60)
        with grpc.insecure_channel(proc.address) as channel:
            yield router_pb2_grpc.RouterStub(channel)
    finally:
        proc.stop()


def worker_info(address: str) -> worker_pb2.WorkerInfo:
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=10)


# ---- scores equal the Hugging Face model's, run here one candidate at a time ------------------------

@pytest.mark.processes
def test_outcome_scores_match_the_hf_model(orm_worker, orm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = score(orm_worker.address, score_request(OUTCOME))
    model = AutoModelForSequenceClassification.from_pretrained(orm_dir).eval()
    tok = AutoTokenizer.from_pretrained(orm_dir)
    expected, tokens = [], 0
    with torch.no_grad():
        for c in CANDIDATES:
            ids = tok(im("user", QUESTION) + im("assistant", c), add_special_tokens=False, return_tensors="pt")
            expected.append(model(**ids).logits[0, 0].item())
            tokens += ids["input_ids"].shape[1]
    assert [s.index for s in result.scores] == list(range(len(CANDIDATES)))
    assert [s.score for s in result.scores] == pytest.approx(expected, abs=1e-4)
    assert len(set(round(e, 3) for e in expected)) == len(expected), "the tiny ORM should tell candidates apart"
    assert all(not s.step_scores for s in result.scores)
    assert result.usage.prompt_tokens == tokens and result.usage.tasks == 1
    assert result.model_id == orm_dir.name and result.worker_id == worker_info(orm_worker.address).worker_id
    assert result.timings.latency_ms > 0


def prm_reference(prm_dir, question: str, candidates: list[str], sep: str) -> list[list[float]]:
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    model = AutoModelForTokenClassification.from_pretrained(prm_dir).eval()
    tok = AutoTokenizer.from_pretrained(prm_dir)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for c in candidates:
            ids = enc(im("user", question) + "<|im_start|>assistant\n")
            ends_at = []
            for step in [s for s in c.split(sep) if s.strip()]:
                ids += enc(step + sep)
                ends_at.append(len(ids) - 1)
            ids += enc("<|im_end|>\n")
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            out.append(torch.softmax(logits[ends_at], dim=-1)[:, 1].tolist())
    return out


@pytest.mark.processes
def test_process_scores_match_the_hf_model(prm_worker, prm_dir):
    result = score(prm_worker.address, score_request(PROCESS))
    expected = prm_reference(prm_dir, QUESTION, CANDIDATES, "\n\n")
    assert [len(s.step_scores) for s in result.scores] == [1, 1, 3, 2]
    for got, want in zip(result.scores, expected, strict=True):
        assert list(got.step_scores) == pytest.approx(want, abs=1e-4)
        assert got.score == pytest.approx(min(want), abs=1e-4)
    # Another separator, and a chat prompt.
    candidates = ["Step 1: add.\nStep 2: check.", "The answer is 7."]
    result = score(prm_worker.address, score_request(PROCESS, candidates, prompt=chat(QUESTION), step_separator="\n"))
    expected = prm_reference(prm_dir, QUESTION, candidates, "\n")
    assert [list(s.step_scores) for s in result.scores] == [pytest.approx(e, abs=1e-4) for e in expected]


def test_verifier_scores_match_the_hf_model(tiny_worker, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torch_engine.scoring import yes_no_token_ids

    result = score(tiny_worker.address, score_request(VERIFIER, prompt=chat(QUESTION)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    yes, no = yes_no_token_ids(tok)
    # The tiny vocabulary has no "Yes"/"No" token: the first token of each spelling stands in.
    assert tok.convert_ids_to_tokens(yes) == ["Y"] and tok.convert_ids_to_tokens(no) == ["N"]
    expected = []
    with torch.no_grad():
        for c in CANDIDATES:
            text = f"Question: {QUESTION}\nProposed answer: {c}\nIs the proposed answer correct? Answer Yes or No."
            ids = tok(im("user", text) + "<|im_start|>assistant\n", add_special_tokens=False, return_tensors="pt")
            p = torch.softmax(model(**ids).logits[0, -1], dim=-1)
            expected.append((p[yes].sum() / (p[yes].sum() + p[no].sum())).item())
    assert [s.score for s in result.scores] == pytest.approx(expected, abs=1e-4)
    assert result.model_id == worker_info(tiny_worker.address).model_id


# ---- capabilities, load reports, routing ---------------------------------------------------------------

def test_capabilities(tiny_worker, orm_worker, prm_worker):
    assert list(worker_info(orm_worker.address).capabilities) == [common_pb2.CAPABILITY_SCORE_OUTCOME]
    assert list(worker_info(prm_worker.address).capabilities) == [common_pb2.CAPABILITY_SCORE_PROCESS]
    caps = set(worker_info(tiny_worker.address).capabilities)
    assert {common_pb2.CAPABILITY_GENERATE, common_pb2.CAPABILITY_SCORE_VERIFIER} <= caps
    assert not caps & {common_pb2.CAPABILITY_SCORE_OUTCOME, common_pb2.CAPABILITY_SCORE_PROCESS}
    with grpc.insecure_channel(orm_worker.address) as channel:
        s = Stream(worker_pb2_grpc.WorkerStub(channel))
        try:
            load = s.until(lambda r: r.WhichOneof("kind") == "load", limit=20)[-1].load
        finally:
            s.close()
    assert list(load.capabilities) == [common_pb2.CAPABILITY_SCORE_OUTCOME] and load.model_id
    assert load.queue_depth == 0 and load.running_sequences == 0


def test_router_routes_score_tasks_by_capability(score_router, tiny_worker, orm_worker):
    orm_id = worker_info(orm_worker.address).worker_id
    lm_id = worker_info(tiny_worker.address).worker_id
    outcome = score_router.Score(score_request(OUTCOME), timeout=30)
    assert outcome.worker_id == orm_id
    assert [s.score for s in outcome.scores] == pytest.approx(
        [s.score for s in score(orm_worker.address, score_request(OUTCOME)).scores], abs=1e-5)
    assert score_router.Score(score_request(VERIFIER), timeout=30).worker_id == lm_id
    for _ in range(3):  # generation never lands on the reward model's worker
        gen = score_router.Generate(router_pb2.GenerateRequest(
            prompt=chat("hi"), sampling=common_pb2.SamplingParams(max_tokens=2)), timeout=30)
        assert gen.worker_id == lm_id
    with pytest.raises(grpc.RpcError) as err:
        score_router.Score(score_request(PROCESS), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no worker can score process steps" in err.value.details()


@pytest.mark.parametrize("request_, field", [
    (common_pb2.ScoreRequest(candidates=["a"], kind=OUTCOME), "prompt"),
    (score_request(OUTCOME, prompt=common_pb2.Prompt(text="  ")), "prompt.text"),
    (score_request(OUTCOME, prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[1, 2]))), "prompt.token_ids"),
    (score_request(OUTCOME, candidates=[]), "candidates"),
    (score_request(common_pb2.SCORE_KIND_UNSPECIFIED), "kind"),
    (score_request(17), "kind"),
    (score_request(PROCESS, candidates=["fine", "\n\n  \n\n"]), "candidates[1]"),
])
def test_bad_score_requests_name_the_field(score_router, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        score_router.Score(request_, timeout=30)
    assert err.value.code() == INVALID
    assert err.value.details().startswith(f"{field}: ")


@pytest.mark.processes
def test_reward_worker_refuses_what_it_cannot_do_and_keeps_serving(orm_worker):
    replies = on_worker(
        orm_worker.address,
        generate("g1", max_tokens=2),
        score_task("s1", score_request(VERIFIER)),
        score_task("s2", score_request(OUTCOME, model="some-other-model")),
        score_task("s3", score_request(OUTCOME, candidates=["ok", "word " * 300])),
        score_task("s4", score_request(OUTCOME, candidates=["a"] * 65)),
        score_task("s5", score_request(OUTCOME, candidates=["a"])),
    )
    errors = [r.error for r in replies[:5]]
    assert [e.code for e in errors] == [PRECONDITION.value[0]] * 3 + [INVALID.value[0]] * 2
    assert errors[0].message == "this worker serves a reward model and cannot generate"
    assert [e.field for e in errors[1:]] == ["kind", "model", "candidates[1]", "candidates"]
    assert "context" in errors[3].message and errors[3].reason == "CONTEXT_LENGTH_EXCEEDED"
    assert errors[4].reason == ""
    assert replies[5].WhichOneof("kind") == "score_result" and len(replies[5].score_result.scores) == 1


@pytest.mark.processes
def test_deadline_and_cancel_of_score_tasks(orm_worker):
    heavy = score_request(OUTCOME, candidates=["Step 1: add the numbers. " * 20] * 64)
    late = on_worker(orm_worker.address, score_task("d1", heavy, timeout_ms=1))[0]
    assert late.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    with grpc.insecure_channel(orm_worker.address) as channel:
        s = Stream(worker_pb2_grpc.WorkerStub(channel))
        try:
            s.send(score_task("c1", heavy))
            s.send(worker_pb2.WorkerRequest(task_id="x", cancel=worker_pb2.CancelTask(target_task_id="c1")))
            end = s.until(ends("c1"))[-1]
            # Either the cancel arrived while the task waited or ran (CANCELLED), or the batch was already done.
            assert end.WhichOneof("kind") == "score_result" or end.error.code == grpc.StatusCode.CANCELLED.value[0]
            s.send(score_task("ok", score_request(OUTCOME, candidates=["a"])))
            assert s.until(ends("ok"))[-1].WhichOneof("kind") == "score_result"
        finally:
            s.close()


# ---- the scorers in process ------------------------------------------------------------------------

def loaded_reward_model(path):
    from torch_engine.model_loader import load_any

    loaded = load_any(str(path))
    assert loaded.kind in ("outcome", "process")
    return loaded


def test_outcome_scorer_variants(tmp_path):
    """Several labels (softmax, last label), no pad id in the config (one candidate per forward), no chat
    template (prompt + newline + candidate), small batches: always the unpadded model's numbers."""
    from transformers import AutoModelForSequenceClassification

    from torch_engine.scoring import OutcomeScorer
    from worker_runtime.engine_api import PromptInput, ScoreInput

    path = build_tiny_reward_model(tmp_path / "orm3", num_labels=3, pad_in_config=False, chat_template=None, seed=2)
    loaded = loaded_reward_model(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = loaded.tokenizer
    def last_label(model) -> list[float]:
        with torch.no_grad():
            return [torch.softmax(model(**tok(QUESTION + "\n" + c, return_tensors="pt")).logits[0], -1)[-1].item()
                    for c in CANDIDATES]

    expected = last_label(model)
    request = ScoreInput(PromptInput(text=QUESTION), list(CANDIDATES), "outcome")
    unbatched = OutcomeScorer(loaded, start_thread=False)
    assert not unbatched._batchable
    scores, _ = unbatched.score_now(request)
    assert [s.score for s in scores] == pytest.approx(expected, abs=1e-5)

    loaded.model.config.pad_token_id = tok.pad_token_id
    small = OutcomeScorer(loaded, start_thread=False, max_batch_tokens=60)
    assert len(small._batches(small.rows(request))) > 1
    expected = last_label(loaded.model)  # with the pad id set, the model pools the last non-pad token
    assert [s.score for s in small.score_now(request)[0]] == pytest.approx(expected, abs=1e-5)


def test_scorer_runs_off_the_event_loop(orm_dir):
    from torch_engine.scoring import scorer_for
    from trellis_rpc.errors import StatusError
    from worker_runtime.engine_api import PromptInput, ScoreInput

    scorer = scorer_for(loaded_reward_model(orm_dir))
    request = ScoreInput(PromptInput(text=QUESTION), list(CANDIDATES), "outcome")

    async def main():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        out = await asyncio.gather(*(scorer.score(f"t{i}", request) for i in range(4)))
        ticker.cancel()
        return out, ticks

    try:
        outs, ticks = asyncio.run(main())
        assert ticks > 10, "the event loop must keep running while the scorer works"
        assert all([s.score for s in o.scores] == [s.score for s in outs[0].scores] for o in outs)
        assert scorer.load().queue_depth == 0
    finally:
        scorer.close()
    with pytest.raises(StatusError):
        asyncio.run(scorer.score("late", request))


def test_an_operator_context_cap_bounds_what_a_scorer_takes(orm_dir):
    from torch_engine.scoring import scorer_for
    from trellis_rpc.errors import StatusError
    from worker_runtime.engine_api import PromptInput, ScoreInput

    loaded = loaded_reward_model(orm_dir)
    request = ScoreInput(PromptInput(text=QUESTION), ["4", "the answer is " * 10], "outcome")
    uncapped = scorer_for(loaded, start_thread=False)
    assert len(uncapped.score_now(request)[0]) == 2                # the model's own 256 tokens take both
    short, long = (len(row.ids) for row in uncapped.rows(request))
    capped = scorer_for(loaded, start_thread=False, max_context=short + 1)
    assert capped.info.max_context_tokens == short + 1 < long
    with pytest.raises(StatusError) as info:
        capped.score_now(request)
    assert (info.value.field, info.value.reason) == ("candidates[1]", "CONTEXT_LENGTH_EXCEEDED")


def test_a_gated_scorer_holds_a_worse_ranked_run_s_task_until_the_gate_opens_or_the_bound(orm_dir):
    """run_las on a CPU worker: the verifier shares the engine's cores, so a score task of a run ranked below what
    the engine serves waits (the gate), for at most starvation_s from its arrival; a cancelled one is dropped."""
    import threading
    import time

    from torch_engine.scoring import scorer_for
    from worker_runtime.engine_api import PromptInput, RunInfo, ScoreInput

    scorer = scorer_for(loaded_reward_model(orm_dir))
    request = ScoreInput(PromptInput(text=QUESTION), list(CANDIDATES), "outcome", run=RunInfo("long", tokens=9000))
    closed = threading.Event()
    seen: list[RunInfo | None] = []

    def gate(run):
        seen.append(run)
        return not closed.is_set()

    scorer.gate = gate
    try:
        async def opened_after(delay: float) -> float:
            started = time.perf_counter()
            asyncio.get_running_loop().call_later(delay, closed.set)
            await scorer.score("held", request)
            return time.perf_counter() - started

        assert asyncio.run(opened_after(0.3)) >= 0.3 and seen[0] == request.run
        closed.clear()
        scorer.starvation_s = 0.2

        async def bounded() -> float:
            started = time.perf_counter()
            await scorer.score("starved", request)
            return time.perf_counter() - started

        assert 0.2 <= asyncio.run(bounded()) < 5.0     # the gate never opened: the bound let it through
    finally:
        scorer.close()
