"""How the router picks a worker for a task among those that can serve it.

- "kv" (default): weigh load against KV-prefix overlap, as Dynamo does: cost = overlap_weight *
  prefill_blocks + decode_blocks, lowest wins. prefill_blocks is the part of the prompt the worker
  probably does not hold (the router remembers which prompt prefixes it sent where), decode_blocks
  the KV blocks the worker reports in use plus one per task this router has in flight there. When load is badly
  imbalanced (SGLang's guard: max - min > 64 and max > 1.5 * min) the least loaded wins regardless.
  A run's next task goes back to the worker that ran its last one (its `home`: it holds the run's prompt and
  steps in its prefix cache, which the text-prefix index may not see, e.g. token-id prompts) unless that worker
  is overloaded: more load than twice the least loaded candidate's plus RUN_AFFINITY_SLACK.
- "least_loaded": fewest tasks in flight plus reported queue and running sequences.
- "round_robin": in turn.

The router has no tokenizer, so prefixes are tracked on text: the prompt is cut into chunks of
CHARS_PER_BLOCK characters (about one 16-token KV block of English), hashed chained, so a chunk's
hash stands for the whole prefix up to it (the workers' prefix cache keys its blocks the same way).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

CHARS_PER_BLOCK = 64
RUN_AFFINITY_SLACK = 4      # tasks a run's home worker may be behind the least loaded and still be chosen
POLICIES = ("kv", "least_loaded", "round_robin")


def prefix_hashes(text: str) -> list[bytes]:
    """Chained hashes of the prompt's full CHARS_PER_BLOCK chunks."""
    hashes, previous = [], b""
    for start in range(0, len(text) - CHARS_PER_BLOCK + 1, CHARS_PER_BLOCK):
        previous = hashlib.blake2b(previous + text[start:start + CHARS_PER_BLOCK].encode(), digest_size=8).digest()
        hashes.append(previous)
    return hashes


class RoutableWorker(Protocol):
    """What a policy reads of a worker link (router.worker_connection.WorkerConnection)."""

    address: str
    outstanding: int

    @property
    def reported_load(self) -> tuple[int, int]:
        """(queued + running sequences, KV blocks in use) from the worker's last load report."""
        ...


@dataclass
class PrefixIndex:
    """The prompt prefixes sent to one worker, most recent last; bounded, oldest forgotten first (the
    worker's own cache evicts LRU too, so old entries are the likeliest to be gone there)."""

    capacity: int = 200_000
    entries: collections.OrderedDict[bytes, None] = field(default_factory=collections.OrderedDict)

    def overlap(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of the prompt this worker probably holds."""
        matched = 0
        for h in hashes:
            if h not in self.entries:
                break
            matched += 1
        return matched

    def record(self, hashes: Sequence[bytes]) -> None:
        for h in hashes:
            self.entries[h] = None
            self.entries.move_to_end(h)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


@dataclass
class Decision:
    worker: RoutableWorker
    policy: str
    overlap_blocks: int = 0


class RoutingPolicy:
    """Which worker of a pool takes a task: the policy (kv, least_loaded, round_robin) and what it remembers
    of the prefixes it sent where. Not the router process: one part of it."""

    def __init__(self, policy: str = "kv", overlap_weight: float = 1.0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"routing policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.overlap_weight = overlap_weight
        self._indexes: dict[str, PrefixIndex] = collections.defaultdict(PrefixIndex)
        self._turn = itertools.count()

    @staticmethod
    def load(worker: RoutableWorker) -> int:
        return worker.outstanding + worker.reported_load[0]

    def choose(self, candidates: list[RoutableWorker], hashes: Sequence[bytes] = (), home: str = "") -> Decision:
        """home: the address of the worker that ran the run's last task ("" for a run's first)."""
        # Rotate first so that ties spread instead of piling onto the first worker.
        start = next(self._turn) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        if self.policy == "round_robin":
            return Decision(rotated[0], self.policy)
        if home and self.policy == "kv":
            held = next((w for w in rotated if w.address == home), None)
            if held is not None and self.load(held) <= 2 * min(map(self.load, rotated)) + RUN_AFFINITY_SLACK:
                return Decision(held, "run")
        if self.policy == "least_loaded" or not hashes:
            return Decision(min(rotated, key=self.load), self.policy)
        if self._imbalanced(rotated):
            return Decision(min(rotated, key=self.load), "kv-balance")
        overlaps = {id(w): self._indexes[w.address].overlap(hashes) for w in rotated}

        def cost(w: RoutableWorker) -> float:
            prefill_blocks = len(hashes) - overlaps[id(w)]
            # The worker's own count of KV blocks in use is the decode load (it includes what this
            # router's tasks hold once they run); a task in flight since its last report adds a block,
            # which spreads otherwise equal choices without outweighing a shared prefix.
            decode_blocks = w.reported_load[1] + w.outstanding
            return self.overlap_weight * prefill_blocks + decode_blocks

        best = min(rotated, key=cost)
        return Decision(best, self.policy, overlaps[id(best)])

    def _imbalanced(self, candidates: list[RoutableWorker]) -> bool:
        loads = [self.load(w) for w in candidates]
        return len(loads) > 1 and max(loads) - min(loads) > 64 and max(loads) > 1.5 * min(loads)

    def record(self, worker: RoutableWorker, hashes: Sequence[bytes]) -> None:
        if hashes and self.policy == "kv":
            self._indexes[worker.address].record(hashes)

    def forget(self, worker: RoutableWorker) -> None:
        """The worker restarted or left: whatever it held is gone."""
        self._indexes.pop(worker.address, None)
