"""TreeOfThoughts: breadth-first search over thoughts, each state valued by an evaluator.

Yao, Yu, Zhao, Shafran, Griffiths, Cao and Narasimhan, "Tree of Thoughts: Deliberate Problem Solving with
Large Language Models", NeurIPS 2023, Algorithm 1 (ToT-BFS):

    S_0 <- {x}
    for t = 1..T:
        S'_t <- {[s, z] | s in S_{t-1}, z in G(p, s, k)}      propose k thoughts per state
        V_t  <- V(p, S'_t)                                    evaluate the states
        S_t  <- the b states of S'_t with the highest V_t     keep the best b
    return G(p, argmax_{s in S_T} V_T(s), 1)                  generate the output from the best state

Here k is `breadth`, b is `beam`, T is `depth`; a thought is one reasoning step (up to the step separator).
The paper's evaluator V is the language model prompted to value a state; the default `kind` "verifier" is
that (the generation model asked whether the solution is right, P(yes)); "process" uses a process reward
model instead. A state whose thought ends the solution is not expanded again but keeps competing for a place
in S_t with its value.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, replace
from typing import Any

from controllers.base import Param, Result, register
from controllers.errors import ControllerError
from controllers.steps import (
    SearchController,
    dropped,
    join,
    pruned,
    require_text_prompt,
    search_params,
)
from controllers.tasks import Candidate, Generate, Intermediate, Progress, Prompt, TaskFailure


@dataclass
class State:
    """A partial solution: the thoughts so far."""

    text: str
    branch: str
    value: float = 0.0
    depth: int = 0
    finish_reason: str = ""     # "" while it can be extended; "stop" complete, "length" cut off


@register
class TreeOfThoughts(SearchController):
    name = "tree_of_thoughts"
    description = ("Tree of Thoughts, BFS: propose `breadth` thoughts per state, value every state, keep the "
                   "`beam` best, `depth` times; then finish the best state (Yao et al. 2023).")
    params = (
        Param("breadth", "int", 5, "thoughts proposed per state at each depth (k)", minimum=1, limit="n"),
        Param("beam", "int", 5, "states kept at each depth (b)", minimum=1),
        Param("depth", "int", 4, "levels of thoughts (T)", minimum=1),
        *search_params("verifier"),
    )

    def run(self, prompt: Prompt) -> Generator[Any, Any, Result]:
        require_text_prompt(prompt)
        frontier = [State("", "state")]     # S_0: the question alone
        failures: list[TaskFailure] = []
        depth = 0
        while depth < self.depth and any(not s.finish_reason for s in frontier):
            depth += 1
            growing = [s for s in frontier if not s.finish_reason]
            yield Progress("depth", f"depth {depth}: {len(growing)} states x {self.breadth} thoughts",
                           depth - 1, self.depth)
            parents = [(s.text, f"depth/{depth}/state/{i}") for i, s in enumerate(growing)]
            expansions = yield from self.search.expand(prompt, parents, self.breadth)

            proposed: list[State] = []
            for state, expansion in zip(growing, expansions, strict=True):
                yield from dropped(expansion)
                if expansion.failure is not None:
                    failures.append(expansion.failure)
                if expansion.full:   # it fills the context: finished, cut off where it is
                    proposed.append(replace(state, finish_reason="length"))
                    yield Intermediate("stopped", state.branch, self.extract(state.text), state.value,
                                       {"finish_reason": "length", "reason": "context"})
                proposed += [State(p.path, f"{expansion.branch}/{p.index}", p.value, depth,
                                   p.finish_reason if p.ended else "") for p in expansion.proposals]
            if all(e.failure is not None for e in expansions):
                if depth == 1:
                    raise ControllerError.from_failure(failures[-1], "tree of thoughts: every proposal failed")
                break   # nothing new at this depth: S_{t-1} is what the search found

            # S'_t: the new states, plus the finished ones of S_{t-1}, which have no thought left to add.
            pool = [s for s in frontier if s.finish_reason] + proposed
            pool.sort(key=lambda s: -s.value)   # stable: equal values keep the earlier state
            frontier = pool[: self.beam]
            for state in pool[self.beam:]:
                yield pruned(state.branch, "rank", state.value)
            if not frontier:
                break
            yield Intermediate("best", frontier[0].branch, self.extract(frontier[0].text), frontier[0].value,
                               {"depth": depth, "states": len(frontier)})

        details: dict[str, Any] = {"depth": depth, "failures": [f"{f.code}: {f.message}" for f in failures]}
        if not frontier or not frontier[0].text:
            return Result(answer="", details=details)   # every proposal was empty
        best = frontier[0]
        final = best
        if not best.finish_reason:
            final = yield from self._finish(prompt, best, failures)
        yield Progress("done", f"answer from {best.branch} (value {best.value:.3f}) after {depth} levels",
                       depth, self.depth)
        candidates = [Candidate(s.branch, s.text, self.extract(s.text), s.value, s.finish_reason)
                      for s in [final, *frontier[1:]]]
        details.update(score=best.value, branch=best.branch)
        return Result(answer=self.extract(final.text), text=final.text, candidates=candidates, details=details)

    def _finish(self, prompt: Prompt, state: State, failures: list[TaskFailure]) -> Generator[Any, Any, State]:
        """G(p, s, 1): the rest of the solution from the best state, generated to its end in one go."""
        task = Generate(prompt.continued(state.text + self.step_separator), n=1, branch="answer")
        yield task
        if task.failure is not None:
            if not task.failure.context_full:   # a full context only means the state is as long as it gets
                failures.append(task.failure)
                yield pruned("answer", "failed", state.value, task.failure)
            return replace(state, finish_reason="length")
        sample = task.output.samples[0]
        return State(join(state.text, sample.text, self.step_separator), "answer", state.value, state.depth,
                     sample.finish_reason)
