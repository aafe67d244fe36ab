"""Controllers against a scripted runner (no processes): the algorithm, failures, parameters."""

from __future__ import annotations

import asyncio

import pytest

from controllers import (
    REGISTRY,
    ControllerError,
    Generate,
    GenerateOutput,
    Message,
    ParamError,
    Prompt,
    SampleOut,
    TaskFailure,
    TokenDelta,
    extractors,
)
from controllers.majority_vote import MajorityVote
from controllers.native import NativeGeneration
from controllers.runtime import TaskFailed, drive


class ScriptedRunner:
    """Returns fixed texts for each generate task, in order; streams each text as one delta."""

    def __init__(self, texts: list[str] | None = None, failure: TaskFailure | None = None) -> None:
        self.texts = texts or []
        self.failure = failure
        self.tasks: list[Generate] = []

    async def generate(self, task: Generate, on_token) -> GenerateOutput:
        self.tasks.append(task)
        if self.failure:
            raise TaskFailed(self.failure)
        samples = []
        for i in range(task.n):
            text = self.texts[i % len(self.texts)]
            on_token(TokenDelta(i, text, 1))
            samples.append(SampleOut(index=i, text=text, finish_reason="stop", token_count=1))
        return GenerateOutput(samples=samples, prompt_tokens=3, completion_tokens=task.n)


def run(controller, runner):
    events, deltas = [], []
    result = asyncio.run(drive(controller, Prompt(text="q"), runner, events.append,
                               lambda b, t, c: deltas.append((b, t))))
    return result, events, deltas


def test_majority_vote_picks_the_most_common_answer():
    texts = ["so 19", "it is \\boxed{19}", "maybe 20", "I think 19.0", "no idea"]
    result, events, deltas = run(MajorityVote.from_params({"n": 5}), ScriptedRunner(texts))
    assert result.answer == "19"
    assert result.details["votes"] == {"19": 3, "20": 1}
    assert result.details["share"] == pytest.approx(3 / 5)
    assert result.details["abstained"] == 1
    assert [c.answer for c in result.candidates] == ["19", "19", "20", "19", ""]
    assert [e.answer for e in events if getattr(e, "kind", "") == "vote"] == ["19", "19", "20", "19"]
    assert [b for b, _ in deltas] == [f"sample/{i}" for i in range(5)]


def test_majority_vote_tie_goes_to_the_first_seen():
    result, _, _ = run(MajorityVote.from_params({"n": 4}), ScriptedRunner(["7", "8", "8", "7"]))
    assert result.answer == "7" and result.details["share"] == 0.5


def test_majority_vote_with_no_answers_abstains():
    result, _, _ = run(MajorityVote.from_params({"n": 2}), ScriptedRunner(["no numbers", "none"]))
    assert result.answer == "" and result.details["abstained"] == 2


def test_failed_task_fails_the_run_with_its_code():
    with pytest.raises(ControllerError) as info:
        run(MajorityVote.from_params({"n": 2}), ScriptedRunner(failure=TaskFailure("UNAVAILABLE", "gone")))
    assert info.value.code == "UNAVAILABLE"
    with pytest.raises(ControllerError):
        run(NativeGeneration.from_params({}), ScriptedRunner(failure=TaskFailure("DEADLINE_EXCEEDED", "late")))


def test_regex_extractor_and_custom_extractor():
    result, _, _ = run(MajorityVote.from_params({"n": 3, "extractor": "regex", "pattern": r"ANSWER: (\w+)"}),
                       ScriptedRunner(["ANSWER: yes", "ANSWER: no", "x ANSWER: no"]))
    assert result.answer == "no"
    extractors.register("first_word", lambda text: text.split()[0] if text.split() else "")
    try:
        result, _, _ = run(MajorityVote.from_params({"n": 3, "extractor": "first_word"}),
                           ScriptedRunner(["cat sat", "dog ran", "cat ran"]))
        assert result.answer == "cat"
    finally:
        del extractors.EXTRACTORS["first_word"]


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{1,234}", "1234"), ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), ("x = -3.50 then 4", "4"),
    ("total: 1,000.0", "1000"), ("nothing", ""),
])
def test_auto_extractor(text, expected):
    assert extractors.auto(text) == expected


@pytest.mark.parametrize("params,field", [
    ({"n": 0}, "params.n"), ({"n": "3"}, "params.n"), ({"n": True}, "params.n"), ({"x": 1}, "params.x"),
    ({"extractor": "regex"}, "params.pattern"), ({"n": 65}, "params.n"),
])
def test_parameter_errors_name_the_field(params, field):
    with pytest.raises(ParamError) as info:
        MajorityVote.from_params(params, limits={"n": 64})
    assert info.value.field == field


def test_integral_floats_from_protobuf_struct_are_ints():
    assert MajorityVote.from_params({"n": 4.0}).n == 4


def test_majority_vote_over_an_inner_controller_runs_branches():
    runner = ScriptedRunner(["it is 5", "it is 6", "5 again"])
    result, events, deltas = run(MajorityVote.from_params({"n": 3, "inner": "native_generation"}), runner)
    # Each vote is its own native_generation run: three n=1 tasks, streamed under sample/<i>/sample/0.
    assert [t.n for t in runner.tasks] == [1, 1, 1]
    assert {b for b, _ in deltas} == {f"sample/{i}/sample/0" for i in range(3)}
    assert result.answer in ("5", "6") and sum(result.details["votes"].values()) == 3


def test_majority_vote_inner_must_be_a_known_controller():
    with pytest.raises(ParamError) as info:
        MajorityVote.from_params({"inner": "nope"})
    assert info.value.field == "params.inner"
    with pytest.raises(ParamError):
        MajorityVote.from_params({"inner": "majority_vote"})


def test_the_registry_lists_the_controllers_in_list_controllers_order():
    """Each module registers its own controllers; controllers/registry.py's import order is ListControllers' order."""
    assert list(REGISTRY) == [
        "native_generation", "majority_vote", "weighted_majority_vote", "budget_majority_vote", "best_of_n",
        "dynasor_cot", "deepconf_offline", "deepconf_online", "beam_search", "best_first_search", "mcts",
        "tree_of_thoughts",
    ]


# ---- continuing a prompt: one rule for the searches, Dynasor and the router's migration --------------------


def test_an_open_final_message_is_extended_whatever_its_role():
    """With continue_final_message the model's output continued that very message, so the continuation extends it:
    a user message the model was asked to complete stays the user's."""
    user_open = Prompt(messages=(Message("system", "s"), Message("user", "Complete: The cat")),
                       continue_final_message=True)
    assert user_open.continued(" sat").messages == (Message("system", "s"), Message("user", "Complete: The cat sat"))
    assistant_open = Prompt(messages=(Message("user", "q"), Message("assistant", "Let")), continue_final_message=True)
    assert assistant_open.continued(" me").messages == (Message("user", "q"), Message("assistant", "Let me"))
    assert user_open.continued(" sat").continue_final_message


def test_a_closed_chat_gets_the_text_as_the_assistants_open_reply():
    chat = Prompt(messages=(Message("user", "q"), Message("assistant", "earlier reply"), Message("user", "again")))
    assert chat.continued("new") == Prompt(messages=(*chat.messages, Message("assistant", "new")),
                                           continue_final_message=True)
    # A closed assistant turn is a finished reply: the continuation is a reply of its own, not more of it.
    answered = Prompt(messages=(Message("user", "q"), Message("assistant", "done")))
    assert answered.continued("more").messages == (*answered.messages, Message("assistant", "more"))


def test_text_and_token_id_prompts_continue_in_their_own_kind():
    assert Prompt(text="Q: ").continued("A") == Prompt(text="Q: A")
    ids = Prompt(token_ids=(1, 2))
    assert ids.continued("ignored text", token_ids=[3, 4]) == Prompt(token_ids=(1, 2, 3, 4))
    assert ids.continued("", token_ids=[3]) == Prompt(token_ids=(1, 2, 3))
    assert ids.continued("", token_ids=[]) is ids
    assert ids.continued("") is ids
    with pytest.raises(ValueError, match="^prompt: cannot continue a token-id prompt with text; send a text or chat "
                                         "prompt$"):
        ids.continued("text without ids")


def test_nothing_to_add_leaves_the_prompt_as_it_was():
    for prompt in (Prompt(text="q"), Prompt(messages=(Message("user", "q"),)),
                   Prompt(messages=(Message("user", "q"),), continue_final_message=True)):
        assert prompt.continued("") is prompt
