"""BeamSearch: step-level beam search guided by a process reward model.

Snell, Lee, Xu and Kumar, "Scaling LLM Test-Time Compute Optimally can be More Effective than Scaling Model
Parameters", 2024 (arXiv:2408.03314), section 5.1 "Beam search"; as implemented in Hugging Face's
search-and-learn ("Scaling test-time compute with open models", Beeching, Tunstall and Rush, 2024):

    1. sample N initial predictions for the first step;
    2. score the generated steps with the PRM's predicted step-wise reward-to-go;
    3. keep the top N/M highest-scoring steps;
    4. from each, sample M proposals for the next step, giving N/M x M candidate prefixes; repeat 2-4.

Here N/M is `beam_width` and M is `expansions`. A beam stops when its step ends the solution (end of
sequence rather than the step separator, or no separator within max_step_tokens), when it fills the model's
context, or after `max_steps` steps;
the search stops once `beam_width` beams have stopped or none is left open. The answer is the best stopped
beam, complete solutions before cut-off ones, by the PRM's value of its last step (Snell et al.'s aggregate;
`aggregate` picks min or product instead).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, replace
from typing import Any

from controllers.base import Param, Result, register
from controllers.errors import ControllerError
from controllers.steps import SearchController, dropped, pruned, require_text_prompt, search_params
from controllers.tasks import Candidate, Intermediate, Progress, Prompt, TaskFailure


@dataclass
class Beam:
    """A partial solution on the beam."""

    text: str
    branch: str                 # where its last step streamed
    value: float = 0.0
    steps: int = 0
    finish_reason: str = ""     # "" while open; "stop" complete, "length" cut off (step tokens or max_steps)
    full: bool = False          # cut off because it fills the model's context


@register
class BeamSearch(SearchController):
    name = "beam_search"
    description = ("PRM-guided beam search over reasoning steps: expand each of beam_width partial solutions "
                   "into `expansions` next steps, keep the beam_width best by process reward (Snell et al. 2024).")
    params = (
        Param("beam_width", "int", 4, "partial solutions kept after each step (N/M in Snell et al.)", minimum=1),
        Param("expansions", "int", 4, "next steps sampled from each kept solution (M)", minimum=1, limit="n"),
        Param("max_steps", "int", 40, "steps after which an open beam is stopped where it is", minimum=1),
        *search_params("process"),
    )

    def run(self, prompt: Prompt) -> Generator[Any, Any, Result]:
        require_text_prompt(prompt)
        beams = [Beam("", "beam/0")]    # the empty solution: the first steps are sampled from the prompt itself
        stopped: list[Beam] = []
        failures: list[TaskFailure] = []
        best: Beam | None = None
        step = 0
        while beams and step < self.max_steps and len(stopped) < self.beam_width:
            step += 1
            yield Progress("step", f"step {step}: {len(beams)} beams x {self.expansions} proposals, "
                                   f"{len(stopped)} stopped", step - 1, self.max_steps)
            parents = [(beam.text, f"beam/{i}/step/{step}") for i, beam in enumerate(beams)]
            expansions = yield from self.search.expand(prompt, parents, self.expansions)

            candidates: list[Beam] = []
            for beam, expansion in zip(beams, expansions, strict=True):
                yield from dropped(expansion)
                if expansion.failure is not None:
                    failures.append(expansion.failure)
                if expansion.full:   # it fills the context: stopped where it is, like a step without separator
                    candidates.append(replace(beam, finish_reason="length", full=True))
                candidates += [Beam(p.path, f"{expansion.branch}/{p.index}", p.value, step,
                                    p.finish_reason if p.ended else "") for p in expansion.proposals]
            if all(e.failure is not None for e in expansions):
                if not stopped:
                    raise ControllerError.from_failure(failures[-1], f"beam search step {step}: every expansion failed")
                beams = []  # keep what has stopped; the failures are in the result's details
                break

            for beam in candidates:
                if beam.finish_reason:
                    stopped.append(beam)
                    yield Intermediate("stopped", beam.branch, self.extract(beam.text), beam.value,
                                       {"finish_reason": beam.finish_reason, "steps": beam.steps,
                                        **({"reason": "context"} if beam.full else {})})
            # Stable sort: equal values keep the earlier beam, then the earlier sample.
            open_beams = sorted((b for b in candidates if not b.finish_reason), key=lambda b: -b.value)
            beams = open_beams[: self.beam_width]
            for beam in open_beams[self.beam_width:]:
                yield pruned(beam.branch, "rank", beam.value)

            leader = max(stopped + beams, key=lambda b: b.value, default=None)
            if leader is not None and (best is None or leader.value > best.value):
                best = leader
                yield Intermediate("best", leader.branch, self.extract(leader.text), leader.value,
                                   {"step": step, "stopped": bool(leader.finish_reason)})

        if step >= self.max_steps:
            for beam in beams:
                beam.finish_reason = "length"
                stopped.append(beam)
        else:
            for beam in beams:  # enough beams stopped: the search is over for the open ones
                yield pruned(beam.branch, "search ended", beam.value)
        yield Progress("done", f"{len(stopped)} beams stopped after {step} steps", step, self.max_steps)
        return self._result(stopped, step, failures)

    def _result(self, stopped: list[Beam], steps: int, failures: list[TaskFailure]) -> Result:
        details: dict[str, Any] = {"steps": steps, "stopped": len(stopped),
                                   "failures": [f"{f.code}: {f.message}" for f in failures]}
        candidates = [Candidate(b.branch, b.text, self.extract(b.text), b.value, b.finish_reason) for b in stopped]
        if not stopped:
            return Result(answer="", text="", candidates=[], details=details)
        # A complete solution beats a cut-off one; among equals the first to stop wins.
        winner = max(stopped, key=lambda b: (b.finish_reason == "stop", b.value))
        details["score"] = winner.value
        details["branch"] = winner.branch
        return Result(answer=self.extract(winner.text), text=winner.text, candidates=candidates, details=details)
