"""What the step-level search controllers share (beam search, best-first search, MCTS, tree of thoughts).

A solution is a sequence of reasoning steps, each ending at a separator ("\\n\\n" by default, as in
search-and-learn and the process reward models it uses). A search proposes next steps by sampling the
prompt continued with a partial solution, stopping at the separator, and values each partial solution with a
reward model (a Score task). This module holds the mechanics, so each controller's module reads as its paper:
- `require_text_prompt`: searches continue the prompt with text, so it must be text or chat;
- `read_step`: what a sampled step says, and whether the solution ended there;
- `StepSearch.expand`: propose n next steps of several partial solutions and value them, concurrently;
  a partial solution that has filled the model's context is reported `full` (cut off there), not failed;
- `SearchController`: the parameters every search takes (separator, reward model, aggregate, extractor).
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from controllers.answers import EXTRACTOR_PARAMS, answer_extractor
from controllers.base import INT32_MAX, Controller, Param
from controllers.errors import ControllerError, ParamError
from controllers.tasks import (
    Generate,
    Intermediate,
    Prompt,
    SampleOut,
    Score,
    ScoreOutput,
    TaskFailure,
    WaitAny,
)

KINDS = ("process", "outcome", "verifier")
AGGREGATES = ("last", "min", "product")


def search_params(kind: str = "process") -> tuple[Param, ...]:
    """The parameters every step-level search takes; `kind` is the default reward kind."""
    return (
        Param("step_separator", "str", "\n\n", "where a reasoning step ends: the stop string of every proposed step, "
              "and where the process reward model splits a solution into steps"),
        # SamplingParams.max_tokens is an int32: a larger value failed every step as INTERNAL once the run was going.
        Param("max_step_tokens", "int", 512, "max_tokens of one proposed step", minimum=1, maximum=INT32_MAX),
        Param("kind", "str", kind, "how partial solutions are valued: process (a process reward model, per step), "
              "outcome (an outcome reward model) or verifier (the generation model asked whether it is right)",
              choices=KINDS),
        Param("reward_model", "str", "", "the reward model's pool; empty: any worker that can score this kind"),
        Param("aggregate", "str", "last", "how a process reward's step scores make one value: last (Snell et al.), "
              "min or product; ignored by the other kinds", choices=AGGREGATES),
        *EXTRACTOR_PARAMS,
    )


def require_text_prompt(prompt: Prompt) -> None:
    """A search continues the prompt with text: a token-id prompt is INVALID_ARGUMENT naming `prompt`."""
    if prompt.token_ids is not None:
        raise ControllerError("INVALID_ARGUMENT", "prompt: a step-level search continues the prompt with text and "
                                                  "scores it with a reward model, so it takes a text or chat prompt, "
                                                  "not token ids")


def read_step(sample: SampleOut, separator: str) -> tuple[str, bool]:
    """(the step's text without the separator, whether the solution ended with this step).

    A step sampled with stop=[separator] ends in one of three ways: at the separator (more steps follow), at
    the end of sequence (the solution is complete), or at max_step_tokens (finish_reason "length": no
    separator came, so the step is not a step; search-and-learn treats it as the end of the beam, and so do we).

    Which stop ended a "stop" sample is the worker's stop_reason: the separator (a step), or nothing (EOS,
    a stop token: the solution is complete). A runner that keeps the stop string in the text shows it at
    the end instead.
    """
    text = sample.text
    if text.endswith(separator):
        return text[: -len(separator)], False
    if sample.finish_reason != "stop":
        return text, True
    return text, sample.stop_reason != separator


def join(prefix: str, step: str, separator: str) -> str:
    """A partial solution with one more step; an empty step adds nothing."""
    if not prefix or not step.strip():
        return prefix or step
    return prefix + separator + step


def aggregate(step_scores: list[float], how: str) -> float:
    if how == "min":
        return min(step_scores)
    if how == "product":
        return math.prod(step_scores)
    return step_scores[-1]


@dataclass
class Proposal:
    """One sampled next step of a partial solution and, once scored, the value of the path it makes."""

    index: int                 # the sample's index in its task: it streamed as f"{branch}/{index}"
    step: str
    path: str                  # the partial solution with this step appended
    ended: bool                # the solution ends here (end of sequence, or no separator within max_step_tokens)
    finish_reason: str         # of the solution when ended: "stop" complete, "length" cut off
    tokens: int
    value: float = 0.0
    step_scores: list[float] = field(default_factory=list)


@dataclass
class Expansion:
    """The proposals sampled from one partial solution, valued. `failure` when its generate or score task
    failed (then there are no proposals); `dropped` names the samples that made no step. `full` when the
    partial solution cannot grow: it fills the model's context, or every next step would overflow the reward
    model's; the search ends it there, cut off ("length"), as it would at max_steps."""

    prefix: str
    branch: str
    proposals: list[Proposal] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)   # (sample index, why)
    failure: TaskFailure | None = None
    full: bool = False
    generate: Generate | None = None
    score: Score | None = None


@dataclass(frozen=True)
class StepSearch:
    """How one search proposes steps and values paths: the separator, the step budget and the reward model."""

    separator: str
    max_step_tokens: int
    kind: str
    reward_model: str
    aggregate: str

    def propose(self, prompt: Prompt, prefix: str, n: int, branch: str) -> Generate:
        # The separator closes the prefix, so what the model writes next is a new step.
        partial = prefix + self.separator if prefix else ""
        return Generate(prompt.continued(partial), n=n, branch=branch,
                        sampling={"stop": [self.separator], "max_tokens": self.max_step_tokens})

    def read(self, task: Generate, expansion: Expansion) -> None:
        paths: set[str] = set()
        for sample in task.output.samples:
            step, ended = read_step(sample, self.separator)
            path = join(expansion.prefix, step, self.separator)
            if sample.finish_reason == "cancelled":
                expansion.dropped.append((sample.index, "cancelled"))
            elif not path.strip():
                expansion.dropped.append((sample.index, "empty solution"))
            elif not step.strip() and not ended:
                # A separator and nothing before it: continuing would only ask the same question again.
                expansion.dropped.append((sample.index, "empty step"))
            elif path in paths:
                # The same step twice (greedy or low-temperature sampling) is one path: scoring it again and
                # keeping it twice would only take a place from another.
                expansion.dropped.append((sample.index, "duplicate"))
            else:
                paths.add(path)
                expansion.proposals.append(Proposal(sample.index, step, path, ended,
                                                    "length" if sample.finish_reason == "length" else "stop",
                                                    sample.token_count))

    def score(self, prompt: Prompt, proposals: list[Proposal]) -> Score:
        return Score(prompt, [p.path for p in proposals], kind=self.kind, step_separator=self.separator,
                     model=self.reward_model)

    def value(self, output: ScoreOutput, proposals: list[Proposal]) -> TaskFailure | None:
        """Set each proposal's value from a score task's output (or say why the output is unusable)."""
        if len(output.scores) != len(proposals):
            return TaskFailure("INTERNAL", f"the reward model gave {len(output.scores)} scores for "
                                           f"{len(proposals)} candidates")
        for i, proposal in enumerate(proposals):
            steps = output.step_scores[i] if i < len(output.step_scores) else []
            proposal.step_scores = list(steps)
            if self.kind == "process" and steps:
                proposal.value = aggregate(steps, self.aggregate)
            else:
                proposal.value = output.scores[i]
        return None

    def expand(self, prompt: Prompt, parents: list[tuple[str, str]], n: int
               ) -> Generator[Any, Any, list[Expansion]]:
        """Propose n next steps of each (prefix, branch) and value the paths they make.

        All parents sample at once, and each parent's score task starts as soon as its own proposals are in,
        so the reward model works while the other parents are still sampling.
        """
        expansions = [Expansion(prefix, branch) for prefix, branch in parents]
        owner: dict[int, Expansion] = {}
        for expansion in expansions:
            expansion.generate = self.propose(prompt, expansion.prefix, n, expansion.branch)
            owner[id(expansion.generate)] = expansion
        waiting: list[Generate | Score] = [e.generate for e in expansions]
        while waiting:
            done = yield WaitAny(waiting)
            if not done:
                # A task that ended with neither output nor failure (a runner raised something other than
                # TaskFailed): waiting again would restart it forever.
                raise ControllerError("INTERNAL", "a task ended with neither a result nor a failure")
            finished = {id(task) for task in done}
            waiting = [task for task in waiting if id(task) not in finished]
            for task in done:
                expansion = owner[id(task)]
                if task.failure is not None and task.failure.context_full:
                    rescore = self._overflowed(task, expansion)
                    if rescore is not None:
                        owner[id(rescore)] = expansion
                        waiting.append(rescore)
                elif task.failure is not None:
                    expansion.failure = task.failure
                    expansion.proposals = []
                elif isinstance(task, Generate):
                    self.read(task, expansion)
                    if expansion.proposals:
                        expansion.score = self.score(prompt, expansion.proposals)
                        owner[id(expansion.score)] = expansion
                        waiting.append(expansion.score)
                else:
                    expansion.failure = self.value(task.output, expansion.proposals)
                    if expansion.failure is not None:
                        expansion.proposals = []
        return expansions

    def _overflowed(self, task: Generate | Score, expansion: Expansion) -> Score | None:
        """A task failed because its text does not fit a model's context: what the search does instead.

        The question alone not fitting is the client's prompt at fault: the failure stands. Otherwise the text
        is the search's own. A proposal too long for the reward model is dropped and the rest scored again (the
        worker names the first candidate that does not fit); with none left, or when the partial solution
        itself fills the generator's context, the partial solution is full.
        """
        index = _candidate_index(task.failure.field) if isinstance(task, Score) else None
        if index is not None and index < len(expansion.proposals):
            lost = expansion.proposals.pop(index)
            expansion.dropped.append((lost.index, "context"))
            if expansion.proposals:
                expansion.score = self.score(task.prompt, expansion.proposals)
                return expansion.score
            if not expansion.prefix:
                expansion.failure = TaskFailure(
                    "OUT_OF_RANGE", f"every first step is too long for the reward model's context with the prompt "
                                    f"({task.failure.message}): a smaller params.max_step_tokens keeps steps shorter",
                    reason=task.failure.reason)
        elif not expansion.prefix:
            expansion.failure = task.failure
        expansion.full = bool(expansion.prefix) and expansion.failure is None
        expansion.proposals = []
        return None


def _candidate_index(field_path: str) -> int | None:
    """i of 'candidates[i]', the field a score task's failure names."""
    if field_path.startswith("candidates[") and field_path.endswith("]"):
        inner = field_path[len("candidates["):-1]
        return int(inner) if inner.isdigit() else None
    return None



def pruned(branch: str, reason: str, value: float = 0.0, failure: TaskFailure | None = None) -> Intermediate:
    """The event for a branch the search drops: a failed task (with its code), a rank, an empty step..."""
    details: dict[str, Any] = {"reason": reason}
    if failure is not None:
        details.update(code=failure.code, message=failure.message)
    return Intermediate("pruned", branch, value=value, details=details)


def dropped(expansion: Expansion) -> list[Intermediate]:
    """Events for an expansion's samples that made no step, or for the whole expansion when it failed."""
    if expansion.failure is not None:
        return [pruned(expansion.branch, "failed", failure=expansion.failure)]
    return [pruned(f"{expansion.branch}/{index}", why) for index, why in expansion.dropped]


class SearchController(Controller):
    """A controller that searches over reasoning steps: validates the shared parameters and builds its
    StepSearch and answer extractor. Subclasses list `params = (<their own>, *search_params(kind))`."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if not self.step_separator:
            raise ParamError("params.step_separator", "must not be empty")
        self.extract = answer_extractor(self.extractor, self.pattern)
        self.search = StepSearch(self.step_separator, self.max_step_tokens, self.kind, self.reward_model,
                                 self.aggregate)
