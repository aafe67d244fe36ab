"""The yes/no verifier's question, shared by every engine that offers SCORE_VERIFIER, so a candidate means
the same question to the CPU engine, TensorRT-LLM and an OpenAI-compatible upstream.

score = P(yes) / (P(yes) + P(no)) of the model's next token after the question (with the generation prompt).
"""

from __future__ import annotations

from worker_runtime.engine_api import PromptInput

VERIFY_TEMPLATE = "Question: {question}\nProposed answer: {answer}\nIs the proposed answer correct? Answer Yes or No."


def prompt_messages(prompt: PromptInput) -> list[dict[str, str]]:
    if prompt.chat is not None:
        return [{"role": m["role"], "content": m["content"]} for m in prompt.chat]
    return [{"role": "user", "content": prompt.text or ""}]


def prompt_text(prompt: PromptInput) -> str:
    """The prompt as plain text: the text itself, or the non-empty chat messages joined by blank lines."""
    if prompt.chat is not None:
        return "\n\n".join(m["content"] for m in prompt.chat if m["content"].strip())
    return prompt.text or ""


def verify_question(prompt: PromptInput, candidate: str) -> str:
    return VERIFY_TEMPLATE.format(question=prompt_text(prompt), answer=candidate)
