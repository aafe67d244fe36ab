"""NativeGeneration: one sample, as is (chain of thought when the prompt asks for it).

Wei et al., "Chain-of-Thought Prompting Elicits Reasoning in Large Language Models", NeurIPS 2022.
"""

from __future__ import annotations

from controllers.base import Controller, Result, register
from controllers.errors import ControllerError
from controllers.tasks import Candidate, Generate, Prompt


@register
class NativeGeneration(Controller):
    name = "native_generation"
    description = "A single sample of the prompt, streamed; the answer is the generated text."
    params = ()

    def run(self, prompt: Prompt):
        task = Generate(prompt, n=1, branch="sample")
        yield [task]
        if not task.ok:
            raise ControllerError.from_failure(task.failure)
        sample = task.output.samples[0]
        return Result(
            answer=sample.text, text=sample.text,
            candidates=[Candidate("sample/0", sample.text, sample.text, finish_reason=sample.finish_reason)],
        )
