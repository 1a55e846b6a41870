"""HTTP clients for a run: httpx.AsyncClient pools of at most SHARD_SIZE connections, one slot per request.

httpcore's connection pool (1.0.x) scans every connection for every other idle one each time a request starts
or ends: O(connections^2) work per request. At 256 streams that took ~90% of the load generator's CPU and
capped what it could measure at ~5k chunks/s. Split into pools of 32, the same load costs a few percent.
Each request in flight holds a distinct slot; slot s always uses pool s // SHARD_SIZE, so no pool ever has
more requests than connections and none waits inside httpx (which would count as server latency).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

import httpx

SHARD_SIZE = 32


class ClientShards:
    def __init__(self, *, base_url: str, timeout: float, headers: Mapping[str, str] | None = None,
                 shard_size: int = SHARD_SIZE) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers or {})
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self.shard_size = shard_size
        self.shards: list[httpx.AsyncClient] = []
        self._free: list[int] = []  # a heap: the lowest free slot first, so low shards keep their connections warm
        self._next_slot = 0

    def _shard(self, index: int) -> httpx.AsyncClient:
        while len(self.shards) <= index:
            limits = httpx.Limits(max_connections=self.shard_size, max_keepalive_connections=self.shard_size)
            # trust_env=False: proxy variables must not route "loopback" load through someone else's proxy
            self.shards.append(httpx.AsyncClient(base_url=self.base_url, headers=self.headers, limits=limits,
                                                 timeout=self.timeout, trust_env=False))
        return self.shards[index]

    @property
    def first(self) -> httpx.AsyncClient:
        return self._shard(0)

    def acquire(self) -> tuple[int, httpx.AsyncClient]:
        """A free slot and the client it uses; the caller gives the slot back with `release`."""
        if self._free:
            slot = heapq.heappop(self._free)
        else:
            slot, self._next_slot = self._next_slot, self._next_slot + 1
        return slot, self._shard(slot // self.shard_size)

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    async def aclose(self) -> None:
        for client in self.shards:
            await client.aclose()

    async def __aenter__(self) -> ClientShards:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
