"""Which sequences run in the next step, and how many tokens each.

Each step has a token budget (max_num_tokens). Running sequences go first, oldest first: a decode
needs one token, a sequence still prefilling gets the next chunk of its prompt. Waiting sequences
are admitted while budget, batch size and blocks last, in the order of the scheduling policy:
- "fcfs" (the default): arrival order;
- "run_las" (program-aware): by run, not by task. Higher run priority first; then the run
  that has attained the least service (tokens the router says the run consumed before the task was sent,
  plus the tokens this worker has computed for the run since), so a long program's hundredth call does not
  hold back a burst of fresh short runs; then arrival. A task that has waited longer than starvation_s
  goes first whatever its run, so a long program is never starved. The n samples of a task are one
  sequence until its prompt is prefilled and then fork together, so they are admitted as a gang, never half.
When a running sequence needs a block and none is free, the newest running sequence is preempted: its blocks
are freed and it is queued again to be recomputed (its prefix is probably still in the prefix cache).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch_engine.block_manager import BlockManager
from torch_engine.sequence import Sequence, Status


@dataclass
class Scheduled:
    seq: Sequence
    tokens: int                 # how many of its pending tokens run this step


@dataclass
class Plan:
    items: list[Scheduled] = field(default_factory=list)
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (src, dst, tokens) block copies
    preempted: int = 0
    exhausted: list[Sequence] = field(default_factory=list)  # cannot grow even alone: the cache is full


# fcfs stays the default until benchmarks/scheduling.py shows run_las paying (docs/BENCHMARKS.md, issue 20)
POLICIES = ("fcfs", "run_las")
RUNS_REMEMBERED = 4096      # runs whose service on this worker is remembered (least recently served dropped first)


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

    def account(self, seq: Sequence, tokens: int) -> None:
        """tokens of seq's run were computed this step (prefill or decode)."""
        run = seq.request.run
        if run is None:
            return
        self.served[run.run_id] = self.served.pop(run.run_id, 0) + tokens
        if len(self.served) > RUNS_REMEMBERED:
            self.served.popitem(last=False)

    def attained(self, seq: Sequence) -> int:
        run = seq.request.run
        if run is None:     # a task of its own: its service is its own progress
            return seq.computed
        return run.tokens + self.served.get(run.run_id, 0)

    def _next_waiting(self) -> Sequence:
        if self.policy == "fcfs" or len(self.waiting) == 1:
            return self.waiting[0]
        now = time.perf_counter()

        def rank(seq: Sequence) -> tuple:
            request = seq.request
            if now - request.submitted > self.starvation_s:
                return (0, 0, 0, request.submitted)
            priority = request.run.priority if request.run is not None else 0
            return (1, -priority, self.attained(seq), request.submitted)

        return min(self.waiting, key=rank)

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
            seq = self._next_waiting()
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

    def finish(self, seq: Sequence, keep_blocks: bool = False) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        if not keep_blocks:
            self.blocks.free(seq.table)
