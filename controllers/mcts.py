"""MCTS: Monte Carlo tree search over reasoning steps, with UCT selection and process-reward values.

Kocsis and Szepesvari, "Bandit based Monte-Carlo Planning", ECML 2006 (UCT: UCB1 applied at every node of the
tree); as a search over reasoning steps valued by a process reward model instead of rollouts, Zhang, Zhoubian,
Hu, Yue, Dong and Tang, "ReST-MCTS*: LLM Self-Training via Process Reward Guided Tree Search", NeurIPS 2024
(and Hao et al., "Reasoning with Language Model is Planning with World Model" (RAP), EMNLP 2023). Each iteration:

    1. selection: from the root, go to the child maximising Q(c) + C * sqrt(ln N(parent) / N(c)) (UCT; Q is
       the child's mean value, N its visits, C `exploration`) until a node that has not been expanded;
    2. expansion: sample `expansions` next steps from it;
    3. evaluation: value each new partial solution with the process reward model (in place of a rollout);
    4. backpropagation: add each new value to the visits and value sums of every node up to the root.

A node whose step ends the solution (or that is `max_steps` deep, or fills the model's context) is terminal:
selecting it again backs up its value once more. After `iterations`, the answer is the best terminal node:
highest mean value, ties to the most visited.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, field, replace
from typing import Any

from controllers.base import Param, Result, register
from controllers.errors import ControllerError
from controllers.steps import SearchController, dropped, pruned, require_text_prompt, search_params
from controllers.tasks import Candidate, Intermediate, Progress, Prompt, TaskFailure

MAX_ITERATIONS = 10_000


@dataclass(eq=False)
class Node:
    """A partial solution in the tree. Its children stream under f"{branch}/{i}"."""

    text: str
    branch: str
    parent: Node | None = None
    depth: int = 0
    value: float = 0.0          # the reward model's value of this partial solution
    visits: int = 0
    total: float = 0.0          # sum of the values backed up through this node
    finish_reason: str = ""     # terminal when set: "stop" complete, "length" cut off
    expanded: bool = False
    dead: bool = False          # its expansion failed, or nothing under it can be expanded
    children: list[Node] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return self.total / self.visits if self.visits else 0.0

    def uct(self, exploration: float) -> float:
        parent_visits = self.parent.visits if self.parent else self.visits
        return self.mean + exploration * math.sqrt(math.log(parent_visits) / self.visits)


@register
class MCTS(SearchController):
    name = "mcts"
    description = ("Monte Carlo tree search over reasoning steps: UCT selection, expansion by sampling next steps, "
                   "evaluation by process reward, backpropagation of mean values (ReST-MCTS*-style).")
    params = (
        # At most MAX_ITERATIONS: once every leaf is terminal an iteration is a revisit that starts no task, so
        # nothing else bounds the loop, and it never awaits: iterations=1e9 held the router's event loop.
        Param("iterations", "int", 16, "selection-expansion-evaluation-backpropagation rounds", minimum=1,
              maximum=MAX_ITERATIONS),
        Param("expansions", "int", 3, "next steps sampled when a node is expanded", minimum=1, limit="n"),
        Param("exploration", "float", math.sqrt(2), "UCT exploration constant C (sqrt 2 is UCB1's, for values "
              "in [0, 1])", minimum=0.0),
        Param("max_steps", "int", 40, "depth at which a node is terminal", minimum=1),
        *search_params("process"),
    )

    def run(self, prompt: Prompt) -> Generator[Any, Any, Result]:
        require_text_prompt(prompt)
        root = Node("", "node")
        nodes = [root]
        failures: list[TaskFailure] = []
        best: Node | None = None
        iteration = 0
        while iteration < self.iterations:
            leaf = self._select(root)
            if leaf is None:
                break   # every branch is dead
            iteration += 1
            if leaf.finish_reason:
                self._backpropagate(leaf, leaf.value)
                yield Intermediate("revisit", leaf.branch, value=leaf.mean, details={"visits": leaf.visits})
                continue

            yield Progress("iteration", f"iteration {iteration}: expanding {leaf.branch} "
                                        f"({leaf.depth} steps, {len(nodes)} nodes)", iteration - 1, self.iterations)
            [expansion] = yield from self.search.expand(prompt, [(leaf.text, leaf.branch)], self.expansions)
            leaf.expanded = True
            yield from dropped(expansion)
            if expansion.failure is not None:
                failures.append(expansion.failure)
            if expansion.full:    # it fills the context: terminal, cut off where it is
                leaf.finish_reason = "length"
                self._backpropagate(leaf, leaf.value)
                yield Intermediate("stopped", leaf.branch, self.extract(leaf.text), leaf.value,
                                   {"finish_reason": "length", "reason": "context"})
                continue
            if not expansion.proposals:   # failed, or every sample empty: nothing to search below this node
                self._kill(leaf)
                if expansion.failure is None:
                    yield pruned(leaf.branch, "no step", leaf.mean)
                continue

            for proposal in expansion.proposals:
                child = Node(proposal.path, f"{leaf.branch}/{proposal.index}", leaf, leaf.depth + 1, proposal.value,
                             finish_reason=proposal.finish_reason if proposal.ended else "")
                if not child.finish_reason and child.depth >= self.max_steps:
                    child.finish_reason = "length"
                leaf.children.append(child)
                nodes.append(child)
                self._backpropagate(child, proposal.value)
            yield Intermediate("expanded", leaf.branch, value=leaf.mean, details={
                "iteration": iteration, "children": [c.value for c in leaf.children], "tree_size": len(nodes)})
            leader = self._best(nodes)
            if leader is not None and leader is not best:
                best = leader
                yield Intermediate("best", leader.branch, self.extract(leader.text), leader.mean,
                                   {"visits": leader.visits, "iteration": iteration})

        yield Progress("done", f"{iteration} iterations, {len(nodes)} nodes", iteration, self.iterations)
        return self._result(nodes, iteration, failures)

    def _select(self, root: Node) -> Node | None:
        """Descend by UCT to a node not yet expanded (or a terminal one); None when nothing is left alive."""
        node = root
        while node.expanded and not node.finish_reason:
            alive = [c for c in node.children if not c.dead]
            if not alive:
                self._kill(node)
                if node is root:
                    return None
                node = root
                continue
            node = max(alive, key=lambda c: c.uct(self.exploration))   # ties: the earlier child
        return node

    @staticmethod
    def _backpropagate(node: Node | None, value: float) -> None:
        while node is not None:
            node.visits += 1
            node.total += value
            node = node.parent

    @staticmethod
    def _kill(node: Node) -> None:
        """Take a node out of selection, and its ancestors that have nothing else left alive."""
        node.dead = True
        parent = node.parent
        while parent is not None and parent.expanded and all(c.dead for c in parent.children):
            parent.dead = True
            parent = parent.parent

    @staticmethod
    def _best(nodes: list[Node]) -> Node | None:
        terminal = [n for n in nodes if n.finish_reason]
        # Complete solutions before cut-off ones; then mean value, ties to the most visited, then the first made.
        return max(terminal, key=lambda n: (n.finish_reason == "stop", n.mean, n.visits), default=None)

    def _result(self, nodes: list[Node], iterations: int, failures: list[TaskFailure]) -> Result:
        details: dict[str, Any] = {"iterations": iterations, "tree_size": len(nodes),
                                   "failures": [f"{f.code}: {f.message}" for f in failures]}
        answer = self._best(nodes)
        if answer is None:
            # No solution ended within the budget: the best partial one, cut off where it is.
            partial = max((n for n in nodes if n.text), key=lambda n: (n.mean, n.visits), default=None)
            if partial is None:
                if failures:
                    raise ControllerError.from_failure(failures[-1], "mcts expanded nothing")
                return Result(answer="", details=details)
            answer = replace(partial, finish_reason="length")
        terminal = sorted((n for n in nodes if n.finish_reason), key=lambda n: (-n.mean, -n.visits))
        candidates = [Candidate(n.branch, n.text, self.extract(n.text), n.mean, n.finish_reason) for n in terminal]
        details.update(score=answer.mean, visits=answer.visits, branch=answer.branch, steps=answer.depth)
        return Result(answer=self.extract(answer.text), text=answer.text, candidates=candidates, details=details)
