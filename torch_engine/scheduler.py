"""Which sequences run in the next step, and how many tokens each.

Each step has a token budget (max_num_tokens). Running sequences go first, oldest first: a decode
needs one token, a sequence still prefilling gets the next chunk of its prompt. Waiting sequences
are admitted while budget, batch size and blocks last, in the order of the scheduling policy:
- "fcfs" (the default): arrival order;
- "run_las" (program-aware): by run, not by task, and re-decided every step over running and waiting work
  alike, in the run order of worker_runtime/run_order.py: higher run priority first; then the lower service
  level of what the run has attained (tokens the router says the run consumed before the task was sent, plus
  the tokens this worker has computed for the run since), so a long program's hundredth call does not hold back
  a burst of fresh short runs; then arrival. A task older than starvation_s goes first whatever its run, so a
  long program is never starved. Rows go down that ranking: a running request ranked below the ones filling the
  rows is paused for the step (it keeps its blocks and its place; pausing costs nothing, where preempting
  recomputes), because on a CPU a step's time grows with its rows and tokens. For the same reason a prefill
  well below the step's best (a lower priority class, or two service levels up) gets BELOW_RANK_PREFILL tokens
  a step. A request's n samples are scheduled
  together or not at all (gang): its sequence prefills alone and then forks into n, so it is not admitted until
  there are n rows for it, and its forked samples are paused and resumed together. `outranks` tells the
  worker's verifier, which shares the cores, when to hold a worse-ranked run's score task.
When a running sequence needs a block and none is free, a running sequence is preempted (fcfs: the newest;
run_las: a paused one, lowest ranked first): its blocks are freed and it is queued again to be recomputed (its
prefix is probably still in the prefix cache).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch_engine.block_manager import BlockManager
from torch_engine.sequence import Request, Sequence, Status
from worker_runtime.engine_api import RunInfo
from worker_runtime.run_order import run_class, run_rank


@dataclass
class Scheduled:
    seq: Sequence
    tokens: int                 # how many of its pending tokens run this step


@dataclass
class Plan:
    items: list[Scheduled] = field(default_factory=list)
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (src, dst, tokens) block copies
    preempted: int = 0
    paused: int = 0             # running sequences left out of this step (run_las)
    exhausted: list[Sequence] = field(default_factory=list)  # cannot grow even alone: the cache is full


# fcfs stays the default: run_las buys short runs latency with long programs' (docs/BENCHMARKS.md, issue 20)
POLICIES = ("fcfs", "run_las")
RUNS_REMEMBERED = 4096      # runs whose service on this worker is remembered (least recently served dropped first)
# run_las: prompt tokens per step for requests ranked below the best-ranked one in the step. A step's time grows
# with its tokens, so a long program's 500-token prefill in the same step would make a short run's decode step
# ten times slower; chunked this small, the prefill still advances every step without holding the short run back.
BELOW_RANK_PREFILL = 64
# The prefill cap and the verifier's hold protect a run only from runs a priority class below it or this many
# service levels above it (4x the attained tokens): long programs of similar size must not throttle each other.
PROTECTED_LEVELS = 2


def protects(better: tuple[int, int], other: tuple[int, int]) -> bool:
    """Whether work ranked (-priority, level) `better` is shielded from work ranked `other`."""
    return other[0] > better[0] or (other[0] == better[0] and other[1] >= better[1] + PROTECTED_LEVELS)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_tokens: int, max_batch_size: int,
                 reclaim: Callable[[], bool] = lambda: False, policy: str = "fcfs",
                 starvation_s: float = 10.0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.blocks = blocks
        self.reclaim = reclaim  # frees blocks of kept sequences, oldest first; False when none is left
        self.max_num_tokens = max_num_tokens
        self.max_batch_size = max_batch_size
        self.policy = policy
        self.starvation_s = starvation_s
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.served: collections.OrderedDict[str, int] = collections.OrderedDict()   # run_id -> tokens computed here
        self.paused = 0     # running sequences the last step left out (run_las)
        # (-priority, service level) of the best-ranked request the last step ran (run_las): read by the scoring
        # thread, which holds back a score task of a worse-ranked run while this engine serves a better one.
        self.serving: tuple[int, int] | None = None

    def account(self, seq: Sequence, tokens: int) -> None:
        """tokens of seq's run were computed this step (prefill or decode)."""
        run = seq.request.run
        if run is None:
            return
        self.served[run.run_id] = self.served.pop(run.run_id, 0) + tokens
        if len(self.served) > RUNS_REMEMBERED:
            self.served.popitem(last=False)

    def attained(self, request: Request) -> int:
        run = request.run
        if run is None:     # a task of its own: its service is its own progress
            return sum(seq.computed for seq in request.sequences)
        return run.tokens + self.served.get(run.run_id, 0)

    def rank(self, request: Request, now: float) -> tuple:
        """run_las's order: starved first, then priority, then the service level, then arrival."""
        return run_rank(request.run, now - request.submitted, request.submitted, self.starvation_s,
                        self.attained(request))

    def waiting_runs(self) -> int:
        return len({s.request.run.run_id if s.request.run else s.request.task_id for s in self.waiting})

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def _reserve(self, seq: Sequence, tokens: int, plan: Plan) -> bool:
        copies = self.blocks.ensure(seq.table, seq.computed + tokens)
        while copies is None:
            if not self.reclaim():
                return False
            copies = self.blocks.ensure(seq.table, seq.computed + tokens)
        filled = seq.computed % self.blocks.block_size or self.blocks.block_size
        plan.copies.extend((src, dst, filled) for src, dst in copies)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.table)
        seq.computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def schedule(self) -> Plan:
        return self._schedule_by_run() if self.policy == "run_las" else self._schedule_in_arrival_order()

    def _schedule_in_arrival_order(self) -> Plan:
        plan = Plan()
        budget = self.max_num_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:          # preempted below to make room for an older one
                continue
            tokens = min(seq.pending, budget)
            while not self._reserve(seq, tokens, plan):
                if len(self.running) == 1:
                    plan.exhausted.append(seq)
                    break
                victim = self.running[-1]
                self._preempt(victim)
                plan.preempted += 1
                if victim is seq:
                    break
            else:
                plan.items.append(Scheduled(seq, tokens))
                budget -= tokens
        rows = sum(1 for s in self.running)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            request = seq.request
            reserve_rows = 1 if request.forked else request.cfg.n
            if self.running and rows + reserve_rows > self.max_batch_size:
                break
            if not seq.table.blocks:
                hit = self.blocks.match_prefix(seq.table, seq.token_ids)
                seq.computed = hit
                if not request.forked and seq.index == 0:
                    request.cached_prompt_tokens = hit
            tokens = min(seq.pending, budget)
            if not self._reserve(seq, tokens, plan):
                # Give the prefix blocks back while it waits: running sequences may need them.
                self.blocks.free(seq.table)
                seq.computed = 0
                if not self.running:
                    plan.exhausted.append(seq)  # nothing will free blocks: it cannot ever run
                break
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.items.append(Scheduled(seq, tokens))
            budget -= tokens
            rows += reserve_rows
        return plan

    def _schedule_by_run(self) -> Plan:
        plan = Plan()
        now = time.perf_counter()
        requests: dict[int, list[Sequence]] = {}
        for seq in (*self.running, *self.waiting):
            requests.setdefault(id(seq.request), []).append(seq)
        ranked = sorted(requests.values(), key=lambda group: self.rank(group[0].request, now))
        budget, rows = self.max_num_tokens, 0
        below = BELOW_RANK_PREFILL
        top: tuple[int, int] | None = None
        chosen: set[int] = set()
        for group in ranked:
            request = group[0].request
            need = len(group) if request.forked else request.cfg.n
            if rows and rows + need > self.max_batch_size:
                continue    # the whole gang or none of it; a smaller request further down may still fit
            key = self.class_and_level(request)
            top = key if top is None else top
            for seq in group:
                if budget == 0:
                    break
                if seq.status is Status.WAITING and not seq.table.blocks:
                    hit = self.blocks.match_prefix(seq.table, seq.token_ids)
                    seq.computed = hit
                    if not request.forked and seq.index == 0:
                        request.cached_prompt_tokens = hit
                tokens = min(seq.pending, budget)
                if tokens > 1 and protects(top, key):      # a prefill well below the step's best
                    tokens = min(tokens, below)
                    below -= tokens
                    if tokens == 0:
                        if seq.status is Status.WAITING:
                            self.blocks.free(seq.table)     # its prefix blocks go back while it waits
                            seq.computed = 0
                        break
                if not self._reserve_evicting(seq, tokens, plan, ranked, chosen):
                    if seq.status is Status.WAITING:
                        self.blocks.free(seq.table)     # its prefix blocks go back while it waits
                        seq.computed = 0
                    if not chosen and len(self.running) <= (seq.status is Status.RUNNING):
                        plan.exhausted.append(seq)      # alone and still no room: it can never run
                    budget = 0
                    break
                if seq.status is Status.WAITING:
                    self.waiting.remove(seq)
                    seq.status = Status.RUNNING
                    self.running.append(seq)
                chosen.add(id(seq))
                plan.items.append(Scheduled(seq, tokens))
                budget -= tokens
            if any(id(seq) in chosen for seq in group):
                rows += need
            if budget == 0:
                break
        plan.paused = self.paused = sum(1 for seq in self.running if id(seq) not in chosen)
        self.serving = min((self.class_and_level(item.seq.request) for item in plan.items), default=None)
        return plan

    def class_and_level(self, request: Request) -> tuple[int, int]:
        return run_class(request.run, self.attained(request))

    def outranks(self, run: RunInfo | None) -> bool:
        """Whether the last step served a run well above `run` (a better priority class, or PROTECTED_LEVELS
        service levels lower): a scorer sharing this worker's cores waits rather than slow that run down."""
        serving = self.serving      # read once: the engine thread replaces it every step
        return serving is not None and protects(serving, run_class(run))

    def _reserve_evicting(self, seq: Sequence, tokens: int, plan: Plan, ranked: list[list[Sequence]],
                          chosen: set[int]) -> bool:
        """Blocks for seq's step; when none are free, running sequences not chosen this step give theirs back,
        lowest ranked first (they are recomputed when their turn comes)."""
        victims = [s for group in reversed(ranked) for s in group
                   if s.status is Status.RUNNING and id(s) not in chosen and s.request is not seq.request]
        while not self._reserve(seq, tokens, plan):
            if not victims:
                return False
            self._preempt(victims.pop(0))
            plan.preempted += 1
        return True

    def finish(self, seq: Sequence, keep_blocks: bool = False) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        if not keep_blocks:
            self.blocks.free(seq.table)
