"""The response store's bounds: entries, bytes, expiry (the shared actor is tested on Ray in test_responses_app.py)."""

from __future__ import annotations

from gptoss_serve.deployments.responses.store import ResponseStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_store_keeps_at_most_max_entries_oldest_out_first():
    store = ResponseStore(max_entries=3, max_bytes=1 << 20, ttl_s=100)
    for i in range(5):
        store.put(f"r{i}", {"i": i})
    assert [store.get(f"r{i}") for i in range(5)] == [None, None, {"i": 2}, {"i": 3}, {"i": 4}]
    assert store.delete("r3") and not store.delete("r3") and store.stats()["entries"] == 2


def test_store_keeps_at_most_max_bytes():
    store = ResponseStore(max_entries=100, max_bytes=100, ttl_s=100)
    store.put("a", {"text": "x" * 30})
    store.put("b", {"text": "y" * 30})
    assert store.get("a") is not None and store.stats()["bytes"] <= 100
    store.put("c", {"text": "z" * 30})  # over: the oldest goes
    assert store.get("a") is None and store.get("b") is not None and store.get("c") is not None
    assert not store.put("huge", {"text": "w" * 200}) and store.get("huge") is None


def test_store_entries_expire():
    clock = Clock()
    store = ResponseStore(max_entries=10, max_bytes=1 << 20, ttl_s=60, clock=clock)
    store.put("old", {})
    clock.now = 30
    store.put("new", {})
    clock.now = 61
    assert store.get("old") is None and store.get("new") == {}
    clock.now = 91
    assert store.get("new") is None and store.stats() == {"entries": 0, "bytes": 0}
