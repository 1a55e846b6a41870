"""PrefixTable: which attention replicas were sent which block-aligned prompt prefixes, as one router saw it.

A prompt's prefix is named block by block with the block manager's chained hash (cluster/block_manager.py), so
"the first k blocks of this prompt" is one table key and a replica's cached prefix is matched the way its own
prefix cache would match it. The table is this router's memory of its own routing decisions, not a view of the
replicas' caches: it may claim a prefix that a replica has since evicted (a miss there costs what routing by load
would have cost) and it is bounded, least recently used keys going first. Nothing here is shared between router
processes, so a restart only loses what this one remembered.

Within a process, the caller that owns the router (the BatchingRouter) reads the same table to form its batches:
`registered(app, deployment)` finds it, and `preferred` names the replica a prompt would go to alone, so that a batch
holds requests bound for one replica (a batch goes to one replica, and a mixed one would miss for all but its
majority). Serve may run its routers on an event loop thread of their own: a lock guards the table.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from gptoss_serve.cluster.block_manager import chain_hash

MAX_ENTRIES = 200_000  # block hashes kept: ~100 bytes each with their replica sets, so ~20 MB at most
MAX_BLOCKS_PER_PROMPT = 2_048  # 32k tokens at block size 16: longer prompts are matched on that much, keeping
# the hashing per request in the router's event loop to about a millisecond


MIN_MATCH_RATIO = 0.3  # SGLang's cache-aware router's default threshold for following a match


def worth_following(matched_tokens: dict[str, int], prompt_tokens: int,
                    min_match_ratio: float = MIN_MATCH_RATIO) -> dict[str, int]:
    """The replicas whose cached prefix is a reason to pick them, with their matched tokens: at least
    min_match_ratio of the prompt tokens. A short shared start (the chat template's header, the same in every
    prompt) seen on one replica would otherwise pull every new conversation onto the first replica that served
    one; a conversation's next turn, or a new one whose long system prompt a replica holds, matches most of its
    prompt."""
    enough = max(1.0, min_match_ratio * prompt_tokens)
    return {replica: tokens for replica, tokens in matched_tokens.items() if tokens >= enough}


class PrefixTable:
    def __init__(self, *, block_size: int = 16, max_entries: int = MAX_ENTRIES,
                 max_blocks_per_prompt: int = MAX_BLOCKS_PER_PROMPT, min_match_ratio: float = MIN_MATCH_RATIO) -> None:
        self.block_size, self.max_entries, self.max_blocks = block_size, max_entries, max_blocks_per_prompt
        self.min_match_ratio = min_match_ratio
        # hash of a prompt's first k blocks -> the replicas sent a prompt starting so (most recent last)
        self.holders: OrderedDict[int, dict[str, None]] = OrderedDict()
        self.replicas: set[str] = set()  # every replica recorded since it was last forgotten
        self.lock = threading.Lock()

    def block_hashes(self, token_ids: list[int]) -> list[int]:
        """Chained hashes of the prompt's full blocks. As in the block manager, the last token never counts: a
        prompt whose every block is cached still has its last token computed, so that block is not reused."""
        size = self.block_size
        num_full = min(max(0, len(token_ids) - 1) // size, self.max_blocks)
        hashes, parent = [], None
        for i in range(num_full):
            parent = chain_hash(parent, token_ids[i * size:(i + 1) * size])
            hashes.append(parent)
        return hashes

    def matches(self, hashes: list[int]) -> dict[str, int]:
        """Replica id -> how many leading blocks of this prompt it was sent (replicas with none are absent)."""
        with self.lock:
            return self._matches(hashes, touch=True)

    def preferred(self, hashes: list[int], prompt_tokens: int) -> str | None:
        """The replica the router would follow for this prompt alone: of those whose match is worth following
        (worth_following), one sent the most leading blocks; None if none is. Looking does not count as use (the
        LRU order is the router's)."""
        with self.lock:
            matched = self._matches(hashes, touch=False)
        tokens = {r: blocks * self.block_size for r, blocks in matched.items()}
        holders = worth_following(tokens, prompt_tokens, self.min_match_ratio)
        return max(holders, key=holders.__getitem__) if holders else None

    def _matches(self, hashes: list[int], *, touch: bool) -> dict[str, int]:
        matched: dict[str, int] = {}
        alive: set[str] | None = None  # replicas that hold every block so far
        for depth, h in enumerate(hashes, start=1):
            holders = self.holders.get(h)
            if not holders:
                break
            if touch:
                self.holders.move_to_end(h)
            alive = set(holders) if alive is None else alive & holders.keys()
            if not alive:
                break
            for replica in alive:
                matched[replica] = depth
        return matched

    def record(self, hashes: list[int], replica: str) -> None:
        """This prompt (its block hashes) was sent to `replica`: it will hold these blocks in its prefix cache."""
        with self.lock:
            self._record(hashes, replica)

    def _record(self, hashes: list[int], replica: str) -> None:
        self.replicas.add(replica)
        for h in hashes:
            holders = self.holders.get(h)
            if holders is None:
                holders = self.holders[h] = {}
            else:
                self.holders.move_to_end(h)
            holders.pop(replica, None)
            holders[replica] = None
        while len(self.holders) > self.max_entries:
            self.holders.popitem(last=False)

    def forget(self, live_replicas: set[str]) -> None:
        """Drops every replica not in `live_replicas` (stopped, restarted under a new id, scaled down). Serve
        announces the replica set often and it seldom loses one: only a loss walks the table."""
        with self.lock:
            self._forget(live_replicas)

    def _forget(self, live_replicas: set[str]) -> None:
        gone = self.replicas - live_replicas
        if not gone:
            return
        self.replicas -= gone
        for h in list(self.holders):
            holders = self.holders[h]
            for replica in [r for r in holders if r in gone]:
                del holders[replica]
            if not holders:
                del self.holders[h]

    def __len__(self) -> int:
        return len(self.holders)


# (app, deployment) -> the table of the router that routes this process's calls to that deployment
_REGISTERED: dict[tuple[str, str], PrefixTable] = {}


def register(app: str, deployment: str, table: PrefixTable) -> None:
    _REGISTERED[(app, deployment)] = table


def registered(app: str, deployment: str) -> PrefixTable | None:
    return _REGISTERED.get((app, deployment))
