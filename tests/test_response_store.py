"""The response store's bounds: entries, bytes, one entry's bytes, expiry; entries held as JSON bytes, handed to GET as
they are (the shared actor is tested on Ray in test_responses_app.py)."""

from __future__ import annotations

import json

from gptoss_serve.deployments.responses.protocol import ResponsesRequest
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


def test_entries_are_kept_as_json_so_what_is_held_is_what_is_counted():
    """A response whose schema has many keys takes several times its JSON size as Python objects: the store keeps
    the JSON, so its memory follows the bytes its bound counts."""
    import gc
    import tracemalloc

    store = ResponseStore(max_entries=100, max_bytes=1 << 30, ttl_s=100)
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(50_000)}}
    entry = {"response": {"id": "r", "text": {"format": {"schema": schema}}}, "conversation": [], "input_items": []}
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    assert store.put("r", entry)
    del entry, schema
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    counted = store.stats()["bytes"]
    assert counted > 1_000_000 and held < 1.1 * counted + 10_000, (held, counted)
    assert store.get("r", ["response"])["response"]["text"]["format"]["schema"]["properties"]["p7"] == {
        "type": "string"}


def test_an_entry_over_max_entry_bytes_is_not_stored():
    store = ResponseStore(max_entries=10, max_bytes=1 << 20, ttl_s=100, max_entry_bytes=1000)
    assert store.put("small", {"text": "x" * 100})
    assert not store.put("big", {"text": "x" * 2000}) and store.get("big") is None
    assert store.stats()["entries"] == 1


def test_get_hands_over_the_stored_bytes_and_a_response_too_large_says_store_false():
    import asyncio

    import openai
    import pytest

    from gptoss_serve.deployments.args import AppArgs
    from gptoss_serve.deployments.openai_ingress import OpenAIIngress
    from tests.test_responses_api import MODEL, HarmonyReplicas, serve

    async def main():
        args = AppArgs(response_store_max_entry_bytes=8192)
        ingress = OpenAIIngress(HarmonyReplicas(), args)
        client = serve(HarmonyReplicas(), args)
        stored = await client.responses.create(model=MODEL, input="Hi")
        assert stored.store is True and (await client.responses.retrieve(stored.id)) == stored
        # the route's answer is the very bytes object the store holds: nothing encoded again per GET
        created = await ingress.responses.create(ResponsesRequest(model=MODEL, input="Hi"))
        answer = await ingress.responses.retrieve(created["id"])
        assert answer.body is ingress.responses.store._target.entries[created["id"]][2]["response"]
        assert json.loads(answer.body) == created
        # larger than response_store_max_entry_bytes: answered in full, not stored, and it says so
        big = await client.responses.create(model=MODEL, input="many words " * 2000)
        assert big.store is False and big.status == "completed"
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(big.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(model=MODEL, input="Go on", previous_response_id=big.id)
        events = [e async for e in await client.responses.create(model=MODEL, input="many words " * 2000,
                                                                   stream=True)]
        assert events[-1].type == "response.completed" and events[-1].response.store is False

    asyncio.run(main())
