"""BestFirstSearch: expand the most promising partial solution first, by process reward.

Best-first search (Pearl, "Heuristics: Intelligent Search Strategies for Computer Problem Solving", 1984) with a
learned value as the heuristic, as Koh, McAleer, Fried and Salakhutdinov run it over language-model actions in
"Tree Search for Language Model Agents", 2024 (arXiv:2407.01476): a frontier ordered by value, a branching
factor, a depth limit and a budget of expansions. Here the value of a partial solution is a process reward
model's score of its steps:

    frontier <- {question}
    while the budget of expansions lasts:
        s <- pop the highest-valued partial solution
        if s is a complete solution: return s        (nothing on the frontier is valued higher)
        push each of `expansions` next steps sampled from s, valued by the reward model
    return the best complete solution seen, else the best partial one

A solution cut off (no separator within max_step_tokens, `max_steps` steps, or the model's context full) cannot
be expanded: popping one sets it aside and the search goes on.
"""

from __future__ import annotations

import heapq
from collections.abc import Generator
from dataclasses import dataclass, replace
from typing import Any

from controllers.base import Param, Result, register
from controllers.errors import ControllerError
from controllers.steps import SearchController, dropped, require_text_prompt, search_params
from controllers.tasks import Candidate, Intermediate, Progress, Prompt, TaskFailure


@dataclass
class Node:
    """A partial solution in the search tree; its children stream under f"{branch}/{i}"."""

    text: str
    branch: str
    value: float = 0.0
    depth: int = 0
    finish_reason: str = ""     # "" expandable; "stop" complete, "length" cut off


@register
class BestFirstSearch(SearchController):
    name = "best_first_search"
    description = ("Best-first search over reasoning steps: always expand the partial solution with the highest "
                   "process reward; stop at the first complete solution popped or after max_expansions.")
    params = (
        Param("max_expansions", "int", 32, "partial solutions expanded at most (the search budget)", minimum=1),
        Param("expansions", "int", 4, "next steps sampled from each expanded solution", minimum=1, limit="n"),
        Param("max_steps", "int", 40, "steps after which a solution is cut off and no longer expanded", minimum=1),
        *search_params("process"),
    )

    def run(self, prompt: Prompt) -> Generator[Any, Any, Result]:
        require_text_prompt(prompt)
        order = 0   # push order: among equal values the earlier node is popped first
        frontier: list[tuple[float, int, Node]] = [(0.0, order, Node("", "node"))]
        seen: list[Node] = []       # every node that cannot be expanded: complete or cut off
        failures: list[TaskFailure] = []
        best: Node | None = None
        expanded = 0
        answer: Node | None = None
        while frontier and expanded < self.max_expansions:
            node = heapq.heappop(frontier)[2]
            if node.finish_reason == "stop":
                answer = node
                break
            if node.finish_reason:
                continue   # cut off: kept in `seen` for the end, never expanded
            expanded += 1
            yield Progress("expand", f"expanding {node.branch} (value {node.value:.3f}, {node.depth} steps)",
                           expanded - 1, self.max_expansions)
            [expansion] = yield from self.search.expand(prompt, [(node.text, node.branch)], self.expansions)
            yield from dropped(expansion)
            if expansion.failure is not None:
                failures.append(expansion.failure)
                continue
            if expansion.full:    # it fills the context: cut off where it is
                node.finish_reason = "length"
                seen.append(node)
                yield Intermediate("stopped", node.branch, self.extract(node.text), node.value,
                                   {"finish_reason": "length", "reason": "context"})
                continue
            for proposal in expansion.proposals:
                child = Node(proposal.path, f"{node.branch}/{proposal.index}", proposal.value, node.depth + 1,
                             proposal.finish_reason if proposal.ended else "")
                if not child.finish_reason and child.depth >= self.max_steps:
                    child.finish_reason = "length"
                if child.finish_reason:
                    seen.append(child)
                order += 1
                heapq.heappush(frontier, (-child.value, order, child))
            yield Intermediate("expanded", node.branch, value=node.value, details={
                "children": [p.value for p in expansion.proposals], "frontier": len(frontier)})
            leader = max(seen, key=lambda n: (n.finish_reason == "stop", n.value), default=None)
            if leader is not None and leader is not best:
                best = leader
                yield Intermediate("best", leader.branch, self.extract(leader.text), leader.value,
                                   {"finish_reason": leader.finish_reason, "expanded": expanded})

        yield Progress("done", f"{expanded} expansions", expanded, self.max_expansions)
        return self._result(answer, seen, [entry[2] for entry in frontier], expanded, failures)

    def _result(self, answer: Node | None, seen: list[Node], open_nodes: list[Node], expanded: int,
                failures: list[TaskFailure]) -> Result:
        details: dict[str, Any] = {"expanded": expanded, "failures": [f"{f.code}: {f.message}" for f in failures]}
        # Out of budget before a complete solution came first: the best found, complete before cut off, else the
        # best partial solution on the frontier, cut off where it is.
        pool = seen + [replace(n, finish_reason="length") for n in open_nodes if n.text and not n.finish_reason]
        if answer is None:
            answer = max(pool, key=lambda n: (n.finish_reason == "stop", n.value), default=None)
        if answer is None:
            if failures:
                raise ControllerError.from_failure(failures[-1], "best-first search found nothing")
            return Result(answer="", details=details)
        details.update(score=answer.value, branch=answer.branch, steps=answer.depth)
        candidates = [Candidate(n.branch, n.text, self.extract(n.text), n.value, n.finish_reason)
                      for n in sorted(pool, key=lambda n: -n.value)]
        return Result(answer=self.extract(answer.text), text=answer.text, candidates=candidates, details=details)
