"""ResponseStore: stored responses, for `previous_response_id` and GET /v1/responses/{id}.

In a Serve app the store is one named, detached Ray actor per app, shared by every ingress replica: the first replica
to use it creates it, the others find it by name, so a conversation goes on whichever replica its next request
reaches, and outlives a redeploy of the ingress. Outside Serve (tests that build the ingress in-process) it is an
object in the process.

Bounded: at most `max_entries` responses and `max_bytes` of them (their JSON size), each kept for at most `ttl_s`;
the oldest go first. An entry holds the response (for GET) and its whole conversation (the input items of every turn
and the output items), so that continuing it never depends on an older entry that may be gone. The actor restarts
after a crash, empty: its responses are then unknown (404), never wrong.
"""

from __future__ import annotations

import functools
import json
import time
from collections import OrderedDict
from collections.abc import Callable

STORE_NAMESPACE = "gptoss_serve"


def store_name(app_name: str) -> str:
    return f"response_store:{app_name}"


class ResponseStore:
    def __init__(self, *, max_entries: int, max_bytes: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.entries: OrderedDict[str, tuple[float, int, dict]] = OrderedDict()  # id -> (stored at, bytes, entry)
        self.num_bytes = 0
        self.configure(max_entries=max_entries, max_bytes=max_bytes, ttl_s=ttl_s)

    def configure(self, *, max_entries: int, max_bytes: int, ttl_s: float) -> None:
        self.max_entries, self.max_bytes, self.ttl_s = max_entries, max_bytes, ttl_s
        self._evict()

    def put(self, key: str, entry: dict) -> bool:
        """Stores (or replaces) an entry; False when it alone is larger than max_bytes (it is not stored)."""
        size = len(json.dumps(entry, separators=(",", ":")))
        self.delete(key)
        if size > self.max_bytes:
            return False
        self.entries[key] = (self.clock(), size, entry)
        self.num_bytes += size
        self._evict()
        return True

    def get(self, key: str) -> dict | None:
        self._evict()
        found = self.entries.get(key)
        return None if found is None else found[2]

    def delete(self, key: str) -> bool:
        found = self.entries.pop(key, None)
        if found is not None:
            self.num_bytes -= found[1]
        return found is not None

    def stats(self) -> dict:
        self._evict()
        return {"entries": len(self.entries), "bytes": self.num_bytes}

    def _evict(self) -> None:
        """Drops the oldest entries while over a bound or expired (entries are in the order they were stored)."""
        expired_before = self.clock() - self.ttl_s
        while self.entries:
            stored_at, size, _ = next(iter(self.entries.values()))
            if (len(self.entries) <= self.max_entries and self.num_bytes <= self.max_bytes
                    and stored_at > expired_before):
                break
            self.entries.popitem(last=False)
            self.num_bytes -= size


class StoreClient:
    """Awaitable access to a store: a ResponseStore in this process, or the app's actor, found (or created) when first
    used, so that an app whose clients never call /v1/responses starts no store."""

    def __init__(self, target: ResponseStore | Callable[[], object]) -> None:
        self.local = isinstance(target, ResponseStore)
        self._target, self._open = (target, None) if self.local else (None, target)

    async def put(self, key: str, entry: dict) -> bool:
        return self._target.put(key, entry) if self.local else await self._actor().put.remote(key, entry)

    async def get(self, key: str) -> dict | None:
        return self._target.get(key) if self.local else await self._actor().get.remote(key)

    async def delete(self, key: str) -> bool:
        return self._target.delete(key) if self.local else await self._actor().delete.remote(key)

    def _actor(self):
        if self._target is None:
            self._target = self._open()  # a lookup by name at the GCS: once per replica
        return self._target


@functools.cache
def _actor_class():
    import ray

    return ray.remote(ResponseStore)


def store_actor(app_name: str, *, max_entries: int, max_bytes: int, ttl_s: float):
    """The app's store actor, created if no replica has yet. Its limits are set to these (a store made by an earlier
    deployment of the app would keep its own otherwise)."""
    limits = dict(max_entries=max_entries, max_bytes=max_bytes, ttl_s=ttl_s)
    actor = _actor_class().options(name=store_name(app_name), namespace=STORE_NAMESPACE, lifetime="detached",
                                   get_if_exists=True, num_cpus=0, max_restarts=-1).remote(**limits)
    actor.configure.remote(**limits)
    return actor


def open_response_store(*, max_entries: int, max_bytes: int, ttl_s: float) -> StoreClient:
    """Inside a Serve replica, the app's shared store; elsewhere one in this process."""
    limits = dict(max_entries=max_entries, max_bytes=max_bytes, ttl_s=ttl_s)
    app_name = _serve_app_name()
    if app_name is None:
        return StoreClient(ResponseStore(**limits))
    return StoreClient(functools.partial(store_actor, app_name, **limits))


def _serve_app_name() -> str | None:
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - not inside a Serve replica
        return None
