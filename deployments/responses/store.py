"""ResponseStore: stored responses, for `previous_response_id` and GET /v1/responses/{id}.

In a Serve app the store is one named, detached Ray actor per app, shared by every ingress replica: the first replica
to use it creates it, the others find it by name, so a conversation goes on whichever replica its next request
reaches, and outlives a redeploy of the ingress. Outside Serve (tests that build the ingress in-process) it is an
object in the process.

Bounded: at most `max_entries` responses and `max_bytes` of them, each kept for at most `ttl_s`; the oldest go first.
A response larger than `max_entry_bytes` is not stored at all (the response then says `store: false`). An entry holds
the response (for GET) and its whole conversation (the input items of every turn and the output items), so that
continuing it never depends on an older entry that may be gone. The actor restarts after a crash, empty: its
responses are then unknown (404), never wrong.

An entry is kept serialized, each part (`response`, `conversation`, `input_items`) as compact UTF-8 JSON, so the
bytes the bounds count are the bytes the store holds (Python objects of the same JSON take several times more), and
GET hands the stored `response` bytes to the HTTP response as they are: the ingress encodes a response once, when it
stores it, and decodes only the part a request needs.

Background responses (api.py) are stored when they start, `in_progress` (their response and input items, no
conversation yet), and replaced by their end. The store is where a running one's fate is decided, so that every
replica agrees: `cancel` marks it `cancelled` at once (whichever replica is asked), and its end is then refused;
the replica running it learns of the cancel at its next `poll` (one call for all its running responses), which also
renews their lease: one whose replica stopped polling for `lease_s` (it died) is marked `failed` when next read.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from gptoss_serve.deployments.protocol import APIError

logger = logging.getLogger("ray.serve")
STORE_NAMESPACE = "gptoss_serve"
# the actor's name carries its format: a store made by an earlier version (Python objects, no get_raw) is not reused
STORE_FORMAT = "v3"  # v3: background responses (update, cancel, poll)

Parts = dict[str, bytes]  # an entry as stored: each part's compact JSON
# a replica polls every ~0.1 s while it runs background responses: silent this long, it is taken for dead
LEASE_S = 30.0
REPLICA_GONE = {"code": "server_error", "message": "the server replica running this background response stopped "
                                                   "before it ended"}


def store_name(app_name: str) -> str:
    return f"response_store.{STORE_FORMAT}:{app_name}"


def encode_entry(entry: dict[str, Any]) -> Parts:
    """Each part of an entry as compact UTF-8 JSON (a part given as bytes is taken as that already)."""
    return {name: value if isinstance(value, bytes) else
            json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode() for name, value in entry.items()}


def entry_size(parts: Parts) -> int:
    return sum(len(name) + len(raw) for name, raw in parts.items())


def decode_parts(parts: Parts) -> dict[str, Any]:
    return {name: json.loads(raw) for name, raw in parts.items()}


class ResponseStore:
    def __init__(self, *, max_entries: int, max_bytes: int, ttl_s: float, max_entry_bytes: int | None = None,
                 clock: Callable[[], float] = time.monotonic, lease_s: float = LEASE_S) -> None:
        self.clock, self.lease_s = clock, lease_s
        self.entries: OrderedDict[str, tuple[float, int, Parts]] = OrderedDict()  # id -> (stored at, bytes, parts)
        self.num_bytes = 0
        self.running: dict[str, float] = {}  # background responses still generating -> their replica's last poll
        self.stopped: set[str] = set()  # running ones cancelled (or given up) here, whose replica has not ended them
        self.configure(max_entries=max_entries, max_bytes=max_bytes, ttl_s=ttl_s, max_entry_bytes=max_entry_bytes)

    def configure(self, *, max_entries: int, max_bytes: int, ttl_s: float, max_entry_bytes: int | None = None) -> None:
        self.max_entries, self.max_bytes, self.ttl_s = max_entries, max_bytes, ttl_s
        self.max_entry_bytes = max_bytes if max_entry_bytes is None else min(max_entry_bytes, max_bytes)
        self._evict()

    def put(self, key: str, entry: dict[str, Any], running: bool = False) -> bool:
        """Stores (or replaces) an entry, given as its parts (JSON values, or their JSON as bytes); False when it is
        larger than max_entry_bytes (it is not stored, and an entry stored before under the key is gone).
        running: a background response starting (its lease starts now)."""
        parts = encode_entry(entry)
        size = entry_size(parts)
        self.delete(key)
        if size > self.max_entry_bytes:
            return False
        self.entries[key] = (self.clock(), size, parts)
        self.num_bytes += size
        if running:
            self.running[key] = self.clock()
        self._evict()
        return True

    def update(self, key: str, entry: dict[str, Any]) -> str:
        """A background response's end, replacing its running entry -> "stored"; or refused: "stopped" (it was
        cancelled, or its lease lapsed), "gone" (deleted, evicted, or the store restarted), "too_large" (past
        max_entry_bytes: the running entry stays, for a smaller end)."""
        self._expire(key)
        if key not in self.running:
            outcome = "stopped" if key in self.stopped else "gone"
            self.stopped.discard(key)  # its replica knows now
            return outcome
        parts = encode_entry(entry)
        if entry_size(parts) > self.max_entry_bytes:
            return "too_large"
        self.put(key, parts)
        return "stored"

    def cancel(self, key: str) -> bytes | None:
        """The stored response after a cancel (None: no such entry): a running background response says
        `cancelled` from now on, and its replica is told at its next poll; any other is returned unchanged."""
        self._evict()
        self._expire(key)
        if key not in self.entries:
            return None
        if key in self.running:
            self._stop(key, status="cancelled")
        return self.entries[key][2]["response"]

    def poll(self, keys: Iterable[str]) -> list[str]:
        """A replica's running background responses: renews their leases -> those it must stop (cancelled, or
        given up for a lapsed lease)."""
        now, stop = self.clock(), []
        for key in keys:
            self._expire(key)
            if key in self.running:
                self.running[key] = now
            elif key in self.stopped:
                stop.append(key)
        return stop

    def get_raw(self, key: str, parts: Iterable[str] | None = None) -> Parts | None:
        """The entry's parts (all, or those named that it has) as stored: JSON bytes."""
        self._evict()
        self._expire(key)
        found = self.entries.get(key)
        if found is None:
            return None
        return dict(found[2]) if parts is None else {name: found[2][name] for name in parts if name in found[2]}

    def get(self, key: str, parts: Iterable[str] | None = None) -> dict | None:
        raw = self.get_raw(key, parts)
        return None if raw is None else decode_parts(raw)

    def delete(self, key: str) -> bool:
        found = self.entries.pop(key, None)
        if found is not None:
            self.num_bytes -= found[1]
        self._forget(key)
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
            key, _ = self.entries.popitem(last=False)
            self.num_bytes -= size
            self._forget(key)

    def _forget(self, key: str) -> None:
        """A running entry that is gone: its end will be refused as "gone"."""
        self.running.pop(key, None)
        self.stopped.discard(key)

    def _expire(self, key: str) -> None:
        """A running response whose replica stopped polling (it died) is failed, not left in progress for ever."""
        if key in self.running and self.clock() - self.running[key] > self.lease_s:
            self._stop(key, status="failed", error=REPLICA_GONE)

    def _stop(self, key: str, **fields) -> None:
        """Ends a running response here (its stored response rewritten with `fields`); its replica is told at its
        next poll, and its own end is refused."""
        stored_at, size, parts = self.entries[key]
        parts = {**parts, **encode_entry({"response": json.loads(parts["response"]) | fields})}
        self.entries[key] = (stored_at, entry_size(parts), parts)  # in place: its age and order stay
        self.num_bytes += entry_size(parts) - size
        del self.running[key]
        self.stopped.add(key)


class StoreClient:
    """Awaitable access to a store: a ResponseStore in this process, or the app's actor, found (or created) when first
    used, so that an app whose clients never call /v1/responses starts no store. Entries are encoded and decoded here,
    in the ingress: the actor only keeps bytes, and what crosses to it and back is bytes."""

    def __init__(self, target: ResponseStore | Callable[[], object], *, max_entry_bytes: int | None = None) -> None:
        self.local = isinstance(target, ResponseStore)
        self._target, self._open = (target, None) if self.local else (None, target)
        self.max_entry_bytes = max_entry_bytes

    async def put(self, key: str, entry: dict[str, Any], running: bool = False) -> bool:
        """False when the entry is too large to store (checked here too: it is not sent to the actor for nothing)."""
        parts = encode_entry(entry)
        if self.max_entry_bytes is not None and entry_size(parts) > self.max_entry_bytes:
            await self.delete(key)
            return False
        return await self._call("put", key, parts, running)

    async def update(self, key: str, entry: dict[str, Any]) -> str:
        return await self._call("update", key, encode_entry(entry))

    async def cancel(self, key: str) -> bytes | None:
        return await self._call("cancel", key)

    async def poll(self, keys: list[str]) -> list[str]:
        return await self._call("poll", keys)

    async def _call(self, method: str, *args):
        """The store's method, here or on its actor."""
        if self.local:
            return getattr(self._target, method)(*args)
        return await getattr(self._actor(), method).remote(*args)

    async def get_raw(self, key: str, parts: Iterable[str] | None = None) -> Parts | None:
        parts = None if parts is None else list(parts)
        return self._target.get_raw(key, parts) if self.local else await self._actor().get_raw.remote(key, parts)

    async def get(self, key: str, parts: Iterable[str] | None = None) -> dict | None:
        """The entry's parts (all, or those named), decoded; None when there is no such entry."""
        raw = await self.get_raw(key, parts)
        return None if raw is None else decode_parts(raw)

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


def store_actor(app_name: str, *, max_entries: int, max_bytes: int, ttl_s: float, max_entry_bytes: int | None = None):
    """The app's store actor, created if no replica has yet. Its limits are set to these (a store made by an earlier
    deployment of the app would keep its own otherwise)."""
    limits = dict(max_entries=max_entries, max_bytes=max_bytes, ttl_s=ttl_s, max_entry_bytes=max_entry_bytes)
    actor = _actor_class().options(name=store_name(app_name), namespace=STORE_NAMESPACE, lifetime="detached",
                                   get_if_exists=True, num_cpus=0, max_restarts=-1).remote(**limits)
    actor.configure.remote(**limits)
    return actor


def open_response_store(*, max_entries: int, max_bytes: int, ttl_s: float,
                        max_entry_bytes: int | None = None) -> StoreClient:
    """Inside a Serve replica, the app's shared store; elsewhere one in this process."""
    limits = dict(max_entries=max_entries, max_bytes=max_bytes, ttl_s=ttl_s, max_entry_bytes=max_entry_bytes)
    app_name = _serve_app_name()
    if app_name is None:
        return StoreClient(ResponseStore(**limits), max_entry_bytes=max_entry_bytes)
    return StoreClient(functools.partial(store_actor, app_name, **limits), max_entry_bytes=max_entry_bytes)


def _serve_app_name() -> str | None:
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - not inside a Serve replica
        return None


def store_unavailable(e: Exception) -> APIError:
    """What a route answers when the store's actor failed (logged): a 503 to retry."""
    logger.warning("response store failed: %s: %s", type(e).__name__, e)
    return APIError(503, "the response store is unavailable; retry shortly")
