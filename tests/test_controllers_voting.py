"""Voting controllers against the scripted runner: weighted vote, best-of-n, budget vote, DeepConf, Dynasor.

Scripts stream one word per token, so early stops, cancellation and token counts are real."""

from __future__ import annotations

import pytest

from controllers import CONTEXT_LENGTH_EXCEEDED, ControllerError, Intermediate, Message, ParamError, Prompt, TaskFailure
from controllers.answers import beta_majority_probability
from controllers.best_of_n import BestOfN
from controllers.budget_vote import BudgetMajorityVote
from controllers.deepconf import (
    DeepConfOffline,
    DeepConfOnline,
    group_confidences,
    percentile,
    token_confidence,
    trace_confidence,
)
from controllers.dynasor import PROBE, DynasorCoT
from controllers.majority_vote import MajorityVote
from controllers.weighted_vote import WeightedMajorityVote
from tests.scripted import Script, ScriptedRunner, run_controller


def words(n: int, word: str = "w") -> str:
    return " ".join([word] * n)


def events(rec, kind: str) -> list[Intermediate]:
    return [e for e in rec.events if isinstance(e, Intermediate) and e.kind == kind]


def by_index(texts: list[str]):
    return lambda task, i: texts[i]


# ---- weighted majority vote -------------------------------------------------------------------


def test_weighted_vote_follows_the_rewards_over_the_plain_majority():
    texts = ["so \\boxed{7}", "it is 7", "7 again", "surely \\boxed{8}", "8", "no idea"]
    runner = ScriptedRunner(by_index(texts),
                            score_fn=lambda task: [0.9 if "8" in c else 0.1 for c in task.candidates])
    rec = run_controller(WeightedMajorityVote.from_params({"n": 6}), runner)
    r = rec.result
    assert r.answer == "8" and r.details["plain_majority"] == "7"
    assert r.details["votes"] == {"7": 3, "8": 2}
    assert r.details["weights"] == pytest.approx({"7": 0.3, "8": 1.8})
    assert r.details["share"] == pytest.approx(1.8 / 2.1) and r.details["abstained"] == 1
    # Only the five answering samples were scored, by the default verifier, in one task.
    assert len(runner.scored) == 1 and runner.scored[0].kind == "verifier"
    assert runner.scored[0].candidates == texts[:5]
    assert [c.score for c in r.candidates] == pytest.approx([0.1, 0.1, 0.1, 0.9, 0.9, 0.0])
    assert r.text == "surely \\boxed{8}"
    assert [e.answer for e in events(rec, "vote")] == ["7", "7", "7", "8", "8"]


def test_weighted_vote_with_equal_rewards_is_the_majority_and_a_tie_goes_to_the_first_seen():
    runner = ScriptedRunner(by_index(["8", "7", "7", "8"]), score_fn=lambda task: [0.5] * len(task.candidates))
    r = run_controller(WeightedMajorityVote.from_params({"n": 4}), runner).result
    assert r.answer == "8" and r.details["weights"] == {"8": 1.0, "7": 1.0}


def test_weighted_vote_maps_logits_through_a_sigmoid_so_more_votes_never_lower_a_sum():
    texts = ["7", "7", "7", "8"]
    logits = [-1.0, -1.0, -1.0, 0.5]
    runner = ScriptedRunner(by_index(texts), score_fn=lambda task: logits)
    auto = run_controller(WeightedMajorityVote.from_params({"n": 4, "score_kind": "outcome"}), runner).result
    assert auto.answer == "7"  # 3 * sigmoid(-1) = 0.81 > sigmoid(0.5) = 0.62
    raw = run_controller(WeightedMajorityVote.from_params({"n": 4, "weight": "score"}), runner).result
    assert raw.answer == "8" and raw.details["weights"] == pytest.approx({"7": -3.0, "8": 0.5})


def test_weighted_vote_passes_the_process_scorer_its_model_and_separator():
    runner = ScriptedRunner(by_index(["a\nb 5", "c 6"]), score_fn=lambda task: [[0.9, 0.2], [0.6]])
    r = run_controller(WeightedMajorityVote.from_params(
        {"n": 2, "score_kind": "process", "reward_model": "prm", "step_separator": "\n"}), runner).result
    task = runner.scored[0]
    assert (task.kind, task.model, task.step_separator) == ("process", "prm", "\n")
    assert r.answer == "6"  # a process score is the lowest step: 0.2 for "5", 0.6 for "6"


def test_weighted_vote_failures_fail_the_run_with_their_code():
    runner = ScriptedRunner(by_index(["1", "2"]), score_fn=lambda task: TaskFailure("UNAVAILABLE", "no scorer"))
    with pytest.raises(ControllerError) as info:
        run_controller(WeightedMajorityVote.from_params({"n": 2}), runner)
    assert info.value.code == "UNAVAILABLE" and "no scorer" in info.value.message
    with pytest.raises(ControllerError) as info:
        run_controller(WeightedMajorityVote.from_params({"n": 2}),
                       ScriptedRunner(lambda task, i: TaskFailure("RESOURCE_EXHAUSTED", "full")))
    assert info.value.code == "RESOURCE_EXHAUSTED"


def test_weighted_vote_with_no_answers_scores_nothing():
    runner = ScriptedRunner(by_index(["none", "nothing"]), score_fn=lambda task: [1.0] * len(task.candidates))
    r = run_controller(WeightedMajorityVote.from_params({"n": 2}), runner).result
    assert r.answer == "" and r.details["abstained"] == 2 and runner.scored == []


# ---- best of n --------------------------------------------------------------------------------


def test_best_of_n_returns_the_highest_scored_sample():
    texts = ["maybe 3", "", "clearly \\boxed{4}", "or 5"]
    scores = {"maybe 3": 0.2, "clearly \\boxed{4}": 0.8, "or 5": 0.8}
    runner = ScriptedRunner(by_index(texts), score_fn=lambda task: [scores[c] for c in task.candidates])
    rec = run_controller(BestOfN.from_params({"n": 4}), runner)
    r = rec.result
    assert r.answer == "4" and r.text == "clearly \\boxed{4}"  # the tie with "or 5" keeps the first
    assert r.details["best"] == "sample/2" and r.details["best_score"] == 0.8
    assert runner.scored[0].kind == "verifier" and runner.scored[0].candidates == ["maybe 3", texts[2], "or 5"]
    progress = [(e.branch, e.details["best"]) for e in events(rec, "score")]
    assert progress == [("sample/0", "sample/0"), ("sample/2", "sample/2"), ("sample/3", "sample/2")]


def test_best_of_n_with_an_outcome_model_and_no_extractable_answer_returns_the_text():
    runner = ScriptedRunner(by_index(["a poem", "a better poem"]), score_fn=lambda task: [-1.0, 2.0])
    r = run_controller(BestOfN.from_params({"n": 2, "score_kind": "outcome", "reward_model": "rm"}), runner).result
    assert runner.scored[0].kind == "outcome" and runner.scored[0].model == "rm"
    assert r.answer == "a better poem"


def test_best_of_n_scoring_failure_fails_the_run():
    runner = ScriptedRunner(by_index(["1", "2"]), score_fn=lambda task: TaskFailure("INVALID_ARGUMENT", "bad"))
    with pytest.raises(ControllerError) as info:
        run_controller(BestOfN.from_params({"n": 2}), runner)
    assert info.value.code == "INVALID_ARGUMENT"


# ---- budget majority vote ---------------------------------------------------------------------


def by_index_of_branch(texts: list[str]):
    """Each sample of a budget vote is its own n=1 task named sample/<i>."""
    return lambda task, i: texts[int(task.branch.split("/")[1])]


def test_budget_vote_cancels_the_rest_once_the_leader_cannot_be_overtaken():
    texts = ["so 7", "so 7", "so 7", words(200) + " 8", words(200) + " 9"]
    runner = ScriptedRunner(by_index_of_branch(texts))
    rec = run_controller(BudgetMajorityVote.from_params({"n": 5}), runner)
    r = rec.result
    assert r.answer == "7" and r.details["votes"] == {"7": 3}
    assert r.details["stopped_by"] == "decided" and r.details["cancelled"] == 2
    assert sorted(t.branch for t in runner.cancelled) == ["sample/3", "sample/4"]
    assert runner.tokens_streamed < 3 * 2 + 2 * 201
    decided = events(rec, "decided")
    assert len(decided) == 1 and decided[0].answer == "7" and decided[0].details["running"] == 2
    assert [c.finish_reason for c in r.candidates].count("cancelled") == 2


def test_budget_vote_waits_while_the_remaining_samples_could_still_tie():
    runner = ScriptedRunner(by_index_of_branch(["7", "7", words(10) + " 8", words(10) + " 8"]))
    r = run_controller(BudgetMajorityVote.from_params({"n": 4}), runner).result
    assert r.answer == "7" and r.details["votes"] == {"7": 2, "8": 2}  # the tie goes to the first seen
    assert r.details["stopped_by"] == "all" and runner.cancelled == []


def test_budget_vote_one_at_a_time_never_launches_the_samples_it_does_not_need():
    runner = ScriptedRunner(lambda task, i: "it is 7")
    r = run_controller(BudgetMajorityVote.from_params({"n": 5, "parallel": 1}), runner).result
    assert len(runner.generated) == 3 and r.details["launched"] == 3  # 3 > 0 + 2 still to come
    assert r.answer == "7" and r.details["stopped_by"] == "decided" and runner.cancelled == []


def test_budget_vote_beta_criterion_stops_sooner_than_decided():
    runner = ScriptedRunner(lambda task, i: "7")
    decided = run_controller(BudgetMajorityVote.from_params({"n": 10, "parallel": 1}), runner).result
    assert decided.details["launched"] == 6
    beta = run_controller(BudgetMajorityVote.from_params({"n": 10, "parallel": 1, "criterion": "beta"}),
                          ScriptedRunner(lambda task, i: "7")).result
    assert beta.details["launched"] == 4 and beta.details["stopped_by"] == "beta"  # 1 - 2^-5 > 0.95
    assert beta_majority_probability(3, 0) == pytest.approx(0.9375)
    assert beta_majority_probability(2, 1) == pytest.approx(0.6875)


def test_budget_vote_token_budget_stops_the_running_sample_and_launches_no_more():
    runner = ScriptedRunner(by_index_of_branch([words(9) + f" {k}" for k in (7, 8, 9, 9)]))  # 10 tokens each
    rec = run_controller(BudgetMajorityVote.from_params({"n": 4, "parallel": 1, "token_budget": 25}), runner)
    r = rec.result
    assert r.answer == "7" and r.details["votes"] == {"7": 1, "8": 1}  # undecided: the budget ends the vote
    assert r.details["stopped_by"] == "budget" and r.details["launched"] == 3 and r.details["tokens"] == 25
    assert [t.branch for t in runner.cancelled] == ["sample/2"]
    assert [e.branch for e in events(rec, "budget_stop")] == ["sample/2/0"]
    assert r.candidates[2].finish_reason == "cancelled" and r.candidates[2].answer == ""


def test_budget_vote_drops_failed_samples_and_fails_only_when_all_fail():
    def respond(task, i):
        return TaskFailure("UNAVAILABLE", "worker gone") if task.branch == "sample/1" else "7"

    rec = run_controller(BudgetMajorityVote.from_params({"n": 3}), ScriptedRunner(respond))
    assert rec.result.answer == "7" and rec.result.details["failed"] == 1
    assert [e.details["code"] for e in events(rec, "failed")] == ["UNAVAILABLE"]
    with pytest.raises(ControllerError) as info:
        run_controller(BudgetMajorityVote.from_params({"n": 2}),
                       ScriptedRunner(lambda task, i: TaskFailure("DEADLINE_EXCEEDED", "late")))
    assert info.value.code == "DEADLINE_EXCEEDED"


# ---- DeepConf ---------------------------------------------------------------------------------

HIGH = [-0.01, -8.0, -9.0]   # a peaked distribution: token confidence 17.01 / 3
LOW = [-1.0, -1.1, -1.2]     # a flat one: token confidence 1.1


def traced(text: str, top: list[float]) -> Script:
    n = len(text.split(" "))
    return Script(text, logprobs=[top[0]] * n, top_logprobs=[top] * n)


def test_confidence_measures():
    assert token_confidence([-1.0, -3.0]) == 2.0
    confs = [5.0, 5.0, 1.0, 5.0, 5.0, 5.0]
    assert group_confidences(confs, 2) == [5.0, 3.0, 3.0, 5.0, 5.0]
    assert group_confidences([1.0, 2.0], 3) == [1.5]  # shorter than a window: one group
    assert trace_confidence(confs, "lowest", 2, 1) == 3.0
    assert trace_confidence(confs, "mean", 2, 1) == pytest.approx(26 / 6)
    assert trace_confidence(confs, "tail", 2, 3) == 5.0
    assert trace_confidence(confs, "bottom10", 2, 1) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 90) == pytest.approx(3.7)  # as numpy.percentile


def test_deepconf_offline_keeps_the_confident_traces_and_weights_their_votes():
    scripts = [traced("so 7", [-2.0, -2.0])] * 3 + [traced("so 8", [-2.5, -2.5])] * 2 + [traced("hmm", HIGH)]
    runner = ScriptedRunner(lambda task, i: scripts[i])
    everything = run_controller(DeepConfOffline.from_params({"n": 6, "keep_ratio": 1.0}), runner).result
    assert everything.answer == "7"  # 3 * 2.0 > 2 * 2.5
    assert everything.details["weights"] == pytest.approx({"7": 6.0, "8": 5.0})
    assert runner.generated[0].sampling == {"logprobs": 20}

    rec = run_controller(DeepConfOffline.from_params({"n": 6, "keep_ratio": 0.4, "logprobs": 2}), runner)
    r = rec.result
    assert r.answer == "8" and r.details["kept"] == ["trace/3", "trace/4"]  # 40% of the 5 answering traces
    assert runner.generated[1].sampling == {"logprobs": 2}
    assert [e.details["kept"] for e in events(rec, "confidence")] == [False] * 3 + [True] * 2 + [False]
    assert r.candidates[5].answer == "" and r.candidates[5].score == pytest.approx(17.01 / 3)


def test_deepconf_offline_lowest_group_sees_a_dip_the_mean_hides():
    dip = Script("a b c d e 7", top_logprobs=[HIGH, HIGH, LOW, LOW, HIGH, HIGH])
    steady = Script("a b c d e 8", top_logprobs=[[-3.0, -3.0]] * 6)
    runner = ScriptedRunner(lambda task, i: [dip, steady][i])
    base = {"n": 2, "keep_ratio": 0.5, "window": 2}
    assert run_controller(DeepConfOffline.from_params({**base, "confidence": "mean"}), runner).result.answer == "7"
    assert run_controller(DeepConfOffline.from_params({**base, "confidence": "lowest"}), runner).result.answer == "8"


def test_deepconf_needs_logprobs_from_the_worker():
    with pytest.raises(ControllerError) as info:
        run_controller(DeepConfOffline.from_params({"n": 2}), ScriptedRunner(lambda task, i: "plain 7"))
    assert info.value.code == "FAILED_PRECONDITION" and "logprobs" in info.value.message


def online_runner(warmup: list[Script], online: dict[int, Script | TaskFailure], tick_s: float = 0.0):
    def respond(task, i):
        return warmup[i] if task.branch == "warmup" else online[int(task.branch.split("/")[1])]
    return ScriptedRunner(respond, tick_s=tick_s)


def test_deepconf_online_stops_a_trace_whose_confidence_drops_below_the_bar():
    runner = online_runner([traced(words(5) + " 8", HIGH)] * 2,
                           {2: traced(words(29) + " 9", LOW), 3: traced(words(5) + " 8", HIGH)})
    params = {"n": 4, "warmup": 2, "window": 3, "keep_ratio": 0.5, "adaptive": False}
    rec = run_controller(DeepConfOnline.from_params(params), runner)
    r = rec.result
    assert r.answer == "8" and r.details["votes"] == {"8": 3} and r.details["early_stopped"] == 1
    stopped = [t for t in runner.generated if t.branch == "trace/2"][0]
    assert runner.cancelled == [stopped] and stopped.stopped_early
    assert stopped.output.samples[0].token_count == 3 < 30  # stopped at the first full window
    stop = events(rec, "early_stop")
    assert [e.branch for e in stop] == ["trace/2/0"] and stop[0].value == pytest.approx(1.1)
    assert events(rec, "threshold")[0].value == pytest.approx(17.01 / 3)
    assert all(t.n == 1 and t.sampling == {"logprobs": 20} for t in runner.generated[1:])


def test_deepconf_online_bar_filters_the_warmup_vote():
    # keep_ratio 0.5 over two warm-up traces: the bar is their median, so only the confident one votes.
    runner = online_runner([traced("so 7", LOW), traced("so 8", HIGH)], {})
    rec = run_controller(DeepConfOnline.from_params({"n": 2, "warmup": 2, "keep_ratio": 0.5}), runner)
    assert rec.result.answer == "8" and rec.result.details["votes"] == {"8": 1}
    assert [e.answer for e in events(rec, "below_bar")] == ["7"]


def test_deepconf_online_stops_launching_at_consensus():
    runner = online_runner([traced("so 8", HIGH)] * 2, {})
    rec = run_controller(DeepConfOnline.from_params({"n": 8, "warmup": 2}), runner)
    assert len(runner.generated) == 1  # the warm-up alone already agrees
    assert rec.result.answer == "8" and events(rec, "consensus")[0].value == 1.0


def test_deepconf_online_consensus_cancels_the_traces_still_running():
    online = {2: traced("so 7", HIGH), 3: traced("so 7", HIGH),
              4: traced(words(300) + " 9", HIGH), 5: traced(words(300) + " 9", HIGH)}
    runner = online_runner([traced("so 7", HIGH), traced("so 8", HIGH)], online)
    params = {"n": 6, "warmup": 2, "keep_ratio": 1.0, "consensus": 0.7, "window": 3}
    r = run_controller(DeepConfOnline.from_params(params), runner).result
    assert r.answer == "7" and r.details["votes"] == {"7": 3, "8": 1}  # 3/4 of the weight >= 0.7
    assert sorted(t.branch for t in runner.cancelled) == ["trace/4", "trace/5"]
    assert r.details["cancelled"] == 2 and runner.tokens_streamed < 4 * 2 + 2 * 301


def test_deepconf_online_drops_a_failed_trace():
    runner = online_runner([traced("so 8", HIGH)], {1: TaskFailure("UNAVAILABLE", "gone"), 2: traced("so 8", HIGH)})
    rec = run_controller(DeepConfOnline.from_params({"n": 3, "warmup": 1, "adaptive": False}), runner)
    assert rec.result.answer == "8" and rec.result.details["failed"] == 1
    assert events(rec, "failed")[0].branch == "trace/1/0"


# ---- Dynasor-CoT ------------------------------------------------------------------------------


class KeepingRunner(ScriptedRunner):
    """Returns a handle per kept sample, as a worker does for keep_s > 0."""

    async def generate(self, task, on_token):
        out = await super().generate(task, on_token)
        if task.keep_s > 0:
            number = next(k for k, t in enumerate(self.generated) if t is task)
            out.handles = [f"w1:{number}/{i}" for i in range(task.n)]
        return out


def dynasor_script(chunks: list[Script], probes: list[str], lost: set[str] = frozenset()):
    """Chunk k and probe k answer in order; a task that continues or forks a handle in `lost` gets NOT_FOUND."""
    seen = {"chunk": 0}

    def respond(task, i):
        if (task.continue_from or task.fork_from) in lost:
            return TaskFailure("NOT_FOUND", "generate.source: no kept sequence")
        if task.branch.startswith("probe/"):
            return probes[int(task.branch.split("/")[1])]
        seen["chunk"] += 1
        return chunks[seen["chunk"] - 1]

    return respond


def chunk(k: int, finish: str = "length") -> Script:
    return Script(f"step{k} a b c ", finish_reason=finish)


def test_dynasor_stops_once_the_probes_agree():
    probes = ["I am", "5}", "6}", "6} wait", "6}", "6}", "6}", "6}"]
    runner = ScriptedRunner(dynasor_script([chunk(k) for k in range(10)], probes))
    rec = run_controller(DynasorCoT.from_params({"probe_interval": 4}), runner)
    r = rec.result
    # "6} wait" hesitates, so the streak restarts: probes 4, 5 and 6 agree.
    assert r.answer == "6" and r.details["stopped_by"] == "certain"
    assert r.details["probes"] == ["", "5", "6", "6", "6", "6", "6"] and r.details["chunks"] == 7
    probe_tasks = [t for t in runner.generated if t.branch.startswith("probe/")]
    chunk_tasks = [t for t in runner.generated if t.branch == "reasoning"]
    assert len(probe_tasks) == 7 and len(chunk_tasks) == 7
    # No handles from this runner: every step re-sends the prompt and the reasoning so far.
    so_far = "step0 a b c step1 a b c "
    assert chunk_tasks[2].prompt == Prompt(text="q" + so_far)
    assert probe_tasks[1].prompt == Prompt(text="q" + so_far + PROBE)
    assert probe_tasks[1].sampling == {"temperature": 0.0, "max_tokens": 20, "min_tokens": 0}
    assert chunk_tasks[0].sampling == {"max_tokens": 4, "min_tokens": 0}
    assert r.text.endswith(PROBE + "6}") and r.details["reasoning_tokens"] == 28
    assert [e.value for e in events(rec, "probe")] == [0, 1, 1, 0, 1, 2, 3]
    # The chunks stream as one branch, the probes each as their own.
    assert "".join(text for branch, text in rec.deltas if branch == "reasoning/0") == "".join(
        f"step{k} a b c " for k in range(7))
    assert ("probe/3/0", "wait") in rec.deltas


def test_dynasor_returns_when_the_model_finishes_on_its_own():
    chunks = [chunk(0), Script("so \\boxed{9}", finish_reason="stop")]
    runner = ScriptedRunner(dynasor_script(chunks, ["4}"]))
    r = run_controller(DynasorCoT.from_params({}), runner).result
    assert r.answer == "9" and r.details["stopped_by"] == "finished" and r.details["probes"] == ["4"]
    assert r.text == "step0 a b c so \\boxed{9}"


def test_dynasor_stops_at_max_tokens_with_the_last_probed_answer():
    runner = ScriptedRunner(dynasor_script([chunk(k) for k in range(5)], ["1}", "2}", "3}"]))
    r = run_controller(DynasorCoT.from_params({"max_tokens": 8, "probe_interval": 4}), runner).result
    assert r.details["stopped_by"] == "max_tokens" and r.details["chunks"] == 2 and r.answer == "2"
    assert r.candidates[0].finish_reason == "length"


def test_dynasor_continues_and_forks_the_kept_sequence_and_falls_back_when_it_is_gone():
    # Tasks in order: chunk 0, probe 0, chunk 1 (kept as w1:2/0), probe 1 (forks w1:2/0, which is lost), ...
    runner = KeepingRunner(dynasor_script([chunk(k) for k in range(6)], ["1}", "2}", "3}", "3}", "3}"],
                                          lost={"w1:2/0"}))
    rec = run_controller(DynasorCoT.from_params({"probe_interval": 4}), runner)
    r = rec.result
    assert r.answer == "3" and r.details["fallbacks"] == 1
    t = runner.generated
    assert (t[0].prompt, t[0].keep_s) == (Prompt(text="q"), 30.0)
    assert (t[1].fork_from, t[1].prompt, t[1].keep_s) == ("w1:0/0", Prompt(text=PROBE), 0.0)
    assert (t[2].continue_from, t[2].prompt) == ("w1:0/0", Prompt(text=""))
    # The probe forking w1:2/0 is told NOT_FOUND: it is re-sent whole, and so is the next chunk.
    assert t[3].fork_from == "w1:2/0" and t[3].failure.code == "NOT_FOUND"
    assert t[4].prompt == Prompt(text="qstep0 a b c step1 a b c " + PROBE) and not t[4].fork_from
    assert t[5].prompt == Prompt(text="qstep0 a b c step1 a b c ") and t[5].keep_s == 30.0
    # ...which kept its result again, so the steps after it use the new handle.
    assert t[6].fork_from == "w1:5/0" and t[7].continue_from == "w1:5/0"
    assert [e.branch for e in events(rec, "fallback")] == ["probe/1"]


def test_dynasor_re_sends_a_chunk_whose_kept_sequence_expired():
    def respond(task, i):
        if task.continue_from == "w1:0/0":
            return TaskFailure("NOT_FOUND", "generate.source: no kept sequence 'w1:0/0' (expired)")
        return "7}" if task.branch.startswith("probe/") else chunk(len(runner.generated))

    runner = KeepingRunner(respond)
    r = run_controller(DynasorCoT.from_params({"agree": 2}), runner).result
    t = runner.generated
    assert r.answer == "7" and r.details["fallbacks"] == 1 and r.details["chunks"] == 2
    assert t[2].continue_from == "w1:0/0" and t[2].failure.code == "NOT_FOUND"
    assert (t[3].prompt, t[3].continue_from, t[3].keep_s) == (Prompt(text="qstep1 a b c "), "", 30.0)
    assert t[4].fork_from == "w1:3/0"


def test_dynasor_fails_on_other_errors_of_a_kept_sequence():
    def respond(task, i):
        if task.continue_from:
            return TaskFailure("INVALID_ARGUMENT", "prompt: does not fit the context")
        return "1}" if task.branch.startswith("probe/") else chunk(0)

    with pytest.raises(ControllerError) as info:
        run_controller(DynasorCoT.from_params({}), KeepingRunner(respond))
    assert info.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("keeping", [False, True])
@pytest.mark.parametrize("full_at", ["probe", "chunk"])
def test_dynasor_stops_when_the_reasoning_fills_the_context(keeping, full_at):
    full = TaskFailure("INVALID_ARGUMENT", "prompt: the kept sequence plus the appended tokens (258) do not fit",
                       "prompt", CONTEXT_LENGTH_EXCEEDED)

    def respond(task, i):
        if task.branch.startswith("probe/"):
            return full if full_at == "probe" and task.branch == "probe/1" else "5}"
        done = sum(t.branch == "reasoning" for t in runner.generated) - 1
        return full if full_at == "chunk" and done == 2 else chunk(done)

    runner = (KeepingRunner if keeping else ScriptedRunner)(respond)
    r = run_controller(DynasorCoT.from_params({"agree": 5}), runner).result
    assert r.details["stopped_by"] == "context" and r.candidates[0].finish_reason == "length"
    assert r.answer == "5" and r.details["chunks"] == 2


def test_dynasor_fails_naming_the_prompt_when_the_question_alone_does_not_fit():
    def respond(task, i):
        return TaskFailure("INVALID_ARGUMENT", "prompt: 300 tokens do not fit", "prompt", CONTEXT_LENGTH_EXCEEDED)

    with pytest.raises(ControllerError) as info:
        run_controller(DynasorCoT.from_params({}), ScriptedRunner(respond))
    assert (info.value.code, info.value.field) == ("INVALID_ARGUMENT", "prompt")


def test_dynasor_writes_the_reasoning_as_the_start_of_the_reply():
    chat = Prompt(messages=(Message("user", "2+2?"),))
    assert chat.continued("think") == Prompt(messages=(Message("user", "2+2?"), Message("assistant", "think")),
                                             continue_final_message=True)
    started = Prompt(messages=(Message("user", "q"), Message("assistant", "Let")), continue_final_message=True)
    assert started.continued(" me").messages == (Message("user", "q"), Message("assistant", "Let me"))
    assert Prompt(text="q").continued("") == Prompt(text="q")


def test_dynasor_serves_a_token_id_prompt_only_while_the_worker_keeps_the_reasoning():
    ids = Prompt(token_ids=(1, 2))
    probes = ["4}", "4}", "4}"]
    kept = KeepingRunner(dynasor_script([chunk(k) for k in range(3)], probes))
    assert run_controller(DynasorCoT.from_params({}), kept, ids).result.answer == "4"
    assert kept.generated[0].prompt is ids
    # Without a kept sequence the probe must re-send the prompt with the reasoning, which token ids cannot take.
    with pytest.raises(ControllerError) as info:
        run_controller(DynasorCoT.from_params({}), ScriptedRunner(dynasor_script([chunk(0)], probes)), ids)
    assert info.value.code == "INVALID_ARGUMENT" and info.value.message.startswith("dynasor_cot must re-send")


# ---- parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,params,field,words_in_message", [
    (WeightedMajorityVote, {"score_kind": "bogus"}, "params.score_kind", "outcome, process, verifier"),
    (WeightedMajorityVote, {"weight": "log"}, "params.weight", "must be one of"),
    (BestOfN, {"extractor": "regex"}, "params.pattern", "required"),
    (BestOfN, {"extractor": "regex", "pattern": "("}, "params.pattern", "invalid regular expression"),
    (BudgetMajorityVote, {"threshold": 0.4}, "params.threshold", ">= 0.5"),
    (BudgetMajorityVote, {"n": 65}, "params.n", "router's limit"),
    (BudgetMajorityVote, {"token_budget": -1}, "params.token_budget", ">= 0"),
    (DeepConfOffline, {"keep_ratio": 1.5}, "params.keep_ratio", "<= 1"),
    (DeepConfOffline, {"logprobs": 21}, "params.logprobs", "<= 20"),
    (DeepConfOffline, {"confidence": "max"}, "params.confidence", "lowest, bottom10, tail, mean"),
    (DeepConfOnline, {"n": 8, "warmup": 9}, "params.warmup", "must be <= n (8)"),
    (DynasorCoT, {"probe": "  "}, "params.probe", "must not be empty"),
    (DynasorCoT, {"keep_s": -1}, "params.keep_s", ">= 0"),
    (DynasorCoT, {"extractor": "nope"}, "params.extractor", "unknown extractor"),
])
def test_parameter_errors_name_the_field(cls, params, field, words_in_message):
    with pytest.raises(ParamError) as info:
        cls.from_params(params, limits={"n": 64})
    assert info.value.field == field and words_in_message in info.value.message


def test_defaults_are_valid():
    for cls in (WeightedMajorityVote, BestOfN, BudgetMajorityVote, DeepConfOffline, DeepConfOnline, DynasorCoT):
        controller = cls.from_params({})
        assert controller.param_values() == {p.name: p.default for p in cls.params}


# ---- majority vote: stopping once decided ------------------------------------------------------


def test_majority_vote_stops_the_samples_still_running_once_the_leader_cannot_be_overtaken():
    """Three short samples answer 7; with two of five still running, 7 leads 3 to 0 + 2: the vote is decided, the
    two long samples are cancelled (their tokens not spent) and abstain, and the answer is the full vote's."""
    texts = ["7", "so 7", "it is 7", words(30) + " 8", words(40) + " 9"]
    runner = ScriptedRunner(by_index(texts))
    r = run_controller(MajorityVote.from_params({"n": 5, "extractor": "last_number"}), runner).result
    assert r.answer == "7" and r.details["votes"] == {"7": 3} and r.details["counted"] == 3
    assert [c.finish_reason for c in r.candidates] == ["stop", "stop", "stop", "cancelled", "cancelled"]
    assert runner.cancelled and runner.tokens_streamed < sum(len(t.split()) for t in texts)
    full = run_controller(MajorityVote.from_params({"n": 5, "extractor": "last_number", "stop_decided": False}),
                          ScriptedRunner(by_index(texts))).result
    assert full.answer == r.answer and full.details["votes"] == {"7": 3, "8": 1, "9": 1}
    assert full.details["counted"] == 5


def test_majority_vote_does_not_stop_while_the_samples_left_could_still_change_the_answer():
    texts = ["7", "8", words(5) + " 7", words(6) + " 8", words(7) + " 8"]
    runner = ScriptedRunner(by_index(texts))
    r = run_controller(MajorityVote.from_params({"n": 5, "extractor": "last_number"}), runner).result
    assert r.answer == "8" and r.details["counted"] == 5 and not runner.cancelled


@pytest.mark.parametrize("seed", range(40))
def test_stopping_once_decided_never_changes_the_answer(seed):
    import random
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    texts = [words(rng.randint(0, 12)) + f" {rng.choice('1234') if rng.random() > 0.1 else 'none'}" for _ in range(n)]
    params = {"n": n, "extractor": "last_number"}
    early = run_controller(MajorityVote.from_params(params), ScriptedRunner(by_index(texts))).result
    full = run_controller(MajorityVote.from_params({**params, "stop_decided": False}),
                          ScriptedRunner(by_index(texts))).result
    assert early.answer == full.answer
    assert all(early.details["votes"][a] <= full.details["votes"][a] for a in early.details["votes"])


def test_under_load_a_reallocation_offer_stops_a_vote_once_it_is_certain_enough():
    """certaindex: with the router offering reallocation and short of capacity, three agreeing votes of eight are
    enough at certainty 0.9 (Beta criterion 15/16); without load, or without the offer, the vote goes on until
    the leader cannot be overtaken."""
    from controllers import Reallocation

    texts = ["7", "so 7", "it is 7", words(8) + " 7", words(30) + " 8", words(40) + " 9", words(41) + " 8",
             words(42) + " 8"]
    params = {"n": 8, "extractor": "last_number"}

    def vote(offer):
        controller = MajorityVote.from_params(params)
        controller.reallocation = offer
        runner = ScriptedRunner(by_index(texts))
        return run_controller(controller, runner).result, runner

    loaded, runner = vote(Reallocation(lambda: True, certainty=0.9))
    assert loaded.answer == "7" and loaded.details["counted"] == 3 and loaded.details["stopped"] == "certain"
    idle, _ = vote(Reallocation(lambda: False, certainty=0.9))
    plain, full_runner = vote(None)
    for r in (idle, plain):      # 7 leads 4 to 1 with two samples left: the exact stop
        assert r.answer == "7" and r.details["counted"] == 6 and r.details["stopped"] == "decided"
    assert runner.tokens_streamed < full_runner.tokens_streamed / 2


def test_a_vote_that_can_no_longer_be_overtaken_says_so():
    texts = ["7", "7", "7", words(30) + " 8"]
    r = run_controller(MajorityVote.from_params({"n": 4, "extractor": "last_number"}),
                       ScriptedRunner(by_index(texts))).result
    assert r.details["stopped"] == "decided" and r.details["counted"] == 3
