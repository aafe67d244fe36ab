"""Controllers in this process against an in-process worker (engine on its own thread), through the
router's own dispatch path: what a notebook does."""

from __future__ import annotations

import pytest

from controllers import Cancel, Controller, Generate, Prompt, Result, WaitAny
from controllers.dynasor import DynasorCoT
from controllers.majority_vote import MajorityVote
from router.local import run_local
from tests.helpers import eventually
from torch_engine.engine import TorchEngine
from torch_engine.model_loader import load_model
from trellis_rpc.v1 import common_pb2
from worker_runtime.service import WorkerService


@pytest.fixture
def engine(tiny_model):
    engine = TorchEngine(load_model(str(tiny_model)), max_batch_size=8, kv_cache_tokens=4096, threads=1)
    yield engine
    engine.close()


def test_majority_vote_runs_in_process(engine):
    service = WorkerService(worker_id="local-0")
    service.attach(engine)
    deltas = []
    try:
        result = run_local(MajorityVote.from_params({"n": 4}), Prompt(text="What is 3 + 4?"), [service],
                           sampling=common_pb2.SamplingParams(max_tokens=8, seed=3),
                           on_delta=lambda branch, text, count: deltas.append(branch), timeout_s=60)
    finally:
        pass
    assert len(result.candidates) == 4
    assert {c.branch for c in result.candidates} == {f"sample/{i}" for i in range(4)}
    assert set(deltas) <= {f"sample/{i}" for i in range(4)} and deltas
    load = engine.load()
    assert load.running_sequences == 0 and load.queue_depth == 0


class CancelsTheLongBranch(Controller):
    """Starts a long and a short sample, waits for the short one, cancels the long one."""

    name = "cancels_the_long_branch"
    description = "test"

    def run(self, prompt):
        long = Generate(prompt, branch="long", sampling={"max_tokens": 2000, "ignore_eos": True})
        short = Generate(prompt, branch="short", sampling={"max_tokens": 2, "ignore_eos": True})
        done = yield WaitAny([long, short])
        running = self.load()  # the long branch holds KV while it runs
        yield Cancel([long])
        return Result(answer=str(done == [short]), details={
            "running_before": running.running_sequences, "blocks_before": running.kv_blocks_used,
            "long_finish": long.output.samples[0].finish_reason, "long_tokens": long.output.completion_tokens})


def test_cancelling_a_branch_frees_its_sequence_on_the_worker(engine):
    service = WorkerService(worker_id="local-1")
    service.attach(engine)
    controller = CancelsTheLongBranch()
    controller.load = engine.load
    result = run_local(controller, Prompt(text="What is 3 + 4?"), [service], timeout_s=60)
    assert result.answer == "True"
    assert result.details["running_before"] == 1 and result.details["blocks_before"] > 0
    assert result.details["long_finish"] == "cancelled" and result.details["long_tokens"] < 2000
    # The worker frees the cancelled sequence at its next step: the load report shows it.
    eventually(lambda: (engine.load().running_sequences, engine.load().kv_blocks_used) == (0, 0))
    load = engine.load()
    assert (load.running_sequences, load.kv_blocks_used) == (0, 0)


def test_what_a_run_kept_is_released_when_it_ends(engine):
    """Dynasor keeps its reasoning on the worker between chunks (keep_s 30 s); once the run is over nothing
    will continue it, so the router tells the worker to drop it then, not 30 s later."""
    service = WorkerService(worker_id="local-2")
    service.attach(engine)
    kept = []
    result = run_local(DynasorCoT.from_params({"max_tokens": 16, "probe_interval": 4, "agree": 10}),
                       Prompt(text="What is 3 + 4?"), [service], sampling=common_pb2.SamplingParams(seed=1),
                       on_event=lambda e: kept.append(engine.load().kept_sequences), timeout_s=60)
    assert result.details["chunks"] >= 2 and max(kept) >= 1
    eventually(lambda: (engine.load().kept_sequences, engine.load().kv_blocks_used) == (0, 0))
    load = engine.load()
    assert (load.kept_sequences, load.kv_blocks_used) == (0, 0)
