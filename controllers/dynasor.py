"""DynasorCoT: reason in chunks, probe for the answer after each, stop once the probes are certain.

Fu et al., "Efficiently Serving LLM Reasoning Programs with Certaindex" (Dynasor), arXiv:2412.20993,
2024 (revised 2025 as "Efficiently Scaling LLM Reasoning with Certaindex"). Dynasor-CoT, or
probe-in-the-middle: after every `probe_interval` reasoning tokens, append a probe ("... Oh, I suddenly
got the answer to the whole problem, **Final Answer**: \\boxed{") and let the model write a few tokens
to read the answer it would give now. Once `agree` consecutive probes give the same answer, each free of
hesitation ("wait", "hmm", ...), the answer is certain and the reasoning stops; otherwise it goes on
up to `max_tokens`, or until the reasoning (with a probe after it) fills the model's context.

Serving: the reasoning is kept on the worker between chunks (keep_s): a chunk continues the kept sequence
(continue_from) and a probe forks it (fork_from), so neither prefills the reasoning again. When the worker
no longer holds it (NOT_FOUND: expired or evicted; UNAVAILABLE: its worker is gone), the step re-sends the
prompt plus the reasoning so far, which the prefix cache makes cheap; runners that keep nothing (no
handles) are served that way throughout. The controller therefore keeps the text so far itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from controllers import extractors
from controllers.answers import EXTRACTOR_PARAMS, answer_extractor
from controllers.base import INT32_MAX, Controller, Param, Result, register
from controllers.errors import ControllerError, ParamError
from controllers.tasks import Candidate, Generate, Intermediate, Progress, Prompt, SampleOut

PROBE = "... Oh, I suddenly got the answer to the whole problem, **Final Answer**\n\n\\[ \\boxed{"
# A probe that hesitates right after its answer is not counted as certain (the authors' word list).
HESITATION = re.compile(r"\b(wait|hold|but|okay|no|hmm)\b", re.IGNORECASE)
# A handle task that fails so has lost its sequence; anything else would fail a re-send too.
HANDLE_LOST = ("NOT_FOUND", "UNAVAILABLE")


@dataclass
class Probe:
    answer: str
    text: str
    certain: bool     # no hesitation in what the probe wrote


@dataclass
class Reasoning:
    """The sequence being reasoned: its text so far and, while the worker keeps it, its handle."""

    text: str = ""
    tokens: int = 0
    handle: str = ""
    chunks: int = 0
    probe_tokens: int = 0
    fallbacks: int = 0
    probes: list[Probe] = field(default_factory=list)


@register
class DynasorCoT(Controller):
    name = "dynasor_cot"
    description = ("Reason in chunks and probe for the answer after each; stop once consecutive probes agree "
                   "(Dynasor-CoT).")
    params = (
        Param("max_tokens", "int", 2048, "reasoning tokens at most (probes not counted)", minimum=1),
        # These two become SamplingParams.max_tokens (an int32): a larger value failed the run as INTERNAL mid-way.
        Param("probe_interval", "int", 64, "reasoning tokens between probes", minimum=1, maximum=INT32_MAX),
        Param("agree", "int", 3, "consecutive probes that must give the same certain answer", minimum=1),
        Param("probe_tokens", "int", 20, "tokens a probe may write to state its answer", minimum=1,
              maximum=INT32_MAX),
        Param("probe", "str", PROBE, "text appended to the reasoning so far to draw out the answer"),
        Param("keep_s", "float", 30.0, "seconds the worker keeps the reasoning (and its KV) for the next chunk "
              "and probe; 0: re-send the prompt and the reasoning every time", minimum=0.0, maximum=3600.0),
        *EXTRACTOR_PARAMS,
    )

    def __init__(self, **params) -> None:
        super().__init__(**params)
        if not self.probe.strip():
            raise ParamError("params.probe", "must not be empty")
        self.extract = answer_extractor(self.extractor, self.pattern)

    def run(self, prompt: Prompt):
        state = Reasoning()
        yield Progress("reasoning", f"up to {self.max_tokens} tokens, probing every {self.probe_interval}",
                       0, self.max_tokens)
        while True:
            sample = yield from self._chunk(prompt, state)
            if sample is None:
                stop = "context"
                break
            if sample.finish_reason != "length" or not sample.token_count:
                stop = "finished"  # the model ended its reasoning on its own
                break
            probe = yield from self._probe(prompt, state)
            if probe is None:
                stop = "context"
                break
            streak = self._streak(state.probes)
            yield Intermediate("probe", f"probe/{len(state.probes) - 1}/0", probe.answer, float(streak),
                               {"tokens": state.tokens, "certain": probe.certain})
            yield Progress("reasoning", f"{state.tokens} tokens, probe says {probe.answer!r} ({streak} in a row)",
                           state.tokens, self.max_tokens)
            if streak >= self.agree:
                stop = "certain"
                break
            if state.tokens >= self.max_tokens:
                stop = "max_tokens"
                break

        if stop == "finished":
            answer, text = self.extract(state.text), state.text
            if not answer:  # no answer in the text: ask for it as a probe would
                probe = yield from self._probe(prompt, state)
                answer = probe.answer if probe else ""
        else:
            # The latest answer a probe found, written after the reasoning the way the probe asked for it.
            found = next((p for p in reversed(state.probes) if p.answer), None)
            answer, text = "", state.text
            if found:
                answer = found.answer
                text += self.probe + (found.answer + "}" if self._boxed_probe() else found.text)
            elif stop == "context":   # no room left to ask: whatever answer the reasoning holds
                answer = self.extract(state.text)
        return Result(
            answer=answer, text=text,
            candidates=[Candidate("reasoning/0", text, answer, finish_reason="stop" if stop in ("finished", "certain")
                                  else "length")],
            details={"stopped_by": stop, "reasoning_tokens": state.tokens, "probe_tokens": state.probe_tokens,
                     "chunks": state.chunks, "probes": [p.answer for p in state.probes],
                     "fallbacks": state.fallbacks},
        )

    # ---- steps --------------------------------------------------------------------------------

    def _chunk(self, prompt: Prompt, state: Reasoning):
        """The next chunk of reasoning, or None when the reasoning already fills the model's context."""
        sampling = {"max_tokens": min(self.probe_interval, self.max_tokens - state.tokens), "min_tokens": 0}
        task = yield from self._generate(prompt, state, "", sampling, "reasoning", fork=False)
        if task is None:
            return None
        sample: SampleOut = task.output.samples[0]
        state.text += sample.text
        state.tokens += sample.token_count
        state.chunks += 1
        state.handle = task.output.handles[0] if self.keep_s and task.output.handles else ""
        return sample

    def _probe(self, prompt: Prompt, state: Reasoning):
        """Ask for the answer now; None when the reasoning plus the probe do not fit the model's context."""
        # Greedy: the probe reads the answer the reasoning points to, not a sample of it.
        sampling = {"temperature": 0.0, "max_tokens": self.probe_tokens, "min_tokens": 0}
        task = yield from self._generate(prompt, state, self.probe, sampling, f"probe/{len(state.probes)}",
                                         fork=True)
        if task is None:
            return None
        out = task.output.samples[0]
        state.probe_tokens += out.token_count
        if self._boxed_probe():
            answer = extractors.boxed("\\boxed{" + out.text)  # up to the brace that closes the probe's box
        else:
            answer = self.extract(self.probe + out.text)
        probe = Probe(answer, out.text, certain=not HESITATION.search(out.text))
        state.probes.append(probe)
        return probe

    def _generate(self, prompt: Prompt, state: Reasoning, suffix: str, sampling: dict, branch: str, fork: bool):
        """Run one step from the kept sequence when there is one, else (or when it is lost) from a re-sent
        prompt + reasoning + suffix. A chunk (fork=False) asks to keep what it produces; a probe does not.
        None when the text the controller added (reasoning, probe) makes it too long for the model's context."""
        keep_s = 0.0 if fork else self.keep_s
        own_text = bool(state.text or suffix)
        if state.handle:
            source = {"fork_from": state.handle} if fork else {"continue_from": state.handle}
            task = Generate(Prompt(text=suffix), sampling=sampling, branch=branch, keep_s=keep_s, **source)
            yield task
            if task.ok:
                return task
            if task.failure.context_full and own_text:
                return None
            if task.failure.code not in HANDLE_LOST:
                raise ControllerError.from_failure(task.failure)
            state.handle = ""
            state.fallbacks += 1
            yield Intermediate("fallback", branch, details={"code": task.failure.code,
                                                            "message": task.failure.message})
        try:
            resent = prompt.continued(state.text + suffix)
        except ValueError:  # a token-id prompt: served only while the worker keeps the reasoning
            raise ControllerError("INVALID_ARGUMENT", "dynasor_cot must re-send the prompt with the reasoning so far, "
                                                      "which takes a text or chat prompt, not token ids") from None
        task = Generate(resent, sampling=sampling, branch=branch, keep_s=keep_s)
        yield task
        if task.ok:
            return task
        if task.failure.context_full and own_text:
            return None
        raise ControllerError.from_failure(task.failure)

    def _boxed_probe(self) -> bool:
        return self.probe.rstrip().endswith("\\boxed{")

    @staticmethod
    def _streak(probes: list[Probe]) -> int:
        """How many of the latest probes give the same non-empty answer, each without hesitation."""
        count = 0
        for p in reversed(probes):
            if not (p.answer and p.certain and p.answer == probes[-1].answer):
                break
            count += 1
        return count
