"""Bad input, property-based (issue 9): hypothesis over every field of the public requests, sent through the
generated stubs to the real router process over a real tiny-model worker (tests/conftest.py's `router`).

For every request, however malformed:
- the call returns within its deadline, OK or a status in ALLOWED: never UNKNOWN or INTERNAL, never a hang;
- INVALID_ARGUMENT details start with the offending field (`sampling.temperature: must be ...`): the field
  the example broke when it broke one, else at least a field of the request;
and after all of it the router still serves (a health check and one good run).

Bugs found here whose fixes lie outside the validation code were pinned by strict xfail tests that said
where the fix belonged, their marks removed with the fix: requests that did not parse got grpc's UNKNOWN;
two runs in flight with one run_id collided on the worker; a Session's worker-found errors lacked the run.
prefix; a stop token id past the vocabulary failed a worker's whole engine step; a run whose own text
outgrew the model's context failed with an INVALID_ARGUMENT naming no field of the request (the worker now
says CONTEXT_LENGTH_EXCEEDED and the controller ends the branch there).

Accepted runs are kept cheap: max_tokens is drawn small on the paths that pass validation, the searches get
small widths and steps unless the example is about those parameters, and verifier scoring (which the tiny
worker serves) is preferred to reward models (which it does not: UNAVAILABLE after --worker-wait-seconds).
Examples are derandomized, so CI runs the same ones every time.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from client.launcher import start_router, start_worker
from controllers import REGISTRY
from tests.conftest import ROUTER_MAX_N
from tests.helpers import chat, rich_error, run_request
from trellis_rpc.server import MAX_MESSAGE_BYTES
from trellis_rpc.v1 import common_pb2, router_pb2, router_pb2_grpc

ALLOWED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAVAILABLE,
}
DEADLINE_S = 20.0
INT32 = (-(2**31), 2**31 - 1)
TINY_VOCAB = 400   # tests/tiny_model.py's tokenizer (and the model's logits)
MESSAGE_LIMIT = MAX_MESSAGE_BYTES   # what the router accepts in one message
RUN_FIELDS = ("controller", "prompt", "sampling", "params", "model", "priority", "run_id", "stream_tokens")
GENERATE_FIELDS = ("prompt", "sampling", "model")
SCORE_FIELDS = ("prompt", "candidates", "kind", "step_separator", "model")

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- checking one call -----------------------------------------------------------------------------

def _names(details: str, field: str) -> bool:
    """details starts with `field` or a path under it: 'sampling.stop' matches 'sampling.stop[3]: ...'."""
    return details.startswith(field) and details[len(field):][:1] in (":", ".", "[")


def call(method, request, timeout: float = DEADLINE_S, stream: bool = False) -> tuple[grpc.StatusCode, str, list]:
    """(code, details, replies) of one call (a stream read to its end); fails on a hang (no answer within
    the deadline) or a status outside ALLOWED."""
    started = time.monotonic()
    replies: list = []
    try:
        if stream:
            for reply in method(request, timeout=timeout):
                replies.append(reply)
        else:
            replies.append(method(request, timeout=timeout))
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
    elapsed = time.monotonic() - started
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED and elapsed < timeout, \
        f"no answer within {timeout:.0f}s ({code.name}, {elapsed:.1f}s) for {_show(request)}"
    assert code in ALLOWED, f"{code.name}: {details!r} for {_show(request)}"
    if currently_in_test_context():
        event(code.name)   # the spread of outcomes, in --hypothesis-show-statistics
    return code, details, replies


def _show(request) -> str:
    text = str(request) if not isinstance(request, (bytes, list)) else repr(request)
    return text if len(text) < 600 else text[:600] + f"... ({len(text)} characters)"


def check_field(code: grpc.StatusCode, details: str, fields: tuple[str, ...]) -> None:
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert any(_names(details, f) for f in fields), f"INVALID_ARGUMENT names none of {fields}: {details!r}"


def run_method(router, streaming: bool):
    return (router.RunStream, True) if streaming else (router.Run, False)


# ---- strategies: values ------------------------------------------------------------------------------

texts = st.text(max_size=40)
# What protobuf carries in a float field: float32, NaN and both infinities, subnormals, signed zeros.
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
int32s = st.integers(*INT32)
uint64s = st.integers(0, 2**64 - 1)
# Struct values as a client can send them in binary: numbers include NaN and +-inf (JSON has neither).
json_scalars = st.one_of(st.none(), st.booleans(), st.floats(), st.integers(-(2**53), 2**53), texts)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
weird_numbers = st.sampled_from([0, -1, -(2**31), 2**31, 2**53, 1e9, 1e12, 1e300, -1e300, 2.5, -0.0,
                                 math.nan, math.inf, -math.inf])


_ids = itertools.count()
# Any text, made unique by a suffix: two runs in flight with one run_id collide on the worker today
# (test_runs_may_share_a_run_id), and hypothesis replays an example at once when it shrinks one.
# A model no worker serves is UNAVAILABLE only after the router's --worker-wait-seconds (2 s): kept rare.
models = st.sampled_from([""] * 15 + ["no-such-model"])
run_ids = st.one_of(st.just(""), texts.map(lambda t: f"{t}~{next(_ids)}"),
                    st.just("r" * 100_000).map(lambda t: f"{t}~{next(_ids)}"))


def _chat(messages: list[tuple[str, str]], continue_final: bool) -> common_pb2.Prompt:
    return common_pb2.Prompt(chat=common_pb2.ChatMessages(
        messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages],
        continue_final_message=continue_final))


roles = st.one_of(st.sampled_from(["user", "assistant", "system", "", "tool", " "]), texts)
prompts = st.one_of(
    st.just(common_pb2.Prompt()),                                                  # no kind set
    texts.map(lambda t: common_pb2.Prompt(text=t)),                                # incl. empty, blank, NUL
    st.sampled_from(["", " \n\t ", "word " * 400, "\u00e9\U0001f680" * 300]).map(lambda t: common_pb2.Prompt(text=t)),
    st.builds(_chat, st.lists(st.tuples(roles, texts), max_size=4), st.booleans()),
    st.lists(int32s, max_size=8).map(lambda ids: common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=ids))),
    st.lists(st.integers(0, 399), min_size=1, max_size=8).map(
        lambda ids: common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=ids))),
    st.just(common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[5] * 300))),      # longer than the context
)
stop_lists = st.lists(st.one_of(texts, st.just(""), st.just("x" * 300)), max_size=20)
# Negative (refused) or inside the vocabulary: one past it fails the worker's whole engine step today, every
# other client's sequence in it too (test_stop_token_ids_outside_the_vocabulary).
stop_token_ids = st.lists(st.one_of(st.integers(INT32[0], -1), st.integers(0, TINY_VOCAB - 1)), max_size=4)
# max_tokens: small where a run may be accepted, and the edges (<= 0 is refused; INT32_MAX is clamped to the
# tiny model's context, 256 tokens, so it stays cheap enough at n = 1).
max_tokens = st.one_of(st.integers(1, 8), st.integers(INT32[0], 0), st.just(INT32[1]))


@st.composite
def samplings(draw, max_n: int = 3) -> common_pb2.SamplingParams:
    """Any subset of the fields, each from its full wire range (floats: NaN, inf, subnormals)."""
    p = common_pb2.SamplingParams()
    for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
        if draw(st.booleans()):
            setattr(p, name, draw(floats32))
    for name in ("top_k", "min_tokens", "logprobs", "n"):
        if draw(st.booleans()):
            setattr(p, name, draw(st.one_of(st.integers(-2, max_n), int32s)))
    p.max_tokens = draw(max_tokens)
    if draw(st.booleans()):
        p.seed = draw(uint64s)
    p.stop.extend(draw(stop_lists))
    p.stop_token_ids.extend(draw(stop_token_ids))
    p.ignore_eos = draw(st.booleans())
    return p


def _in(lo: float, hi: float, **kw):
    return st.floats(lo, hi, width=32, allow_subnormal=True, **kw)


@st.composite
def valid_samplings(draw, max_n: int = 3) -> common_pb2.SamplingParams:
    """Values that pass validation, edges included (subnormal temperatures and top_p, top_k past the
    vocabulary, every seed): what reaches the worker's sampler."""
    p = common_pb2.SamplingParams()
    p.max_tokens = draw(st.integers(1, 6))
    options = {
        "temperature": _in(0, 100), "top_p": _in(0, 1, exclude_min=True), "min_p": _in(0, 1),
        "frequency_penalty": _in(-2, 2), "presence_penalty": _in(-2, 2),
        "repetition_penalty": _in(0, 10, exclude_min=True), "top_k": st.integers(0, INT32[1]),
        "min_tokens": st.integers(0, p.max_tokens), "logprobs": st.integers(0, 20), "n": st.integers(1, max_n),
        "seed": uint64s,
    }
    for name in draw(st.lists(st.sampled_from(sorted(options)), unique=True)):
        setattr(p, name, draw(options[name], label=name))
    p.stop.extend(draw(st.lists(st.text(min_size=1, max_size=10), max_size=3)))
    p.stop_token_ids.extend(draw(st.lists(st.integers(0, TINY_VOCAB - 1), max_size=3)))
    p.ignore_eos = draw(st.booleans())
    return p


def any_sampling(max_n: int):
    return st.one_of(samplings(max_n=max_n), valid_samplings(max_n=max_n))


# ---- Run / RunStream: one broken field at a time ----------------------------------------------------

def _set_sampling(name: str, values):
    def mutate(value):
        def apply(req):
            if isinstance(value, list):
                getattr(req.sampling, name).extend(value)
            else:
                setattr(req.sampling, name, value)
        return apply
    return values.map(mutate)


def _set(name: str, values):
    return values.map(lambda value: lambda req: setattr(req, name, value))


def _prompt(prompt: common_pb2.Prompt):
    return lambda req: req.prompt.CopyFrom(prompt)


def _params(raw: dict):
    return lambda req: req.params.update(raw)


SAMPLING_MUTATIONS = {
    **{f"sampling.{name}": _set_sampling(name, floats32) for name in
       ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")},
    "sampling.top_k": _set_sampling("top_k", int32s),
    "sampling.max_tokens": _set_sampling("max_tokens", max_tokens),
    "sampling.min_tokens": _set_sampling("min_tokens", int32s),
    "sampling.n": _set_sampling("n", int32s),
    "sampling.logprobs": _set_sampling("logprobs", int32s),
    "sampling.seed": _set_sampling("seed", uint64s),
    "sampling.stop": _set_sampling("stop", stop_lists),
    "sampling.stop_token_ids": _set_sampling("stop_token_ids", stop_token_ids),
    "sampling.ignore_eos": _set_sampling("ignore_eos", st.booleans()),
}
RUN_MUTATIONS = {
    "controller": _set("controller", st.one_of(texts, st.sampled_from(
        ["", " native_generation", "Native_Generation", "native_generation\x00", "n" * 10_000]))),
    "prompt": prompts.map(_prompt),
    "params": st.dictionaries(st.text(max_size=10), json_values, min_size=1, max_size=3).map(_params),
    "model": _set("model", st.sampled_from(["", "", "", "no-such-model", "\u00e9" * 50])),
    "priority": _set("priority", int32s),
    "run_id": _set("run_id", run_ids),
    "stream_tokens": _set("stream_tokens", st.booleans()),
    **SAMPLING_MUTATIONS,
}


@FUZZ
@given(field=st.sampled_from(sorted(RUN_MUTATIONS)), data=st.data(), streaming=st.booleans())
def test_run_with_one_bad_field(router, field, data, streaming):
    """A good run with one field set to anything: refused naming that field, or served."""
    request = run_request(max_tokens=4, stream_tokens=False)
    data.draw(RUN_MUTATIONS[field], label=field)(request)
    method, stream = run_method(router, streaming)
    code, details, replies = call(method, request, stream=stream)
    check_field(code, details, (field,))
    if code == grpc.StatusCode.OK and stream:
        assert replies[0].WhichOneof("event") == "started" and replies[-1].WhichOneof("event") == "result"


@st.composite
def run_requests(draw) -> router_pb2.RunRequest:
    req = router_pb2.RunRequest(
        controller=draw(st.one_of(st.sampled_from(["native_generation", "native_generation", "majority_vote"]),
                                  texts)),
        prompt=draw(prompts), sampling=draw(any_sampling(max_n=1)), model=draw(models),
        priority=draw(int32s), run_id=draw(run_ids), stream_tokens=draw(st.booleans()))
    if draw(st.booleans()):
        req.params.update(draw(st.dictionaries(st.sampled_from(["n", "extractor", "pattern", "x", ""]),
                                               json_values, max_size=3)))
    return req


@FUZZ
@given(request=run_requests(), streaming=st.booleans())
def test_run_with_everything_random(router, request, streaming):
    method, stream = run_method(router, streaming)
    code, details, _ = call(method, request, stream=stream)
    check_field(code, details, RUN_FIELDS)


# ---- controller parameters ---------------------------------------------------------------------------

# What makes each controller's accepted runs cheap on the tiny model: a parameter not being fuzzed keeps this.
CHEAP = {"n": 2, "warmup": 1, "kind": "verifier", "score_kind": "verifier", "max_step_tokens": 2, "beam_width": 2,
         "expansions": 2, "max_steps": 2, "max_expansions": 2, "iterations": 2, "breadth": 2, "beam": 2, "depth": 2,
         "max_tokens": 8, "probe_interval": 4, "probe_tokens": 2, "window": 4, "tail_tokens": 4}


def param_values(param):
    """Values for one parameter: in range, at and past its bounds, huge, non-finite, of the wrong type."""
    wrong = st.one_of(st.none(), st.booleans(), texts, st.lists(st.integers(0, 3), max_size=2),
                      st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2))
    if param.type in ("int", "float"):
        low = param.minimum if param.minimum is not None else 0
        near = st.integers(int(low) - 1, int(low) + 2)
        bounds = st.sampled_from([b for b in (param.minimum, param.maximum) if b is not None] or [0])
        return st.one_of(near, near, bounds, weird_numbers, st.floats(), wrong)
    if param.type == "bool":
        return st.one_of(st.booleans(), weird_numbers, wrong)
    names = list(param.choices) + ["auto", "regex", "boxed", "(", "(a+)+$", "native_generation", "\n\n", "x" * 300]
    return st.one_of(st.sampled_from(names), texts, weird_numbers, wrong)


@st.composite
def controller_params(draw) -> tuple[str, dict, set[str]]:
    """(controller, params, unknown keys): the cheap base, some parameters fuzzed, maybe unknown keys."""
    name = draw(st.sampled_from(sorted(REGISTRY)))
    cls = REGISTRY[name]
    raw = {p.name: CHEAP[p.name] for p in cls.params if p.name in CHEAP}
    if cls.params:
        for p in draw(st.lists(st.sampled_from(cls.params), max_size=3, unique_by=lambda p: p.name)):
            raw[p.name] = draw(param_values(p), label=f"params.{p.name}")
    known = {p.name for p in cls.params}
    unknown = draw(st.dictionaries(st.text(max_size=10).filter(lambda k: k not in known), json_values, max_size=2))
    raw.update(unknown)
    return name, raw, set(unknown)


@FUZZ
@given(case=controller_params(), streaming=st.booleans())
def test_controller_params(router, case, streaming):
    name, raw, unknown = case
    request = run_request(name, params=raw, max_tokens=4, stream_tokens=streaming)
    method, stream = run_method(router, streaming)
    code, details, _ = call(method, request, stream=stream)
    if unknown:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"unknown parameters {unknown} accepted: {code.name}"
        assert any(details.startswith(f"params.{key}:") for key in unknown), details
    check_field(code, details, ("params",))


# Past int32, past the widths a router can afford, and the non-finite: every numeric parameter of every
# controller gets each (hypothesis above samples these pairs; this covers all of them, deterministically).
HUGE = (1e9, 2**31 - 1, 2**31, 1e12, 1e300, -1e12, math.nan, math.inf, -math.inf)
# Parameters whose large values make a run write past the tiny model's context (256 tokens).
OUTGROW = {(name, "max_step_tokens") for name in ("beam_search", "best_first_search", "mcts", "tree_of_thoughts")} | {
    ("dynasor_cot", "max_tokens")}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_numeric_param_with_huge_and_non_finite_values(router, name):
    cls = REGISTRY[name]
    base = {p.name: CHEAP[p.name] for p in cls.params if p.name in CHEAP}
    for p in cls.params:
        if p.type not in ("int", "float"):
            continue
        for value in (*HUGE, *(b for b in (p.minimum, p.maximum) if b is not None)):
            if (name, p.name) in OUTGROW and CHEAP[p.name] < value <= (p.maximum or math.inf):
                continue   # text longer than the tiny model's context: test_runs_outgrowing_the_context
            request = run_request(name, params={**base, p.name: value}, max_tokens=4, stream_tokens=False)
            code, details, _ = call(router.Run, request)
            check_field(code, details, ("params",))
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert _names(details, f"params.{p.name}"), f"{p.name}={value}: {details}"
            if isinstance(value, float) and not math.isfinite(value):
                assert code == grpc.StatusCode.INVALID_ARGUMENT and _names(details, f"params.{p.name}"), details


@pytest.mark.parametrize("name,param", sorted(OUTGROW))
def test_runs_outgrowing_the_context(router, name, param):
    params = {p.name: CHEAP[p.name] for p in REGISTRY[name].params if p.name in CHEAP}
    # ignore_eos: the tiny random model may end its text early under some seeds; the run must reach the context.
    request = run_request(name, params={**params, param: 4000}, max_tokens=4, seed=0, ignore_eos=True)
    code, details, replies = call(router.Run, request)
    check_field(code, details, ("params",))
    if name == "dynasor_cot":   # reasoning up to the context, then the answer it holds
        assert code == grpc.StatusCode.OK and replies[0].details["stopped_by"] == "context", details
    else:                       # not even the first step fits the verifier's context: nothing to search
        assert code == grpc.StatusCode.OUT_OF_RANGE and "params.max_step_tokens" in details, details


# ---- Generate ----------------------------------------------------------------------------------------

@FUZZ
@given(prompt=prompts, sampling=any_sampling(max_n=4), model=models)
def test_generate(router, prompt, sampling, model):
    request = router_pb2.GenerateRequest(prompt=prompt, sampling=sampling, model=model)
    code, details, replies = call(router.Generate, request)
    check_field(code, details, GENERATE_FIELDS)
    if code == grpc.StatusCode.OK:
        assert len(replies[0].completions) == (sampling.n if sampling.HasField("n") else 1)


@pytest.mark.parametrize("token_id", [TINY_VOCAB, INT32[1]])
def test_stop_token_ids_outside_the_vocabulary(router, token_id):
    sampling = common_pb2.SamplingParams(max_tokens=2, min_tokens=1, stop_token_ids=[token_id])
    code, details, _ = call(router.Generate, router_pb2.GenerateRequest(prompt=chat("hi"), sampling=sampling))
    check_field(code, details, ("sampling.stop_token_ids",))


# ---- Score -------------------------------------------------------------------------------------------

# Mostly VERIFIER (the tiny worker serves it); OUTCOME/PROCESS find no worker (UNAVAILABLE, after
# --worker-wait-seconds), unknown kinds and UNSPECIFIED are refused.
score_kinds = st.sampled_from([3] * 8 + [0, 1, 2, 4, -1, INT32[0], INT32[1]])   # raw varints: the wire test
candidate_lists = st.one_of(
    st.lists(texts, max_size=4),
    st.lists(texts, min_size=1, max_size=4),
    st.just([]),
    st.integers(65, 5000).map(lambda k: ["answer"] * k),            # more than the worker's --max-candidates
    st.just(["word " * 400]),                                        # longer than the context
)


@FUZZ
@given(prompt=st.one_of(prompts, texts.filter(str.strip).map(chat)), candidates=candidate_lists, kind=score_kinds,
       separator=st.sampled_from(["", "\n\n", "\n", "x" * 1000]), model=models)
def test_score(router, prompt, candidates, kind, separator, model):
    request = common_pb2.ScoreRequest(prompt=prompt, candidates=candidates, kind=kind, step_separator=separator,
                                      model=model)
    code, details, replies = call(router.Score, request)
    check_field(code, details, SCORE_FIELDS)
    if not candidates and prompt.WhichOneof("kind") in ("text", "chat"):
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    if code == grpc.StatusCode.OK:
        assert len(replies[0].scores) == len(candidates)


# ---- Session -----------------------------------------------------------------------------------------

_sessions = itertools.count()


@st.composite
def sessions(draw) -> list[router_pb2.SessionRequest]:
    """Runs (good and random), cancels (of a run sent earlier, later or never), empty requests. Run ids are
    unique to their run, or empty (which a session refuses); reusing one is test_runs_may_share_a_run_id's."""
    prefix = f"s{next(_sessions)}"
    requests = []
    for i, kind in enumerate(draw(st.lists(st.sampled_from(["run", "run", "run", "cancel", "empty"]), max_size=6))):
        if kind == "cancel":
            target = draw(st.sampled_from([f"{prefix}-{j}" for j in range(6)] + ["", "never"]))
            requests.append(router_pb2.SessionRequest(cancel=router_pb2.CancelRun(run_id=target)))
        elif kind == "empty":
            requests.append(router_pb2.SessionRequest())
        else:
            run = (run_request(max_tokens=draw(st.integers(1, 4)), stream_tokens=draw(st.booleans()))
                   if draw(st.booleans()) else draw(run_requests()))
            run.run_id = draw(st.sampled_from([f"{prefix}-{i}", f"{prefix}-{i}", ""]))
            requests.append(router_pb2.SessionRequest(run=run))
    return requests


def code_of(number: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == number), grpc.StatusCode.UNKNOWN)


@FUZZ
@given(requests=sessions())
def test_session(router, requests):
    """Whatever a session pipelines, the stream ends OK once the client half-closes; each run gets exactly one
    result or error event, errors carry allowed codes and name their field (run.<field> or cancel.run_id)."""
    code, details, events = call(router.Session, iter(requests), stream=True)
    assert code == grpc.StatusCode.OK, f"{code.name}: {details}"
    cancelled = {r.cancel.run_id for r in requests if r.WhichOneof("kind") == "cancel"}
    ends: Counter[str] = Counter()
    empty = 0
    for ev in events:
        kind = ev.WhichOneof("event")
        if kind == "result":
            ends[ev.run_id] += 1
        elif kind == "error":
            status, message, field = code_of(ev.error.code), ev.error.message, ev.error.field
            if status == grpc.StatusCode.CANCELLED:
                assert ev.run_id in cancelled, f"{ev.run_id!r} cancelled, but nobody asked"
            else:
                assert status in ALLOWED, f"{status.name}: {message!r}"
            if status == grpc.StatusCode.INVALID_ARGUMENT:
                # Refused before the run starts, or found by a worker once it runs: run.<field>
                # (test_session_worker_errors_name_the_run_field). An empty request: kind.
                assert any(_names(message, f) for f in ("run", "kind", *RUN_FIELDS)), ev.error
                assert not field or _names(message, field), ev.error
            if field == "cancel.run_id":
                assert status == grpc.StatusCode.NOT_FOUND and _names(message, field), ev.error
            elif field == "kind":   # an empty request: refused, naming what is missing
                assert status == grpc.StatusCode.INVALID_ARGUMENT and not ev.run_id, ev.error
                empty += 1
            else:
                ends[ev.run_id] += 1
    asked = Counter(r.run.run_id for r in requests if r.WhichOneof("kind") == "run")
    assert ends == asked, f"results and errors per run_id {dict(ends)}, runs sent {dict(asked)}"
    assert empty == sum(r.WhichOneof("kind") is None for r in requests)


def test_session_worker_errors_name_the_run_field(router):
    long_prompt = common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[5] * 300))
    request = router_pb2.SessionRequest(run=run_request(prompt=long_prompt, max_tokens=2, run_id="long"))
    code, details, events = call(router.Session, iter([request]), stream=True)
    errors = [ev.error for ev in events if ev.WhichOneof("event") == "error"]
    assert code == grpc.StatusCode.OK and len(errors) == 1, f"{code.name}: {details}"
    assert errors[0].field == "run.prompt" and errors[0].message.startswith("run.prompt:"), errors[0]
    assert errors[0].reason == "CONTEXT_LENGTH_EXCEEDED"


@pytest.mark.parametrize("controller", ["native_generation", "beam_search", "deepconf_online"])
def test_a_prompt_too_long_for_the_context_says_so_in_the_rich_error(router, controller):
    """The field and the reason, in google.rpc details, whichever controller met the worker's refusal."""
    long_prompt = common_pb2.Prompt(text="word " * 300)
    params = {p.name: CHEAP[p.name] for p in REGISTRY[controller].params if p.name in CHEAP}
    with pytest.raises(grpc.RpcError) as info:
        router.Run(run_request(controller, prompt=long_prompt, params=params, max_tokens=2), timeout=DEADLINE_S)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and _names(err.details(), "prompt"), err.details()
    assert rich_error(err) == {"fields": ["prompt"], "reason": "CONTEXT_LENGTH_EXCEEDED"}


def test_rich_errors_of_generate_and_of_plain_bad_input(router):
    with pytest.raises(grpc.RpcError) as info:
        router.Generate(router_pb2.GenerateRequest(prompt=common_pb2.Prompt(text="word " * 300)), timeout=DEADLINE_S)
    assert rich_error(info.value) == {"fields": ["prompt"], "reason": "CONTEXT_LENGTH_EXCEEDED"}
    with pytest.raises(grpc.RpcError) as info:
        router.Run(run_request("no_such_controller"), timeout=DEADLINE_S)
    assert rich_error(info.value) == {"fields": ["controller"]}   # bad input with no particular reason


def test_runs_may_share_a_run_id(router):
    """run_id is the client's: two clients (or one, after a cancel) may use the same one at once."""
    first = router.RunStream(run_request(max_tokens=200, ignore_eos=True, run_id="shared", stream_tokens=True),
                             timeout=DEADLINE_S)
    events = [next(first), next(first)]                  # started, then a first token: it is on the worker
    assert events[-1].WhichOneof("event") == "delta"
    code, details, _ = call(router.Run, run_request(max_tokens=2, run_id="shared"))
    assert code == grpc.StatusCode.OK, f"{code.name}: {details}"
    code, details, rest = call(lambda _r, timeout: first, None, stream=True)
    assert code == grpc.StatusCode.OK and rest[-1].WhichOneof("event") == "result", f"{code.name}: {details}"


# ---- the wire: bytes protobuf would not produce ------------------------------------------------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1     # negative int32/enum values go out as 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


# (method path, the reply type, the request: a serialized good request with raw fields appended). A field
# appended again replaces a scalar and is appended to a repeated field (the protobuf merge rules).
RAW_METHODS = {
    "Run": ("/trellis.v1.Router/Run", router_pb2.RunResult, run_request(max_tokens=2)),
    "Generate": ("/trellis.v1.Router/Generate", common_pb2.GenerateResult,
                 router_pb2.GenerateRequest(prompt=chat("hi"), sampling=common_pb2.SamplingParams(max_tokens=2))),
    "Score": ("/trellis.v1.Router/Score", common_pb2.ScoreResult,
              common_pb2.ScoreRequest(prompt=chat("q"), candidates=["a"], kind=common_pb2.SCORE_KIND_VERIFIER)),
    "ListControllers": ("/trellis.v1.Router/ListControllers", router_pb2.ListControllersResponse,
                        router_pb2.ListControllersRequest()),
}
# Where a string field lies in each request, as the bytes that wrap a payload put there.
STRING_FIELDS = {
    "Run": {
        "controller": lambda b: _bytes_field(1, b),
        "prompt.text": lambda b: _bytes_field(2, _bytes_field(1, b)),
        "prompt.chat.messages[0].content": lambda b: _bytes_field(2, _bytes_field(2, _bytes_field(1, _bytes_field(
            2, b)))),
        "sampling.stop": lambda b: _bytes_field(3, _bytes_field(9, b)),
        "params": lambda b: _bytes_field(4, _bytes_field(1, _bytes_field(1, b))),   # a key of Struct.fields
        "model": lambda b: _bytes_field(5, b),
        "run_id": lambda b: _bytes_field(7, b),
    },
    "Generate": {
        "prompt.text": lambda b: _bytes_field(1, _bytes_field(1, b)),
        "sampling.stop": lambda b: _bytes_field(2, _bytes_field(9, b)),
        "model": lambda b: _bytes_field(3, b),
    },
    "Score": {
        "prompt.text": lambda b: _bytes_field(1, _bytes_field(1, b)),
        "candidates": lambda b: _bytes_field(2, b),
        "step_separator": lambda b: _bytes_field(4, b),
        "model": lambda b: _bytes_field(5, b),
    },
}
# Byte strings that are not UTF-8: a lone continuation byte, a truncated sequence, an overlong encoding,
# an encoded surrogate, a code point past U+10FFFF, bytes that never occur.
bad_utf8 = st.tuples(st.text(max_size=5), st.sampled_from(
    [b"\x80", b"\xc3", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xfe", b"\xff\xff"]),
    st.text(max_size=5)).map(lambda t: t[0].encode() + t[1] + t[2].encode())


def _raw(router_channel, method: str):
    path, reply, _ = RAW_METHODS[method]
    return router_channel.unary_unary(path, request_serializer=None, response_deserializer=reply.FromString)


@pytest.fixture(scope="module")
def fuzz_processes(tiny_model, logs):
    """A worker and a router of their own: what the fuzzing leaves on a worker (kept sequences of runs it
    broke off, waiting out their TTL) must not show up in other tests' KV counts."""
    worker = start_worker(str(tiny_model), logs, name="fuzz-worker", extra=["--threads", "1"])
    router = None
    try:
        worker.wait_serving(timeout=120)
        router = start_router([worker.address], logs, name="fuzz-router", extra=["--max-n", str(ROUTER_MAX_N)])
        router.wait_serving(timeout=60)
        yield router
    finally:
        for proc in (router, worker):
            if proc is not None:
                proc.stop()


@pytest.fixture(scope="module")
def router_channel(fuzz_processes):
    with grpc.insecure_channel(fuzz_processes.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def router(router_channel):
    return router_pb2_grpc.RouterStub(router_channel)


@pytest.mark.processes
@FUZZ
@given(method=st.sampled_from(sorted(RAW_METHODS)), data=st.data())
def test_unknown_fields_and_enum_values_on_the_wire(router_channel, method, data):
    """Fields this version does not know are skipped; enum values it does not know (ScoreRequest.kind as a raw
    varint, negative ones as 10 bytes) are refused naming the field; neither is an error of the server."""
    request = RAW_METHODS[method][2].SerializeToString()
    number = data.draw(st.integers(20, 2**29 - 1), label="unknown field number")
    extra = data.draw(st.one_of(st.binary(max_size=20).map(lambda b: _bytes_field(number, b)),
                                uint64s.map(lambda v: _varint_field(number, v))))
    unknown_kind = method == "Score" and data.draw(st.booleans())
    if unknown_kind:
        extra += _varint_field(3, data.draw(st.one_of(st.integers(4, INT32[1]), st.integers(INT32[0], -1))))
    code, details, _ = call(_raw(router_channel, method), request + extra)
    check_field(code, details, {"Run": RUN_FIELDS, "Generate": GENERATE_FIELDS, "Score": SCORE_FIELDS,
                                "ListControllers": ()}[method])
    if unknown_kind:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and _names(details, "kind"), f"{code.name}: {details}"
    else:
        assert code == grpc.StatusCode.OK, f"{code.name}: {details}"


@FUZZ
# ListControllersRequest has no fields: any bytes parse (as unknown fields) and none can be cut short.
@pytest.mark.processes
@given(method=st.sampled_from(sorted(m for m in RAW_METHODS if m != "ListControllers")), data=st.data())
def test_malformed_bytes_are_invalid_argument(router_channel, method, data):
    """Invalid UTF-8 in any string field (protobuf will not serialize it, so the bytes are written here),
    truncated messages, params nested past protobuf's recursion limit and random bytes: INVALID_ARGUMENT,
    never UNKNOWN or INTERNAL."""
    good = RAW_METHODS[method][2].SerializeToString()
    how = data.draw(st.sampled_from(["bad utf-8", "truncated", "too deep", "random"]))
    if how == "bad utf-8":
        where = data.draw(st.sampled_from(sorted(STRING_FIELDS[method])), label="field")
        request = good + STRING_FIELDS[method][where](data.draw(bad_utf8, label="bytes"))
    elif how == "truncated":
        request = good[: data.draw(st.integers(1, len(good) - 1))]
    elif how == "too deep" and method == "Run":    # params past protobuf's recursion limit (100 messages)
        request = _nested(data.draw(st.integers(40, 300))).SerializeToString()
    elif how == "too deep":    # the others have no Struct to nest: a message cut short instead
        request = good[:-1]
    else:
        request = data.draw(st.binary(min_size=1, max_size=64))
    code, details, _ = call(_raw(router_channel, method), request)
    if how != "random":   # random bytes may well parse (as a request with unknown fields)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details!r}"


# ---- size --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [300_000, 3_000_000, MESSAGE_LIMIT + 1])
def test_oversized_prompts_are_refused(router, size):
    """Past the context, past the router's prompt limit, past the gRPC message limit: refused, not served and
    not a crash (RESOURCE_EXHAUSTED is gRPC's own answer to a message over the limit)."""
    request = run_request(prompt=common_pb2.Prompt(text="a" * size), max_tokens=2)
    for method, stream in ((router.Run, False), (router.RunStream, True)):
        code, details, _ = call(method, request, timeout=60, stream=stream)
        if size > MESSAGE_LIMIT:
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, f"{code.name}: {details}"
        else:
            assert code == grpc.StatusCode.INVALID_ARGUMENT and _names(details, "prompt"), f"{code.name}: {details}"


def _nested(depth: int) -> router_pb2.RunRequest:
    """A run whose params hold a Struct `depth` levels deep (each level is three messages on the wire:
    the map entry, the Value and the Struct)."""
    request = run_request(max_tokens=2)
    value = request.params.fields["deep"]
    for _ in range(depth):
        value = value.struct_value.fields["x"]
    value.number_value = 1
    return request


def test_nested_params(router):
    """A Struct nested as deep as protobuf parses is refused as the unknown parameter it is."""
    code, details, _ = call(router.Run, _nested(25))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("params.deep:"), details


# ---- and afterwards ----------------------------------------------------------------------------------

def test_router_still_serves_after_the_fuzzing(router, fuzz_processes):
    """Last in the file: after everything above, the router is healthy and serves a normal run."""
    with grpc.insecure_channel(fuzz_processes.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="trellis.v1.Router"),
                                                          timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    result = router.Run(run_request("native_generation", max_tokens=4, seed=0), timeout=30)
    assert result.usage.completion_tokens >= 1 and result.controller == "native_generation"
    stream = list(router.RunStream(run_request("majority_vote", params={"n": 2}, max_tokens=4), timeout=30))
    assert stream[-1].WhichOneof("event") == "result"
