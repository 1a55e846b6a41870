"""The BatchingRouter's batching window and the ingress's error paths, in-process (no Ray): the deployments are plain
classes, so they run here with a stand-in for the handles they are given."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from gptoss_serve.cluster.engine_protocol import RequestOutput
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.batch_streamer import BatchStreamer
from gptoss_serve.cluster.engine_protocol import EngineRequest, StreamItem
from gptoss_serve.deployments.openai_ingress import OpenAIIngress, build_fastapi_app
from gptoss_serve.deployments.batching_router import BatchingRouter


class FakeReplicas:
    """Stands in for the AttentionReplica handle: each request yields `tokens` outputs, `delay` apart."""

    def __init__(self, *, tokens: int = 3, delay: float = 0.05) -> None:
        self.tokens, self.delay = tokens, delay
        self.batches: list[list[str]] = []
        self.aborted: list[str] = []
        outer = self

        class Method:
            def __init__(self, fn):
                self.fn = fn

            def remote(self, *args, **kwargs):
                return self.fn(*args, **kwargs)

        self.streams: list[FakeStream] = []  # every call's stream, to see which were cancelled
        self.generate_batch = Method(self._stream)

        async def abort(ids, target_replica=None):
            outer.aborted += ids

        self.abort = Method(abort)

    def options(self, **kwargs):
        return self

    def _stream(self, requests: list[EngineRequest]) -> FakeStream:
        self.streams.append(FakeStream(self._generate_batch(requests)))
        return self.streams[-1]

    async def _generate_batch(self, requests: list[EngineRequest]):
        self.batches.append([r.request_id for r in requests])
        yield "replica-0"
        for n in range(1, self.tokens + 1):
            await asyncio.sleep(self.delay)
            yield [StreamItem(r.request_id, output=RequestOutput(r.request_id, [7], "x", n == self.tokens,
                                                                 "length" if n == self.tokens else None,
                                                                 num_output_tokens=n)) for r in requests]


class FakeStream:
    """What a streaming handle call returns: its items, and `cancel` to end the call downstream."""

    def __init__(self, items) -> None:
        self.items, self.cancelled = items, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.items.__anext__()

    def cancel(self) -> None:
        self.cancelled = True


def request(i: int) -> EngineRequest:
    return EngineRequest(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=3), arrival_time=time.time())


async def collect(router: BatchingRouter, req: EngineRequest) -> list[StreamItem]:
    stream = router.generate_batch([req])
    assert await stream.__anext__() == "router-0"  # the router names itself first (aborts are aimed at it)
    return [item async for items in stream for item in items]


def test_lone_request_leaves_at_once_and_busy_ones_share_a_batch():
    async def main():
        replicas = FakeReplicas(tokens=3, delay=0.05)
        router = BatchingRouter(replicas, model_name="m", max_batch_size=8, max_wait_ms=50, replica_id="router-0")
        start = time.monotonic()
        first = asyncio.create_task(collect(router, request(0)))
        await asyncio.sleep(0.01)
        assert replicas.batches == [["r0"]] and time.monotonic() - start < 0.04  # idle: no waiting window
        # replicas busy now: the next arrivals wait together for a short window
        rest = [asyncio.create_task(collect(router, request(i))) for i in range(1, 4)]
        outputs = await asyncio.gather(first, *rest)
        assert replicas.batches[1:] == [["r1", "r2", "r3"]]
        assert all(len(items) == 3 and items[-1].output.finished for items in outputs)
        assert router.replicas.in_flight == 0

    asyncio.run(main())


def test_client_leaving_aborts_on_its_replica():
    async def main():
        replicas = FakeReplicas(tokens=50, delay=0.02)
        router = BatchingRouter(replicas, model_name="m", replica_id="router-0")
        stream = router.generate_batch([request(9)])
        await stream.__anext__()  # the router's id
        await stream.__anext__()  # the first token
        await stream.aclose()
        await asyncio.sleep(0.05)
        assert replicas.aborted == ["r9"]

    asyncio.run(main())


def test_a_batch_whose_requests_are_all_aborted_closes_its_call():
    """Downstream may never send again for aborted requests (a router's call waits for their last items): the
    streamer stops listening and cancels the call, instead of leaving it open until shutdown (this once held every
    dropped client's router call open, and made each app's delete wait out the 20 s drain)."""

    class Silent(FakeReplicas):
        def __init__(self) -> None:
            super().__init__()
            self.closed: list[str] = []

        async def _generate_batch(self, requests):
            try:
                yield "replica-0"
                await asyncio.Event().wait()  # nothing more, ever
            finally:
                self.closed += [r.request_id for r in requests]

    async def main():
        replicas = Silent()
        streamer = BatchStreamer(replicas)
        sink: asyncio.Queue = asyncio.Queue()
        streamer.submit([request(1), request(2)], sink)
        while not streamer.sent or next(iter(streamer.sent.values())).replica is None:
            await asyncio.sleep(0.01)
        streamer.abort(["r1"])
        await asyncio.sleep(0.05)
        assert replicas.closed == [] and replicas.aborted == ["r1"]  # r2 still runs: the call stays open
        streamer.abort(["r2"])
        await asyncio.sleep(0.05)
        assert replicas.closed == ["r1", "r2"] and streamer.tasks == {streamer.batcher} and sink.empty()
        assert [s.cancelled for s in replicas.streams] == [True]

    asyncio.run(main())


def test_a_failing_replica_fails_its_requests_with_503():
    class Broken(FakeReplicas):
        async def _generate_batch(self, requests):
            yield "replica-0"
            raise RuntimeError("replica died")

    async def main():
        router = BatchingRouter(Broken(), model_name="m", replica_id="router-0")
        items = await collect(router, request(1))
        assert items[-1].status == 503 and "RuntimeError" in items[-1].error

    asyncio.run(main())


class ExplodingRouter:
    def options(self, **kwargs):
        return self

    class generate_batch:  # noqa: N801 - mimics handle.generate_batch.remote(...)
        @staticmethod
        def remote(requests):
            raise RuntimeError("secret internal detail\nTraceback (most recent call last): ...")


@pytest.fixture
def client():
    app = build_fastapi_app(OpenAIIngress(ExplodingRouter(), AppArgs()))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t")


def test_a_failing_router_is_a_503_without_internals(client):
    async def main():
        async with client:
            r = await client.post("/v1/completions", json={"model": "gpt-oss", "prompt": "hi"})
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "service_unavailable"
        assert "Traceback" not in r.text and "secret" not in r.text

    asyncio.run(main())


def test_malformed_json_is_a_400(client):
    async def main():
        async with client:
            r = await client.post("/v1/chat/completions", content=b"{not json",
                                  headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"

    asyncio.run(main())


def test_models_retrieve_and_an_unknown_model(client):
    """The openai client's models.retrieve reads GET /v1/models/{model}; another model is a 404 in OpenAI's shape."""
    async def main():
        async with client:
            card = (await client.get("/v1/models/gpt-oss")).json()
            listed = (await client.get("/v1/models")).json()["data"]
            other = await client.get("/v1/models/gpt-4o")
        assert card == listed[0] and card["id"] == "gpt-oss" and card["object"] == "model"
        assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"

    asyncio.run(main())


def test_batches_hold_requests_bound_for_one_replica():
    """With the prefix-aware router's table registered for the handle's deployment, the BatchingRouter forms each
    batch of requests that the table sends to one replica (those it knows nothing of form one group): five waiting
    requests, two of a conversation known on r-a, one known on r-b and two new ones, leave as three batches."""
    from gptoss_serve.deployments.prefix_table import PrefixTable, register

    def prompt(n: int) -> list[int]:
        return [n] * 40  # two full blocks of 16, and a last token

    table = PrefixTable(block_size=16)
    table.record(table.block_hashes(prompt(1)), "r-a")
    table.record(table.block_hashes(prompt(2)), "r-b")

    async def main():
        replicas = FakeReplicas(tokens=2, delay=0.05)
        replicas.app_name, replicas.deployment_name = "app-grouping", "AttentionReplica"
        register("app-grouping", "AttentionReplica", table)
        router = BatchingRouter(replicas, model_name="m", max_batch_size=8, max_wait_ms=50, replica_id="router-0")

        def call(i: int, n: int):
            req = EngineRequest(f"r{i}", prompt(n), SamplingParams(max_tokens=2), arrival_time=time.time())
            return asyncio.create_task(collect(router, req))

        first = call(0, 9)  # leaves at once, alone
        await asyncio.sleep(0.01)
        rest = [call(1, 1), call(2, 2), call(3, 1), call(4, 7), call(5, 8)]
        await asyncio.gather(first, *rest)
        assert replicas.batches == [["r0"], ["r1", "r3"], ["r2"], ["r4", "r5"]]

    asyncio.run(main())
