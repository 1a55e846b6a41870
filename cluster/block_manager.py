"""Owns the KV-cache blocks: allocation, reference counts, the prefix cache and sliding-window release.

gpt-oss alternates sliding-window and full-attention layers. Each group of layers gets its own block table per
sequence, drawn from one shared pool: a block id names the same memory slot in every layer of whichever group
holds it (the KV tensors have one slot per layer pair, see kv_cache.py). Sliding-window tables give blocks back
as soon as no future query can see them, and the table entry becomes the null block 0.

Prefix caching: a full block is identified by a chained hash of its tokens (the hash of everything before it
folded in), per group. A block whose sequence finished keeps its hash until the pool reuses it (LRU order), so
a later request with the same prefix takes it over without recomputing it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # sequence.py imports the sampler (torch); the prefix-aware router needs chain_hash without it
    from gptoss_serve.cluster.sequence import Sequence

FULL, SLIDING = "full", "sliding"
NULL_BLOCK = 0  # never allocated; stands for released sliding-window blocks


def chain_hash(parent: int | None, tokens: list[int]) -> int:
    return hash((parent, tuple(tokens)))


class BlockManager:
    def __init__(self, *, num_blocks: int, block_size: int, sliding_window: int | None,
                 enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (one is the null block), got {num_blocks}")
        self.num_blocks, self.block_size, self.window = num_blocks, block_size, sliding_window
        self.groups = (FULL, SLIDING) if sliding_window else (FULL,)
        self.prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        # free blocks in reuse order (least recently freed first); a cached one keeps its hash until reused
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.cached: dict[tuple[str, int], int] = {}  # (group, block hash) -> block id
        self.hash_of: dict[int, tuple[str, int]] = {}  # block id -> its key in `cached`

    # ---- accounting -------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of allocatable blocks held by sequences."""
        return 1 - len(self.free) / (self.num_blocks - 1)

    def _first_needed_block(self, position: int) -> int:
        """Sliding group: the lowest block a query at `position` (or later) can still see."""
        return max(0, position - self.window + 1) // self.block_size

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks the sequence needs to hold `num_new_tokens` more tokens, over all groups."""
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return sum(max(0, total - len(seq.block_tables.get(g, []))) for g in self.groups)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free)

    # ---- allocation -------------------------------------------------------------------------------------------
    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        if block in self.hash_of:  # reusing a cached block: its old contents are gone
            del self.cached[self.hash_of.pop(block)]
        self.ref_count[block] = 1
        return block

    def _release(self, block: int) -> None:
        if block == NULL_BLOCK:
            return
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self.free[block] = None  # most recently freed: reused last

    def allocate_prompt(self, seq: Sequence) -> None:
        """Gives a waiting sequence its block tables, reusing cached prefix blocks (not yet the new ones)."""
        seq.block_tables = {g: [] for g in self.groups}
        seq.num_computed_tokens = seq.num_cached_tokens = seq.num_hashed_blocks = 0
        seq.block_hashes = []
        if not self.prefix_caching:
            return
        tokens = seq.token_ids
        # the last token is always computed: its logits are what the step samples from
        num_full = (len(tokens) - 1) // self.block_size
        parent = None
        for i in range(num_full):
            parent = chain_hash(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
            seq.block_hashes.append(parent)
        hits = self._longest_cached_prefix(seq.block_hashes)
        for g in self.groups:
            first = self._first_needed_block(hits * self.block_size) if g == SLIDING else 0
            table = seq.block_tables[g]
            for i in range(hits):
                if i < first:
                    table.append(NULL_BLOCK)
                    continue
                block = self.cached[(g, seq.block_hashes[i])]
                if self.ref_count[block] == 0:
                    del self.free[block]
                self.ref_count[block] += 1
                table.append(block)
        seq.num_computed_tokens = seq.num_cached_tokens = hits * self.block_size
        seq.num_hashed_blocks = hits

    def _longest_cached_prefix(self, hashes: list[int]) -> int:
        hits = 0
        while hits < len(hashes) and (FULL, hashes[hits]) in self.cached:
            hits += 1
        if SLIDING in self.groups:  # the sliding group must still hold the window before the hit point
            while hits and not all((SLIDING, hashes[i]) in self.cached
                                   for i in range(self._first_needed_block(hits * self.block_size), hits)):
                hits -= 1
        return hits

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grows the sequence's tables to hold `num_new_tokens` more tokens; call can_append first."""
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        for g in self.groups:
            table = seq.block_tables[g]
            while len(table) < total:
                table.append(self._take())

    def after_step(self, seq: Sequence) -> None:
        """Once the step's tokens are in the cache: register newly full blocks, release out-of-window ones."""
        if self.prefix_caching:
            full = seq.num_computed_tokens // self.block_size
            while seq.num_hashed_blocks < full:
                i = seq.num_hashed_blocks
                if i == len(seq.block_hashes):
                    parent = seq.block_hashes[-1] if seq.block_hashes else None
                    seq.block_hashes.append(chain_hash(parent, seq.tokens_in(i * self.block_size,
                                                                             (i + 1) * self.block_size)))
                for g in self.groups:
                    block = seq.block_tables[g][i]
                    if block != NULL_BLOCK and block not in self.hash_of and (g, seq.block_hashes[i]) not in self.cached:
                        self.cached[(g, seq.block_hashes[i])] = block
                        self.hash_of[block] = (g, seq.block_hashes[i])
                seq.num_hashed_blocks += 1
        if SLIDING in self.groups:
            # the released blocks are always a prefix of the table (the window only moves on): walk back from the
            # first block still needed to the last one released, not over the whole context every step
            table = seq.block_tables[SLIDING]
            i = min(self._first_needed_block(seq.num_computed_tokens), len(table)) - 1
            while i >= 0 and table[i] != NULL_BLOCK:
                self._release(table[i])
                table[i] = NULL_BLOCK
                i -= 1

    def free_sequence(self, seq: Sequence) -> None:
        for table in seq.block_tables.values():
            for block in reversed(table):  # tail blocks are the least likely to be shared: reuse them first
                self._release(block)
        seq.block_tables = {}
