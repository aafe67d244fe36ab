"""Deltas that queue up behind a busy stream are merged per sample (worker) or per branch (router),
in order, with anything else a barrier: no token is lost, reordered or duplicated."""

from __future__ import annotations

from router.events import coalesce_events
from trellis_rpc.v1 import common_pb2, router_pb2, worker_pb2
from worker_runtime.service import coalesce_deltas


def delta(task: str, index: int, text: str, token: int, finish: int = 0) -> worker_pb2.WorkerResponse:
    return worker_pb2.WorkerResponse(task_id=task, delta=worker_pb2.TokenDelta(
        index=index, text=text, token_ids=[token], logprobs=[common_pb2.TokenLogprob(token_id=token, logprob=-0.5)],
        finish_reason=finish))


def test_worker_merges_each_samples_queued_deltas_and_keeps_results_after_them():
    queued = [delta("a", 0, "he", 1), delta("a", 1, "x", 9), delta("b", 0, "q", 5), delta("a", 0, "llo", 2),
              worker_pb2.WorkerResponse(task_id="b", generate_result=common_pb2.GenerateResult()),
              delta("a", 0, "!", 3, finish=common_pb2.FINISH_REASON_STOP)]
    out = coalesce_deltas(queued)
    kinds = [(r.task_id, r.WhichOneof("kind"), r.delta.index if r.HasField("delta") else None) for r in out]
    assert kinds == [("a", "delta", 0), ("a", "delta", 1), ("b", "delta", 0), ("b", "generate_result", None),
                     ("a", "delta", 0)]
    assert (out[0].delta.text, list(out[0].delta.token_ids)) == ("hello", [1, 2])
    assert [lp.token_id for lp in out[0].delta.logprobs] == [1, 2]
    assert out[-1].delta.finish_reason == common_pb2.FINISH_REASON_STOP


def test_router_merges_each_branchs_queued_deltas_around_other_events():
    def d(branch, text, n, ms):
        return router_pb2.RunEvent(run_id="r", elapsed_ms=ms, delta=router_pb2.BranchDelta(
            branch=branch, text=text, token_count=n))

    vote = router_pb2.RunEvent(run_id="r", intermediate=router_pb2.Intermediate(kind="vote"))
    out = coalesce_events([d("s/0", "a", 1, 1.0), d("s/1", "b", 1, 2.0), d("s/0", "c", 2, 3.0), vote,
                           d("s/0", "e", 1, 4.0)])
    assert [(e.WhichOneof("event"), e.delta.branch, e.delta.text, e.delta.token_count) for e in out] == [
        ("delta", "s/0", "ac", 3), ("delta", "s/1", "b", 1), ("intermediate", "", "", 0), ("delta", "s/0", "e", 1)]
    assert out[0].elapsed_ms == 3.0
