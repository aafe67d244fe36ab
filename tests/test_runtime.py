"""The controller runtime: concurrent tasks, WaitAny, Cancel, early stops, branches, scores, cleanup."""

from __future__ import annotations

import asyncio

from controllers import (
    Branch,
    Cancel,
    Controller,
    ControllerError,
    Generate,
    Intermediate,
    Prompt,
    Result,
    Score,
    TaskFailure,
    WaitAny,
)
from controllers.majority_vote import MajorityVote
from controllers.runtime import drive
from tests.scripted import Script, ScriptedRunner, run_controller


class Inline(Controller):
    """A controller whose run() is given by the test."""

    name = "inline"
    description = "test"

    def __init__(self, body) -> None:
        super().__init__()
        self.body = body

    def run(self, prompt):
        return (yield from self.body(prompt))


def words(n: int, word: str = "w") -> str:
    return " ".join([word] * n)


def test_wait_any_resumes_at_the_first_done_and_the_rest_are_cancelled_at_the_end():
    runner = ScriptedRunner(lambda task, i: words(int(task.branch)))

    def body(prompt):
        tasks = [Generate(prompt, branch=str(n)) for n in (50, 3, 40)]
        done = yield WaitAny(tasks)
        assert [t.branch for t in done] == ["3"]
        assert not tasks[0].done and not tasks[2].done
        return Result(answer=done[0].output.samples[0].text)

    rec = run_controller(Inline(body), runner)
    assert rec.result.answer == words(3)
    assert sorted(t.branch for t in runner.cancelled) == ["40", "50"]
    # Nothing kept streaming after the run ended.
    assert runner.tokens_streamed < 50 + 3 + 40


def test_cancel_settles_a_running_generate_with_its_partial_text():
    runner = ScriptedRunner(lambda task, i: words(1000 if task.branch == "long" else 5), tick_s=0.001)

    def body(prompt):
        long = Generate(prompt, branch="long")
        short = Generate(prompt, branch="short")
        done = yield WaitAny([long, short])
        assert done == [short]
        yield Cancel([long, short])
        return Result(answer=long.output.samples[0].finish_reason, details={"tokens": long.output.completion_tokens})

    rec = run_controller(Inline(body), runner)
    assert rec.result.answer == "cancelled"
    assert 0 < rec.result.details["tokens"] < 1000


def test_stop_when_stops_the_task_early_on_the_worker():
    scripts = {0: Script(words(30), logprobs=[-0.1] * 5 + [-5.0] * 25)}
    runner = ScriptedRunner(lambda task, i: scripts[i])

    def low_confidence(trace):
        return len(trace.logprobs) >= 3 and sum(trace.logprobs[-3:]) / 3 < -2.0

    def body(prompt):
        task = Generate(prompt, stop_when=low_confidence)
        yield task
        sample = task.output.samples[0]
        return Result(answer=str(task.stopped_early), details={"tokens": sample.token_count,
                                                                "reason": sample.finish_reason})

    rec = run_controller(Inline(body), runner)
    assert rec.result.answer == "True"
    assert rec.result.details == {"tokens": 7, "reason": "cancelled"}
    assert len(runner.cancelled) == 1


def test_branches_run_in_parallel_and_stream_under_their_names():
    runner = ScriptedRunner(lambda task, i: "answer 7" if i % 2 == 0 else "answer 8")

    def body(prompt):
        branches = [Branch(MajorityVote.from_params({"n": 3}), prompt, name=f"vote{k}") for k in range(2)]
        yield branches
        return Result(answer=",".join(b.result.answer for b in branches))

    rec = run_controller(Inline(body), runner)
    assert rec.result.answer == "7,7"
    assert {b.split("/")[0] for b, _ in rec.deltas} == {"vote0", "vote1"}
    assert ("vote1/sample/1", "8") in rec.deltas
    votes = [e for e in rec.events if isinstance(e, Intermediate)]
    assert votes and all(e.branch.startswith(("vote0/sample/", "vote1/sample/")) for e in votes)


def test_a_failed_branch_is_a_result_for_the_parent_not_a_failed_run():
    def respond(task, i):
        return TaskFailure("UNAVAILABLE", "worker gone") if task.prompt.text == "bad" else "42"

    def body(prompt):
        good = Branch(MajorityVote.from_params({"n": 1}), Prompt(text="good"), name="good")
        bad = Branch(MajorityVote.from_params({"n": 1}), Prompt(text="bad"), name="bad")
        yield [good, bad]
        return Result(answer=good.result.answer, details={"bad": bad.failure.code})

    rec = run_controller(Inline(body), ScriptedRunner(respond))
    assert rec.result.answer == "42" and rec.result.details == {"bad": "UNAVAILABLE"}


def test_score_tasks_reach_the_runner_and_failures_come_back():
    runner = ScriptedRunner(lambda task, i: "x", score_fn=lambda task: [float(len(c)) for c in task.candidates])

    def body(prompt):
        ok = Score(prompt, ["a", "abc"], kind="outcome")
        yield ok
        steps = Score(prompt, ["s1\n\ns2"], kind="process")
        runner.score_fn = lambda task: [[0.9, 0.2]]
        yield steps
        runner.score_fn = lambda task: TaskFailure("UNAVAILABLE", "no scorer")
        failed = Score(prompt, ["a"])
        yield failed
        return Result(answer="", details={"ok": ok.output.scores, "steps": steps.output.step_scores,
                                          "min": steps.output.scores, "failed": failed.failure.code})

    rec = run_controller(Inline(body), runner)
    assert rec.result.details == {"ok": [1.0, 3.0], "steps": [[0.9, 0.2]], "min": [0.2], "failed": "UNAVAILABLE"}


def test_cancelling_the_run_cancels_every_task_under_it():
    runner = ScriptedRunner(lambda task, i: words(10_000), tick_s=0.001)

    def body(prompt):
        yield [Generate(prompt, n=2, branch=f"b{k}") for k in range(3)]
        return Result(answer="unreachable")

    async def main():
        run = asyncio.ensure_future(drive(Inline(body), Prompt(text="q"), runner, lambda e: None, lambda *a: None))
        await asyncio.sleep(0.05)
        run.cancel()
        try:
            await run
        except asyncio.CancelledError:
            pass
        return run

    run = asyncio.run(main())
    assert run.cancelled()
    assert sorted(t.branch for t in runner.cancelled) == ["b0", "b1", "b2"]


def test_yielding_something_else_fails_the_run_with_internal():
    def body(prompt):
        yield "not a task"
        return Result(answer="")

    try:
        run_controller(Inline(body), ScriptedRunner(lambda t, i: "x"))
    except ControllerError as err:
        assert err.code == "INTERNAL" and "str" in err.message
    else:
        raise AssertionError("expected ControllerError")


def test_a_controller_emitting_events_in_a_row_still_lets_the_loop_run_and_can_be_cancelled():
    """Events never await anything: 100k in a row (as MCTS revisits can) must not hold the event loop."""
    def body(prompt):
        for k in range(100_000):
            yield Intermediate("revisit", f"node/{k}")
        return Result(answer="done")

    async def main():
        emitted = []
        run = asyncio.ensure_future(drive(Inline(body), Prompt(text="q"), ScriptedRunner(lambda t, i: "x"),
                                          emitted.append, lambda *a: None))
        await asyncio.sleep(0)   # the run starts, and must hand the loop back within a few events
        seen = len(emitted)
        run.cancel()
        try:
            await run
        except asyncio.CancelledError:
            pass
        return seen, len(emitted), run.cancelled()

    seen, total, cancelled = asyncio.run(main())
    assert 0 < seen < 1_000 and total < 1_000 and cancelled
