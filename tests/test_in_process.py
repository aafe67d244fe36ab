"""Controllers in this process against an in-process worker (engine on its own thread), through the
router's own dispatch path: what a notebook does."""

from __future__ import annotations

from controllers import Prompt
from controllers.majority_vote import MajorityVote
from router.local import run_local
from trellis_rpc.v1 import common_pb2
from trellis_rpc.worker_service import WorkerService
from worker_cpu.engine import TorchEngine
from worker_cpu.model_loader import load_model


def test_majority_vote_runs_in_process(tiny_model):
    engine = TorchEngine(load_model(str(tiny_model)), max_batch_size=8, kv_cache_tokens=4096, threads=1)
    service = WorkerService(worker_id="local-0")
    service.attach(engine)
    deltas = []
    try:
        result = run_local(MajorityVote.from_params({"n": 4}), Prompt(text="What is 3 + 4?"), [service],
                           sampling=common_pb2.SamplingParams(max_tokens=8, seed=3),
                           on_delta=lambda branch, text, count: deltas.append(branch), timeout_s=60)
    finally:
        engine.close()
    assert len(result.candidates) == 4
    assert {c.branch for c in result.candidates} == {f"sample/{i}" for i in range(4)}
    assert set(deltas) <= {f"sample/{i}" for i in range(4)} and deltas
    load = engine.load()
    assert load.running_sequences == 0 and load.queue_depth == 0
