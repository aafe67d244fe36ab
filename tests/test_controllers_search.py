"""Step-level search controllers (beam search, best-first search, MCTS, tree of thoughts) against scripted runners:
for a scripted tree of steps and scripted rewards, which partial solutions are expanded, kept, pruned and returned."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import pytest

from controllers import (
    CONTEXT_LENGTH_EXCEEDED,
    ControllerError,
    GenerateOutput,
    Intermediate,
    Message,
    ParamError,
    Progress,
    Prompt,
    SampleOut,
    TaskFailure,
)
from controllers.beam_search import BeamSearch
from controllers.best_first import BestFirstSearch
from controllers.mcts import MCTS, Node
from controllers.runtime import drive
from controllers.steps import read_step
from controllers.tree_of_thoughts import TreeOfThoughts
from tests.scripted import ScriptedRunner, run_controller

SEP = "\n\n"


def path_of(task) -> str:
    """The partial solution a generate task continues: its prompt after the question "q"."""
    return task.prompt.text[len("q"):].removesuffix(SEP)


def tree_runner(tree: dict[str, list[str]], values: dict[str, float], fail: dict[str, str | TaskFailure] | None = None,
                runner: type[ScriptedRunner] = ScriptedRunner, **kwargs) -> ScriptedRunner:
    """Sample i of the task that continues `path` says tree[path][i] (a step ending in SEP, as a runner that
    keeps the stop string returns it, or a final step). The reward model values each step by values[step]
    (0.1 when not listed): per step for kind process, the last step's value otherwise. fail[path] = code (or a
    TaskFailure) fails the generate task continuing that path."""
    fail = fail or {}

    def respond(task, i):
        path = path_of(task)
        if isinstance(fail.get(path), TaskFailure):
            return fail[path]
        if path in fail:
            return TaskFailure(fail[path], f"worker lost while expanding {path!r}")
        return tree[path][i]

    def score(task):
        steps = [[values.get(step, 0.1) for step in candidate.split(SEP)] for candidate in task.candidates]
        return steps if task.kind == "process" else [s[-1] for s in steps]

    return runner(respond, score, **kwargs)


@dataclass
class StopStringRunner(ScriptedRunner):
    """Like the worker: a sample that reaches a stop string ends there, the stop string cut from its text and
    named in stop_reason ("" when the sample ended at the end of sequence)."""

    async def generate(self, task, on_token) -> GenerateOutput:
        out = await super().generate(task, on_token)
        stops = task.sampling.get("stop", [])
        samples = []
        for s in out.samples:
            hit = next((stop for stop in stops if s.text.endswith(stop)), "")
            samples.append(SampleOut(s.index, s.text.removesuffix(hit) if hit else s.text, s.finish_reason,
                                         s.token_count, stop_reason=hit))
        out.samples = samples
        return out


def intermediates(events, kind: str) -> list[Intermediate]:
    return [e for e in events if isinstance(e, Intermediate) and e.kind == kind]


# ---- shared mechanics ----------------------------------------------------------------------------


def test_a_search_continues_the_prompt_with_its_partial_answer():
    assert Prompt(text="Q: 2+2?\n").continued("step 1\n\n") == Prompt(text="Q: 2+2?\nstep 1\n\n")
    chat = Prompt(messages=(Message("user", "2+2?"),))
    assert chat.continued("step 1\n\n") == Prompt(
        messages=(Message("user", "2+2?"), Message("assistant", "step 1\n\n")), continue_final_message=True)
    started = chat.continued("step 1\n\n")
    assert started.continued("step 2\n\n").messages[-1] == Message("assistant", "step 1\n\nstep 2\n\n")
    assert chat.continued("") is chat


def test_a_token_id_prompt_is_rejected_before_any_task():
    runner = tree_runner({}, {})
    with pytest.raises(ControllerError) as info:
        asyncio.run(drive(BeamSearch.from_params({}), Prompt(token_ids=(1, 2)), runner, lambda e: None,
                          lambda *a: None))
    assert info.value.code == "INVALID_ARGUMENT" and "prompt" in info.value.message
    assert runner.generated == []


def test_a_chat_prompt_is_continued_as_the_assistant_message_and_scored_on_the_question():
    chat = Prompt(messages=(Message("user", "2+2?"),))

    def respond(task, i):
        said = task.prompt.messages[-1].content if task.prompt.continue_final_message else ""
        return "so \\boxed{4}" if said else "2+2\n\n"

    runner = ScriptedRunner(respond, lambda task: [[0.5] * len(c.split(SEP)) for c in task.candidates])
    result = asyncio.run(drive(BeamSearch.from_params({"beam_width": 1, "expansions": 1}), chat, runner,
                               lambda e: None, lambda *a: None))
    assert result.answer == "4" and result.text == "2+2\n\nso \\boxed{4}"
    assert runner.generated[1].prompt == Prompt(messages=(Message("user", "2+2?"), Message("assistant", "2+2\n\n")),
                                                continue_final_message=True)
    assert all(score.prompt == chat for score in runner.scored)


@pytest.mark.parametrize("sample,expected", [
    (SampleOut(0, "x = 2", "stop", 3), ("x = 2", True)),             # EOS (no stop string): complete
    (SampleOut(0, "x = 2\n\n", "stop", 3), ("x = 2", False)),        # the runner kept the separator
    (SampleOut(0, "so \\boxed{4}", "stop", 3), ("so \\boxed{4}", True)),   # a final answer ends it
    (SampleOut(0, "", "stop", 1), ("", True)),                        # nothing more to say
    (SampleOut(0, "x = 2 and", "length", 3), ("x = 2 and", True)),   # no separator within max_step_tokens
    (SampleOut(0, "x = 2", "stop", 3, stop_reason=SEP), ("x = 2", False)),
    (SampleOut(0, "x = 2", "stop", 3, stop_reason=""), ("x = 2", True)),    # end of sequence
])
def test_read_step(sample, expected):
    assert read_step(sample, SEP) == expected


@pytest.mark.parametrize("cls,params,field,words", [
    (BeamSearch, {"beam_width": 0}, "params.beam_width", ">= 1"),
    (BeamSearch, {"expansions": 2.5}, "params.expansions", "expected a whole number, got a number (2.5)"),
    (BeamSearch, {"kind": "vibes"}, "params.kind", "process, outcome, verifier"),
    (BeamSearch, {"aggregate": "mean"}, "params.aggregate", "last, min, product"),
    (BeamSearch, {"step_separator": ""}, "params.step_separator", "must not be empty"),
    (BeamSearch, {"extractor": "regex"}, "params.pattern", "required"),
    (BeamSearch, {"extractor": "regex", "pattern": "("}, "params.pattern", "invalid regular expression"),
    (BeamSearch, {"extractor": "nope"}, "params.extractor", "unknown extractor"),
    (BeamSearch, {"beams": 4}, "params.beams", "unknown parameter"),
    (BestFirstSearch, {"max_expansions": 0}, "params.max_expansions", ">= 1"),
    (MCTS, {"exploration": -1.0}, "params.exploration", ">= 0"),
    (MCTS, {"iterations": True}, "params.iterations", "expected a number, got a bool (true)"),
    (TreeOfThoughts, {"depth": 0}, "params.depth", ">= 1"),
    (TreeOfThoughts, {"kind": "majority"}, "params.kind", "must be one of"),
])
def test_parameter_errors_name_the_field(cls, params, field, words):
    with pytest.raises(ParamError) as info:
        cls.from_params(params)
    assert info.value.field == field and words in info.value.message


def test_defaults_follow_the_papers():
    assert BeamSearch.from_params({}).param_values() == {
        "beam_width": 4, "expansions": 4, "max_steps": 40, "step_separator": SEP, "max_step_tokens": 512,
        "kind": "process", "reward_model": "", "aggregate": "last", "extractor": "auto", "pattern": ""}
    assert TreeOfThoughts.from_params({}).kind == "verifier"   # ToT values states with the model itself
    assert MCTS.from_params({}).exploration == pytest.approx(math.sqrt(2))
    assert MCTS.from_params({"iterations": 8.0}).iterations == 8


# ---- beam search ---------------------------------------------------------------------------------

BEAM_TREE = {
    "": ["a\n\n", "b\n\n", "c\n\n"],
    "a": ["a1\n\n", "a2\n\n", "a3\n\n"],
    "b": ["b1\n\n", "b2\n\n", "b3\n\n"],
    "b\n\nb1": ["so \\boxed{1}", "b1x\n\n", "b1y\n\n"],
    "b\n\nb2": ["so \\boxed{2}", "so \\boxed{3}", "b2x\n\n"],
}
BEAM_VALUES = {"a": 0.9, "b": 0.5, "c": 0.5, "a1": 0.2, "a2": 0.3, "a3": 0.1, "b1": 0.8, "b2": 0.7,
               "so \\boxed{1}": 0.95, "so \\boxed{2}": 0.6, "so \\boxed{3}": 0.99}


def test_beam_search_keeps_the_top_beams_by_reward_and_ties_go_to_the_earlier():
    runner = tree_runner(BEAM_TREE, BEAM_VALUES)
    rec = run_controller(BeamSearch.from_params({"beam_width": 2, "expansions": 3, "max_steps": 5,
                                                 "reward_model": "prm"}), runner)

    # Step 1 keeps a (0.9) and b (0.5), not c (0.5, sampled later); step 2 keeps b's b1, b2 over all of a's.
    assert [path_of(t) for t in runner.generated] == ["", "a", "b", "b\n\nb1", "b\n\nb2"]
    assert [t.branch for t in runner.generated] == ["beam/0/step/1", "beam/0/step/2", "beam/1/step/2",
                                                   "beam/0/step/3", "beam/1/step/3"]
    assert all(t.n == 3 and t.sampling == {"stop": [SEP], "max_tokens": 512} for t in runner.generated)
    ranked_out = [e.branch for e in intermediates(rec.events, "pruned") if e.details["reason"] == "rank"]
    assert ranked_out == ["beam/0/step/1/2",                                           # step 1: c
                          "beam/0/step/2/1", "beam/0/step/2/0", "beam/0/step/2/2", "beam/1/step/2/2",  # a2 a1 a3 b3
                          "beam/1/step/3/2"]                                           # step 3: b2x

    # Three beams stopped at step 3 (>= beam_width): the search ends; the best stopped beam is the answer.
    assert rec.result.answer == "3"
    assert rec.result.text == "b\n\nb2\n\nso \\boxed{3}"
    assert rec.result.details["score"] == 0.99 and rec.result.details["steps"] == 3
    assert [(c.answer, c.score) for c in rec.result.candidates] == [("1", 0.95), ("2", 0.6), ("3", 0.99)]
    ended = [e.branch for e in intermediates(rec.events, "pruned") if e.details["reason"] == "search ended"]
    assert ended == ["beam/0/step/3/1", "beam/0/step/3/2"]

    # Each beam's proposals are scored together, as whole paths, by the named process reward model.
    first = runner.scored[0]
    assert first.candidates == ["a", "b", "c"] and first.prompt == Prompt(text="q")
    assert (first.kind, first.model, first.step_separator) == ("process", "prm", SEP)
    assert runner.scored[2].candidates == ["b\n\nb1", "b\n\nb2", "b\n\nb3"]

    # Events: a progress event per step, the best value so far, every sample streamed under its beam.
    assert [e.stage for e in rec.events if isinstance(e, Progress)] == ["step", "step", "step", "done"]
    assert [(e.branch, e.value) for e in intermediates(rec.events, "best")] == [
        ("beam/0/step/1/0", 0.9), ("beam/1/step/3/1", 0.99)]
    assert ("beam/1/step/3/1", "\\boxed{3}") in rec.deltas


def test_beam_search_stops_a_beam_at_the_end_of_sequence():
    tree = {"": ["x\n\n", "y\n\n"], "x": ["the answer is 3", "x2\n\n"], "y": ["the answer is 4", "y2\n\n"]}
    values = {"x": 0.5, "y": 0.4, "the answer is 3": 0.9, "the answer is 4": 0.6}
    runner = tree_runner(tree, values, runner=StopStringRunner)
    rec = run_controller(BeamSearch.from_params({"beam_width": 2, "expansions": 2, "max_steps": 10}), runner)
    # The worker cut the separators and said which stop ended each sample: "" = end of sequence.
    assert runner.scored[0].candidates == ["x", "y"]
    assert rec.result.answer == "3" and rec.result.text == "x\n\nthe answer is 3"
    assert len(runner.generated) == 3          # two stopped beams = beam_width: no step 3
    assert [(e.branch, e.answer, e.details["finish_reason"]) for e in intermediates(rec.events, "stopped")] == [
        ("beam/0/step/2/0", "3", "stop"), ("beam/1/step/2/0", "4", "stop")]


@pytest.mark.parametrize("aggregate,answer", [("last", "1"), ("min", "2"), ("product", "2")])
def test_beam_search_aggregates_step_rewards(aggregate, answer):
    tree = {"": ["a\n\n", "b\n\n"], "a": ["so \\boxed{1}", "a2\n\n"], "b": ["so \\boxed{2}", "b2\n\n"]}
    values = {"a": 0.2, "b": 0.6, "so \\boxed{1}": 0.9, "so \\boxed{2}": 0.7}
    rec = run_controller(BeamSearch.from_params({"beam_width": 2, "expansions": 2, "aggregate": aggregate}),
                         tree_runner(tree, values))
    assert rec.result.answer == answer


def test_beam_search_drops_a_failed_expansion_and_goes_on():
    tree = {"": ["a\n\n", "b\n\n", "c\n\n"], "b": ["so \\boxed{2}"] * 3,
            "c": ["so \\boxed{3}", "c2\n\n", "\n\n"]}
    values = {"a": 0.9, "b": 0.8, "c": 0.7, "so \\boxed{2}": 0.9, "so \\boxed{3}": 0.5, "c2": 0.99}
    runner = tree_runner(tree, values, fail={"a": "UNAVAILABLE"})
    score = runner.score_fn
    runner.score_fn = lambda task: (TaskFailure("RESOURCE_EXHAUSTED", "reward model overloaded")
                                    if task.candidates[0].startswith("b\n\n") else score(task))
    rec = run_controller(BeamSearch.from_params({"beam_width": 3, "expansions": 3, "max_steps": 2}), runner)

    failed = [(e.branch, e.details["code"]) for e in intermediates(rec.events, "pruned")
              if e.details["reason"] == "failed"]
    assert failed == [("beam/0/step/2", "UNAVAILABLE"), ("beam/1/step/2", "RESOURCE_EXHAUSTED")]
    assert ("beam/2/step/2/2", "empty step") in [(e.branch, e.details["reason"])
                                                for e in intermediates(rec.events, "pruned")]
    assert len(rec.result.details["failures"]) == 2
    # c2 (0.99) was still open at max_steps, so it is cut off: a complete solution beats it.
    assert rec.result.answer == "3"
    assert [(c.text, c.finish_reason) for c in rec.result.candidates] == [
        ("c\n\nso \\boxed{3}", "stop"), ("c\n\nc2", "length")]


def test_beam_search_drops_empty_and_duplicate_steps_and_cuts_beams_at_max_steps():
    runner = tree_runner({"": ["a\n\n", "a\n\n", "\n\n", "b\n\n"]}, {"a": 0.3, "b": 0.6})
    rec = run_controller(BeamSearch.from_params({"beam_width": 4, "expansions": 4, "max_steps": 1}), runner)
    assert [(e.branch, e.details["reason"]) for e in intermediates(rec.events, "pruned")] == [
        ("beam/0/step/1/1", "duplicate"), ("beam/0/step/1/2", "empty solution")]
    assert runner.scored[0].candidates == ["a", "b"]
    assert rec.result.text == "b" and [(c.text, c.finish_reason) for c in rec.result.candidates] == [
        ("b", "length"), ("a", "length")]


def test_beam_search_fails_when_every_expansion_of_a_step_fails():
    with pytest.raises(ControllerError) as info:
        run_controller(BeamSearch.from_params({}), tree_runner({}, {}, fail={"": "UNAVAILABLE"}))
    assert info.value.code == "UNAVAILABLE"
    runner = tree_runner({"": ["a\n\n"] * 4}, {})
    runner.score_fn = lambda task: TaskFailure("FAILED_PRECONDITION", "no process reward model")
    with pytest.raises(ControllerError) as info:
        run_controller(BeamSearch.from_params({}), runner)
    assert info.value.code == "FAILED_PRECONDITION" and "no process reward model" in info.value.message


def test_beam_search_scores_a_beam_while_others_still_sample():
    long = " ".join(["w"] * 200) + SEP
    tree = {"": ["a\n\n", "b\n\n"], "a": ["so \\boxed{1}"] * 2, "b": [long] * 2}
    runner = tree_runner(tree, {"a": 0.9, "b": 0.8}, tick_s=0.001)
    score = runner.score_fn
    seen_while_sampling = []

    def watch(task):
        b_task = next((t for t in runner.generated if path_of(t) == "b"), None)
        seen_while_sampling.append(b_task is not None and not b_task.done)
        return score(task)

    runner.score_fn = watch
    run_controller(BeamSearch.from_params({"beam_width": 2, "expansions": 2, "max_steps": 2}), runner)
    assert seen_while_sampling[1] is True      # a's proposals were scored before b's long steps were done


# ---- best-first search ---------------------------------------------------------------------------

BFS_TREE = {"": ["A\n\n", "B\n\n"], "A": ["A1\n\n", "A2\n\n"], "B": ["so \\boxed{9}", "B2\n\n"]}
BFS_VALUES = {"A": 0.6, "B": 0.5, "A1": 0.3, "A2": 0.2, "so \\boxed{9}": 0.9, "B2": 0.4}


def test_best_first_expands_the_highest_valued_node_and_stops_at_a_complete_solution():
    runner = tree_runner(BFS_TREE, BFS_VALUES)
    rec = run_controller(BestFirstSearch.from_params({"expansions": 2, "max_expansions": 10}), runner)
    # root, then A (0.6), then B (0.5) over A's children (0.3, 0.2); then B's complete child (0.9) comes first.
    assert [t.branch for t in runner.generated] == ["node", "node/0", "node/1"]
    assert [e.branch for e in intermediates(rec.events, "expanded")] == ["node", "node/0", "node/1"]
    assert rec.result.answer == "9" and rec.result.text == "B\n\nso \\boxed{9}"
    assert rec.result.details["expanded"] == 3 and rec.result.details["branch"] == "node/1/0"
    assert [(e.branch, e.value) for e in intermediates(rec.events, "best")] == [("node/1/0", 0.9)]
    assert [e.done for e in rec.events if isinstance(e, Progress)] == [0, 1, 2, 3]


def test_best_first_out_of_budget_returns_the_best_partial_solution():
    runner = tree_runner(BFS_TREE, BFS_VALUES)
    rec = run_controller(BestFirstSearch.from_params({"expansions": 2, "max_expansions": 2}), runner)
    assert [t.branch for t in runner.generated] == ["node", "node/0"]
    assert rec.result.text == "B" and rec.result.candidates[0].finish_reason == "length"
    assert [c.text for c in rec.result.candidates] == ["B", "A\n\nA1", "A\n\nA2"]


def test_best_first_out_of_budget_returns_a_complete_solution_found_before_a_better_partial_one():
    values = dict(BFS_VALUES, **{"so \\boxed{9}": 0.45, "B2": 0.7})
    runner = tree_runner(BFS_TREE, values)
    rec = run_controller(BestFirstSearch.from_params({"expansions": 2, "max_expansions": 3}), runner)
    # B2 (0.7) outranks the complete solution (0.45) but the budget ran out before it could be expanded.
    assert rec.result.answer == "9" and rec.result.details["branch"] == "node/1/0"
    assert [(c.text, c.finish_reason) for c in rec.result.candidates][:2] == [
        ("B\n\nB2", "length"), ("B\n\nso \\boxed{9}", "stop")]
    assert [c.text for c in rec.result.candidates] == ["B\n\nB2", "B\n\nso \\boxed{9}", "A\n\nA1", "A\n\nA2"]


def test_best_first_skips_a_failed_node_and_fails_when_nothing_is_left():
    runner = tree_runner(BFS_TREE, BFS_VALUES, fail={"A": "UNAVAILABLE"})
    rec = run_controller(BestFirstSearch.from_params({"expansions": 2}), runner)
    assert [t.branch for t in runner.generated] == ["node", "node/0", "node/1"]
    assert rec.result.answer == "9" and rec.result.details["failures"] == [
        "UNAVAILABLE: worker lost while expanding 'A'"]
    with pytest.raises(ControllerError) as info:
        run_controller(BestFirstSearch.from_params({}), tree_runner({}, {}, fail={"": "DEADLINE_EXCEEDED"}))
    assert info.value.code == "DEADLINE_EXCEEDED"


# ---- MCTS ----------------------------------------------------------------------------------------

MCTS_TREE = {"": ["A\n\n", "B\n\n"], "A": ["A1\n\n", "A2\n\n"], "B": ["so \\boxed{4}", "B2\n\n"],
             "A\n\nA1": ["A1a\n\n", "A1b\n\n"]}
MCTS_VALUES = {"A": 0.9, "B": 0.1, "so \\boxed{4}": 0.3}   # every other step is worth 0.1


@pytest.mark.parametrize("exploration,expanded", [
    # After A's children (0.1, 0.1): Q(A) = 1.1/3, Q(B) = 0.1. UCT with C = sqrt 2: A 0.37 + 0.96 = 1.33,
    # B 0.1 + 1.67 = 1.77, so B is explored; with C = 0 the search exploits A and expands its first child.
    (math.sqrt(2), ["node", "node/0", "node/1"]),
    (0.0, ["node", "node/0", "node/0/0"]),
])
def test_mcts_selects_by_uct(exploration, expanded):
    runner = tree_runner(MCTS_TREE, MCTS_VALUES)
    rec = run_controller(MCTS.from_params({"iterations": 3, "expansions": 2, "exploration": exploration}), runner)
    assert [t.branch for t in runner.generated] == expanded
    assert [e.branch for e in intermediates(rec.events, "expanded")] == expanded
    assert [e.details["tree_size"] for e in intermediates(rec.events, "expanded")] == [3, 5, 7]
    assert rec.result.details["iterations"] == 3 and rec.result.details["tree_size"] == 7


def test_mcts_backs_up_mean_values_and_answers_with_the_best_terminal_node():
    tree = {"": ["so \\boxed{1}", "C\n\n"], "C": ["so \\boxed{2}", "so \\boxed{3}"]}
    values = {"so \\boxed{1}": 0.3, "C": 0.8, "so \\boxed{2}": 0.9, "so \\boxed{3}": 0.2}
    runner = tree_runner(tree, values)
    rec = run_controller(MCTS.from_params({"iterations": 3, "expansions": 2, "exploration": 0.0}), runner)
    # 1: root -> {1: 0.3, C: 0.8}; 2: C -> {2: 0.9, 3: 0.2}, Q(C) = 1.9/3; 3: C again, then its best child 2,
    # terminal: its value is backed up once more.
    assert [t.branch for t in runner.generated] == ["node", "node/1"]
    assert [(e.branch, e.details["visits"]) for e in intermediates(rec.events, "revisit")] == [("node/1/0", 2)]
    assert rec.result.answer == "2" and rec.result.details["visits"] == 2
    assert rec.result.details["score"] == pytest.approx(0.9)
    assert [(c.answer, c.score) for c in rec.result.candidates] == [("2", 0.9), ("1", 0.3), ("3", 0.2)]


def test_mcts_best_terminal_ties_go_to_the_most_visited():
    root = Node("", "node", visits=6)
    few = Node("x \\boxed{1}", "node/0", root, 1, visits=1, total=0.5, finish_reason="stop")
    many = Node("x \\boxed{2}", "node/1", root, 1, visits=4, total=2.0, finish_reason="stop")
    better_but_cut = Node("x", "node/2", root, 1, visits=1, total=0.9, finish_reason="length")
    assert MCTS._best([root, few, many, better_but_cut]) is many


def test_mcts_takes_a_failed_node_out_of_selection():
    runner = tree_runner(MCTS_TREE, MCTS_VALUES, fail={"A": "UNAVAILABLE"})
    rec = run_controller(MCTS.from_params({"iterations": 4, "expansions": 2, "exploration": 0.0}), runner)
    # A (0.9) would win every selection with C = 0; once its expansion failed, B is expanded instead.
    assert [t.branch for t in runner.generated][:3] == ["node", "node/0", "node/1"]
    assert [(e.branch, e.details.get("code")) for e in intermediates(rec.events, "pruned")] == [
        ("node/0", "UNAVAILABLE")]
    assert rec.result.answer == "4" and len(rec.result.details["failures"]) == 1
    with pytest.raises(ControllerError) as info:
        run_controller(MCTS.from_params({}), tree_runner({}, {}, fail={"": "UNAVAILABLE"}))
    assert info.value.code == "UNAVAILABLE"


# ---- tree of thoughts ----------------------------------------------------------------------------


def test_tree_of_thoughts_keeps_the_best_states_per_level_and_finishes_the_best():
    tree = {"": ["s1\n\n", "s2\n\n"], "s2": ["t1\n\n", "t2\n\n"], "s1": ["u1\n\n", "u2\n\n"],
            "s1\n\nu1": ["so \\boxed{6}"]}
    values = {"s1": 0.4, "s2": 0.7, "t1": 0.2, "t2": 0.8, "u1": 0.9, "u2": 0.1}
    runner = tree_runner(tree, values)
    rec = run_controller(TreeOfThoughts.from_params({"breadth": 2, "beam": 2, "depth": 2}), runner)
    # Depth 2 expands S_1 in value order (s2, then s1) and keeps u1 and t2 of the four new states.
    assert [(t.branch, path_of(t)) for t in runner.generated] == [
        ("depth/1/state/0", ""), ("depth/2/state/0", "s2"), ("depth/2/state/1", "s1"), ("answer", "s1\n\nu1")]
    assert runner.generated[-1].sampling == {}     # the output is generated to its end, not to a separator
    assert {t.kind for t in runner.scored} == {"verifier"}
    assert [e.branch for e in intermediates(rec.events, "pruned")] == ["depth/2/state/0/0", "depth/2/state/1/1"]
    assert rec.result.answer == "6" and rec.result.text == "s1\n\nu1\n\nso \\boxed{6}"
    assert [(c.branch, c.score) for c in rec.result.candidates] == [("answer", 0.9), ("depth/2/state/0/1", 0.8)]


def test_tree_of_thoughts_keeps_a_finished_state_competing_without_expanding_it():
    tree = {"": ["so \\boxed{5}", "p\n\n"], "p": ["pa\n\n", "pb\n\n"], "p\n\npa": ["so \\boxed{8}"]}
    values = {"so \\boxed{5}": 0.7, "p": 0.6, "pa": 0.9, "pb": 0.5}
    runner = tree_runner(tree, values)
    rec = run_controller(TreeOfThoughts.from_params({"breadth": 2, "beam": 2, "depth": 2}), runner)
    assert [path_of(t) for t in runner.generated] == ["", "p", "p\n\npa"]   # \boxed{5} is never expanded
    assert rec.result.answer == "8"
    # S_2 = the b = 2 best of {5 (0.7, carried over from S_1), pa (0.9), pb (0.5)}.
    assert [(c.answer, c.score, c.finish_reason) for c in rec.result.candidates] == [("8", 0.9, "stop"),
                                                                                       ("5", 0.7, "stop")]

    rec = run_controller(TreeOfThoughts.from_params({"breadth": 2, "beam": 1, "depth": 3}), tree_runner(tree, values))
    assert rec.result.answer == "5" and rec.result.details["depth"] == 1   # nothing open: no more levels


# ---- a partial solution that fills the model's context -------------------------------------------

def too_long(field: str) -> TaskFailure:
    """What a worker answers for a text that does not fit the model's context."""
    return TaskFailure("INVALID_ARGUMENT", f"{field}: 300 tokens do not fit the model's context of 256 tokens",
                       field, CONTEXT_LENGTH_EXCEEDED)


SEARCHES = [BeamSearch, BestFirstSearch, MCTS, TreeOfThoughts]


@pytest.mark.parametrize("cls", SEARCHES, ids=lambda c: c.name)
def test_a_partial_solution_that_fills_the_context_is_cut_off_there_not_failed(cls):
    tree = {"": ["a\n\n", "b\n\n"]}
    runner = tree_runner(tree, {"a": 0.9, "b": 0.5}, fail={"a": too_long("prompt"), "b": too_long("prompt")})
    params = {"expansions": 2, "breadth": 2, "iterations": 6, "kind": "process"}
    rec = run_controller(cls.from_params({p.name: params[p.name] for p in cls.params if p.name in params}), runner)
    assert rec.result.text == "a" and rec.result.details["failures"] == []
    assert {path_of(t) for t in runner.generated} == {"", "a", "b"}    # neither is expanded twice
    assert {(c.text, c.finish_reason) for c in rec.result.candidates} >= {("a", "length")}


def test_a_step_too_long_for_the_reward_model_is_dropped_and_the_rest_scored():
    runner = tree_runner({"": ["a\n\n", "long\n\n", "b\n\n"]}, {"a": 0.3, "b": 0.6})
    score = runner.score_fn
    runner.score_fn = lambda task: (too_long(f"candidates[{task.candidates.index('long')}]")
                                    if "long" in task.candidates else score(task))
    rec = run_controller(BeamSearch.from_params({"beam_width": 3, "expansions": 3, "max_steps": 1}), runner)
    assert [t.candidates for t in runner.scored] == [["a", "long", "b"], ["a", "b"]]
    assert ("beam/0/step/1/1", "context") in [(e.branch, e.details["reason"])
                                              for e in intermediates(rec.events, "pruned")]
    assert rec.result.text == "b" and rec.result.details["failures"] == []


def test_a_beam_whose_every_next_step_overflows_the_reward_model_stops_where_it_is():
    tree = {"": ["a\n\n"], "a": ["x" * 50 + "\n\n"]}
    runner = tree_runner(tree, {"a": 0.4})
    score = runner.score_fn
    runner.score_fn = lambda task: too_long("candidates[0]") if "x" * 50 in task.candidates[0] else score(task)
    rec = run_controller(BeamSearch.from_params({"beam_width": 1, "expansions": 1}), runner)
    assert rec.result.text == "a" and rec.result.candidates[0].finish_reason == "length"
    assert rec.result.details["score"] == 0.4


def test_a_question_too_long_for_the_context_fails_the_run_naming_the_prompt():
    for cls in SEARCHES:
        with pytest.raises(ControllerError) as info:
            run_controller(cls.from_params({}), tree_runner({}, {}, fail={"": too_long("prompt")}))
        assert (info.value.code, info.value.field) == ("INVALID_ARGUMENT", "prompt"), cls.name
        assert info.value.message.startswith("prompt: 300 tokens do not fit"), info.value.message


def test_first_steps_all_too_long_for_the_reward_model_fail_the_run_out_of_range():
    runner = tree_runner({"": ["a\n\n", "b\n\n"]}, {})
    runner.score_fn = lambda task: too_long("candidates[0]")
    with pytest.raises(ControllerError) as info:
        run_controller(BeamSearch.from_params({"expansions": 2}), runner)
    assert info.value.code == "OUT_OF_RANGE" and "params.max_step_tokens" in info.value.message
