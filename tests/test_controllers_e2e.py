"""Every registered controller end to end: a real router in front of a generating worker (tiny Llama, which
also verifies) and reward-model workers (tiny outcome and process models), through the generated stubs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import json_format

from client.launcher import start_router, start_worker
from controllers import REGISTRY
from tests.helpers import chat, run_request
from tests.tiny_model import build_tiny_reward_model
from trellis_rpc.v1 import router_pb2, router_pb2_grpc

# Small budgets so each run takes a second or two on the tiny model; every score kind is served here.
PARAMS: dict[str, dict] = {
    "native_generation": {},
    "majority_vote": {"n": 3},
    "weighted_majority_vote": {"n": 3, "score_kind": "process"},
    "budget_majority_vote": {"n": 4, "parallel": 2},
    "best_of_n": {"n": 3, "score_kind": "outcome"},
    "dynasor_cot": {"max_tokens": 24, "probe_interval": 8, "agree": 2, "probe_tokens": 4},
    "deepconf_offline": {"n": 3, "logprobs": 5, "window": 4},
    "deepconf_online": {"n": 5, "warmup": 2, "logprobs": 5, "window": 4},
    "beam_search": {"beam_width": 2, "expansions": 2, "max_steps": 2, "max_step_tokens": 6},
    "best_first_search": {"max_expansions": 3, "expansions": 2, "max_steps": 2, "max_step_tokens": 6,
                          "kind": "outcome"},
    "mcts": {"iterations": 3, "expansions": 2, "max_steps": 2, "max_step_tokens": 6, "kind": "verifier"},
    "tree_of_thoughts": {"breadth": 2, "beam": 2, "depth": 2, "max_step_tokens": 6},
}


@contextlib.contextmanager
def router_with_reward_models(generator: str, logs, tmp_path_factory, prefix: str) -> Iterator:
    """A router over the generating worker at `generator` plus workers serving a tiny outcome and a tiny process
    reward model (the controllers that score need them): its stub, every process stopped after."""
    orm = build_tiny_reward_model(tmp_path_factory.mktemp(f"{prefix}-orm"), head="sequence", num_labels=1)
    prm = build_tiny_reward_model(tmp_path_factory.mktemp(f"{prefix}-prm"), head="token", num_labels=2, arch="qwen2")
    workers = [start_worker(str(path), logs, name=name, extra=["--threads", "1"])
               for path, name in ((orm, f"{prefix}-orm"), (prm, f"{prefix}-prm"))]
    router = None
    try:
        for w in workers:
            w.wait_serving(timeout=120)
        router = start_router([generator] + [w.address for w in workers], logs, name=f"{prefix}-router",
                              extra=["--max-n", "16"])
        router.wait_serving(timeout=60)
        with grpc.insecure_channel(router.address) as channel:
            yield router_pb2_grpc.RouterStub(channel)
    finally:
        for proc in [router, *workers]:
            if proc is not None:
                proc.stop()


@pytest.fixture(scope="module")
def full_router(tiny_worker, logs, tmp_path_factory):
    with router_with_reward_models(tiny_worker.address, logs, tmp_path_factory, "e2e") as stub:
        yield stub


def test_every_registered_controller_has_an_end_to_end_case():
    assert sorted(PARAMS) == sorted(REGISTRY)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_controller_streams_and_completes(full_router, name):
    request = run_request(name, prompt=chat("What is 3 + 4? Answer with a number."), params=PARAMS[name],
                          max_tokens=12, seed=5, temperature=0.8)
    events = list(full_router.RunStream(request, timeout=120))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "result", kinds
    assert "delta" in kinds, f"{name} streamed no tokens"
    result = events[-1].result
    assert result.controller == name
    assert result.usage.completion_tokens > 0 and result.usage.tasks >= 1
    # Every streamed token is accounted for in the run's usage (nothing streamed twice or lost).
    streamed = sum(e.delta.token_count for e in events if e.WhichOneof("event") == "delta")
    assert 0 < streamed <= result.usage.completion_tokens
    started = json_format.MessageToDict(events[0].started.params)
    assert set(started) == {p.name for p in REGISTRY[name].params}


def test_list_controllers_describes_every_parameter(full_router):
    reply = full_router.ListControllers(router_pb2.ListControllersRequest(), timeout=10)
    by_name = {c.name: c for c in reply.controllers}
    assert set(by_name) == set(REGISTRY)
    for name, spec in by_name.items():
        assert spec.description, name
        for p in spec.params:
            assert p.description and p.type in ("int", "float", "str", "bool"), (name, p.name)
