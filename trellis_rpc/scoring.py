"""Validation of ScoreRequest: what the router checks at the edge and every worker checks again.

Messages start with the field, named as in ScoreRequest (`candidates: must not be empty`), so the
router's client sees the same field whichever side rejected the request.
"""

from __future__ import annotations

from trellis_rpc.errors import invalid
from trellis_rpc.sampling import check_prompt
from trellis_rpc.v1 import common_pb2

# Where one reasoning step ends in a process-reward candidate, unless the request names another separator.
DEFAULT_STEP_SEPARATOR = "\n\n"

# ScoreKind -> the scorer kind (worker_runtime.engine_api.SCORE_KINDS) and the capability that serves it.
KIND_NAMES = {
    common_pb2.SCORE_KIND_OUTCOME: "outcome",
    common_pb2.SCORE_KIND_PROCESS: "process",
    common_pb2.SCORE_KIND_VERIFIER: "verifier",
}
CAPABILITY_OF_KIND = {
    "outcome": common_pb2.CAPABILITY_SCORE_OUTCOME,
    "process": common_pb2.CAPABILITY_SCORE_PROCESS,
    "verifier": common_pb2.CAPABILITY_SCORE_VERIFIER,
}


def process_steps(candidate: str, separator: str) -> list[str]:
    """The reasoning steps of a candidate: split at the separator, blank pieces dropped."""
    return [s for s in candidate.split(separator) if s.strip()]


def check_score_request(request: common_pb2.ScoreRequest, max_candidates: int | None = None) -> str:
    """Check what needs no model; returns the kind name. Raises StatusError(INVALID_ARGUMENT) naming the field."""
    check_prompt(request.prompt, "prompt")
    if request.prompt.WhichOneof("kind") == "token_ids":
        raise invalid("prompt.token_ids", "scoring takes a text or chat prompt (the scorer renders the prompt and "
                                          "each candidate together)")
    if not request.candidates:
        raise invalid("candidates", "must not be empty")
    if max_candidates is not None and len(request.candidates) > max_candidates:
        raise invalid("candidates", f"at most {max_candidates} per request, got {len(request.candidates)}")
    kind = KIND_NAMES.get(request.kind)
    if kind is None:
        raise invalid("kind", "must be SCORE_KIND_OUTCOME, SCORE_KIND_PROCESS or SCORE_KIND_VERIFIER, "
                              f"got {common_pb2.ScoreKind.Name(request.kind) if request.kind == 0 else request.kind}")
    if kind == "process":
        separator = request.step_separator or DEFAULT_STEP_SEPARATOR
        for i, candidate in enumerate(request.candidates):
            if not process_steps(candidate, separator):
                raise invalid(f"candidates[{i}]", f"has no reasoning step (steps end at {separator!r})")
    return kind
