"""KV blocks: allocation, reference counts, copy-on-write, and a prefix cache of full blocks.

A full block is identified by the hash of its tokens chained with its predecessor's hash, so a
match means the whole prefix up to and including it is identical. Blocks nobody references keep
their contents and hash and sit in an LRU; they are reused on a hit and evicted (oldest first)
only when a fresh block is needed.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass
class Block:
    block_id: int
    ref: int = 0
    hash: int | None = None
    tokens: tuple[int, ...] = ()


@dataclass
class PrefixStats:
    queried_tokens: int = 0
    hit_tokens: int = 0


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


@dataclass
class BlockTable:
    """The blocks of one sequence, and the chain hashes of its leading sealed (full, computed) blocks."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)

    @property
    def sealed(self) -> int:
        return len(self.hashes)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: collections.deque[int] = collections.deque(range(num_blocks))
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # ref 0, hash kept, LRU
        self._by_hash: dict[int, int] = {}
        self.prefix = PrefixStats()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _take(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._cached.popitem(last=False)
            evicted = self.blocks[block_id]
            if self._by_hash.get(evicted.hash) == block_id:
                del self._by_hash[evicted.hash]
            evicted.hash, evicted.tokens = None, ()
        self.blocks[block_id].ref = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref -= 1
        assert block.ref >= 0, f"block {block_id} released twice"
        if block.ref == 0:
            if block.hash is not None:
                self._cached[block_id] = None
            else:
                self._free.append(block_id)

    def match_prefix(self, table: BlockTable, tokens: list[int]) -> int:
        """Attach cached full blocks matching tokens' prefix to an empty table; return tokens covered.
        At least one token is always left uncovered: the model must run it to produce logits."""
        assert not table.blocks
        bs = self.block_size
        usable = (len(tokens) - 1) // bs
        parent = None
        self.prefix.queried_tokens += usable * bs
        for i in range(usable):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = chain_hash(parent, chunk)
            block_id = self._by_hash.get(h)
            if block_id is None or self.blocks[block_id].tokens != chunk:
                break
            block = self.blocks[block_id]
            if block.ref == 0:
                self._cached.pop(block_id, None)
            block.ref += 1
            table.blocks.append(block_id)
            table.hashes.append(h)
            parent = h
        hit = table.sealed * bs
        self.prefix.hit_tokens += hit
        return hit

    def ensure(self, table: BlockTable, tokens: int) -> list[tuple[int, int]] | None:
        """Make the table hold `tokens` slots, with its unsealed tail block private (copy-on-write).
        Returns the (src, dst) block copies the caller must perform, or None if blocks ran out
        (nothing changed then)."""
        need = self.blocks_for(tokens) - len(table.blocks)
        tail_shared = (len(table.blocks) > table.sealed and self.blocks[table.blocks[-1]].ref > 1)
        if need + int(tail_shared) > self.num_free:
            return None
        copies = []
        if tail_shared:
            src = table.blocks[-1]
            dst = self._take()
            self._release(src)
            table.blocks[-1] = dst
            copies.append((src, dst))
        for _ in range(max(0, need)):
            table.blocks.append(self._take())
        return copies

    def seal(self, table: BlockTable, tokens: list[int], computed: int) -> None:
        """Register blocks that became full (their K/V computed) in the prefix cache."""
        bs = self.block_size
        while table.sealed < min(computed // bs, len(table.blocks)):
            i = table.sealed
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = chain_hash(table.hashes[-1] if table.hashes else None, chunk)
            block = self.blocks[table.blocks[i]]
            if block.hash is None and h not in self._by_hash:
                block.hash, block.tokens = h, chunk
                self._by_hash[h] = block.block_id
            table.hashes.append(h)

    def rewind(self, table: BlockTable, computed: int) -> None:
        """Only the first `computed` tokens stay valid: a block holding later ones is no longer sealed,
        so the next write into it goes through copy-on-write if it is shared."""
        del table.hashes[computed // self.block_size:]

    def fork(self, table: BlockTable) -> BlockTable:
        """A child sharing every block; the first write into a shared partial tail block copies it."""
        for block_id in table.blocks:
            self.blocks[block_id].ref += 1
        return BlockTable(list(table.blocks), list(table.hashes))

    def free(self, table: BlockTable) -> None:
        # Tail blocks first, so the LRU evicts a sequence's end before its (more shareable) beginning.
        for block_id in reversed(table.blocks):
            self._release(block_id)
        table.blocks.clear()
        table.hashes.clear()
