"""Sequences kept after their task (tokens and KV blocks) under handles '<task_id>/<index>', for later tasks
that continue or fork them without prefilling again.

The engine thread owns the store; `release` is the one call from other threads (it only queues the prefix,
and the engine applies it at its next step). Under KV pressure a kept sequence's blocks go first (its table
emptied): its tokens stay until it expires, so a later task still finds its prefix in the prefix cache.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

from torch_engine.block_manager import BlockManager, BlockTable
from trellis_rpc.errors import not_found


@dataclass
class Kept:
    token_ids: list[int]
    table: BlockTable
    computed: int
    expires: float


class KeptSequences:
    def __init__(self, blocks: BlockManager) -> None:
        self.blocks = blocks
        self._kept: collections.OrderedDict[str, Kept] = collections.OrderedDict()   # oldest first
        self._released: collections.deque[str] = collections.deque()   # task prefixes; deque ops are atomic

    def keep(self, handle: str, token_ids: list[int], table: BlockTable, computed: int, ttl_s: float) -> None:
        replaced = self._kept.pop(handle, None)
        if replaced is not None:   # a task id used again: its earlier sequence goes, rather than leak its blocks
            self.blocks.free(replaced.table)
        self._kept[handle] = Kept(token_ids, table, computed, time.monotonic() + ttl_s)

    def get(self, handle: str) -> Kept:
        """The kept sequence; NOT_FOUND naming generate.source when there is none."""
        kept = self._kept.get(handle)
        if kept is None:
            raise not_found(f"generate.source: no kept sequence {handle!r} (expired, used up or never kept)",
                            "generate.source")
        return kept

    def use_up(self, handle: str) -> None:
        """A continuation took the sequence over (its blocks included): the handle is gone."""
        del self._kept[handle]

    def handles(self) -> list[str]:
        return list(self._kept)

    def holding_blocks(self) -> int:
        """Kept sequences that still hold KV blocks (safe to call from another thread)."""
        return sum(1 for k in list(self._kept.values()) if k.table.blocks)

    def evict_oldest(self) -> bool:
        """Free the blocks of the oldest kept sequence that still holds any; False when none does."""
        for kept in self._kept.values():
            if kept.table.blocks:
                self.blocks.free(kept.table)
                return True
        return False

    def release(self, task_prefix: str) -> None:
        """Drop what the tasks under task_prefix kept, at the engine's next step (thread-safe)."""
        self._released.append(task_prefix + "/")

    def tidy(self) -> None:
        """Drop the expired and the released: once per engine step."""
        now = time.monotonic()
        for handle in [h for h, k in self._kept.items() if k.expires <= now]:
            self.blocks.free(self._kept.pop(handle).table)
        while self._released:
            prefix = self._released.popleft()
            for handle in [h for h in self._kept if h.startswith(prefix)]:
                self.blocks.free(self._kept.pop(handle).table)
