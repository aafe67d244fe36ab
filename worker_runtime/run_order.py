"""The order program-aware scheduling gives runs, in terms every engine can use (issue 20).

Priority class first (RunRequest.priority, higher first), then the run's attained service in doubling
levels, lower first, then arrival. Levels rather than exact tokens: ranking by exact tokens would have similar
short runs overtake each other every step (a fresh one has always attained less), sharing the rows until all of
them finish late; within a level, arrival decides, as in a multi-level feedback queue.
"""

from __future__ import annotations

from worker_runtime.engine_api import RunInfo

LEVEL_TOKENS = 512          # runs that attained fewer tokens than this share the first service level
PRIORITY_CLASSES = 4        # priorities beyond +-4 rank as +-4 where an engine has a bounded priority scale


def service_level(tokens: int) -> int:
    """0 below LEVEL_TOKENS, then 1, 2, ... each level twice as wide as the last."""
    level = 0
    while tokens >= LEVEL_TOKENS << level:
        level += 1
    return level


def run_class(run: RunInfo | None, attained: int | None = None) -> tuple[int, int]:
    """(-priority, service level of `attained` tokens, default the run's own count): lower goes first."""
    priority = run.priority if run is not None else 0
    tokens = attained if attained is not None else (run.tokens if run is not None else 0)
    return (-priority, service_level(tokens))


def run_rank(run: RunInfo | None, waited_s: float, arrival: float, starvation_s: float,
             attained: int | None = None) -> tuple:
    """The run order as a sort key: a task waiting longer than starvation_s first (by arrival), then priority
    class, then the service level of `attained` tokens (default: the run's own count), then arrival."""
    if waited_s > starvation_s:
        return (0, 0, 0, arrival)
    return (1, *run_class(run, attained), arrival)


def bounded_priority(run: RunInfo | None, levels: int = 16) -> float:
    """The run's place in [0, 1], higher first, for an engine whose scheduler takes one number per request
    (TensorRT-LLM's `priority`, 0.5 by default): priority classes are bands of width 1/(2 * PRIORITY_CLASSES + 1)
    around 0.5, and within its band a run that attained less service sits higher."""
    if run is None:
        return 0.5
    band = 1.0 / (2 * PRIORITY_CLASSES + 1)
    cls = max(-PRIORITY_CLASSES, min(PRIORITY_CLASSES, run.priority))
    within = 1.0 - min(service_level(run.tokens), levels - 1) / levels      # (0, 1], fresh runs at 1
    return round(0.5 + cls * band + (within - 0.5) * band * 0.98, 6)
