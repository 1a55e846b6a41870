"""Background responses (`background: true`) and POST /v1/responses/{id}/cancel, in-process with the stand-in engine of
test_responses_api.py, driven by the official `openai` client with strict validation of every answer."""

from __future__ import annotations

import asyncio
import json

import httpx2
import openai
import pytest

from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.openai_ingress import OpenAIIngress, build_fastapi_app
from gptoss_serve.deployments.responses.api import SHUT_DOWN
from gptoss_serve.deployments.responses.protocol import ResponsesRequest
from gptoss_serve.deployments.responses.store import REPLICA_GONE, ResponseStore
from tests.responses_cases import check_event, check_response
from tests.test_responses_api import MODEL, FailingReplicas, HarmonyReplicas, run

RUNNING = ("queued", "in_progress")


def serve(replicas: HarmonyReplicas, args: AppArgs | None = None) -> tuple[openai.AsyncOpenAI, OpenAIIngress]:
    """The ingress in this process (kept, to look at its slots and store) and the official client in front of it."""
    ingress = OpenAIIngress(replicas, args or AppArgs())
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=build_fastapi_app(ingress)),
                              base_url="http://ingress")
    return openai.AsyncOpenAI(base_url="http://ingress/v1", api_key="none", http_client=http, max_retries=0,
                              _strict_response_validation=True), ingress


async def poll(client, response_id: str, timeout: float = 10.0):
    """GET until the response leaves queued / in_progress, as OpenAI's guide polls."""
    async with asyncio.timeout(timeout):
        while (response := await client.responses.retrieve(response_id)).status in RUNNING:
            await asyncio.sleep(0.01)
    return response


def test_created_in_background_then_polled_to_completed():
    async def main():
        replicas = HarmonyReplicas(delay=0.005)
        client, ingress = serve(replicas)
        started = await client.responses.create(model=MODEL, input="Hi", background=True)
        assert started.status in RUNNING and started.background is True and started.output == []
        assert ingress.admission.in_flight == 1  # its slot is held while it runs, as a foreground request's
        running = await client.responses.retrieve(started.id)
        assert running.status in RUNNING
        # its input items are listed already, with the ids they keep
        [asked] = (await client.responses.input_items.list(started.id)).data
        # an unfinished response cannot be continued yet
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.create(model=MODEL, input="More", previous_response_id=started.id)
        assert e.value.body["param"] == "previous_response_id"
        done = await poll(client, started.id)
        assert done.status == "completed" and done.output_text == "Hello there!" and done.background is True
        assert done.usage.output_tokens > 0 and done.completed_at is not None
        assert ingress.admission.in_flight == 0 and replicas.aborted == []
        assert [item.id for item in (await client.responses.input_items.list(started.id)).data] == [asked.id]
        # a completed one goes on as any stored response does
        second = await client.responses.create(model=MODEL, input="More", previous_response_id=started.id)
        assert second.status == "completed"

    run(main())


def test_cancel_mid_generation_aborts_it_and_frees_its_slot():
    async def main():
        replicas = HarmonyReplicas(delay=0.05)
        client, ingress = serve(replicas, AppArgs(max_ongoing_requests=1, max_queued_requests=0))
        started = await client.responses.create(model=MODEL, input="Hi", background=True)
        with pytest.raises(openai.RateLimitError):  # its slot is the only one
            await client.responses.create(model=MODEL, input="Hi")
        with pytest.raises(openai.RateLimitError):
            await client.responses.create(model=MODEL, input="Hi", background=True)
        cancelled = await client.responses.cancel(started.id)
        assert cancelled.status == "cancelled" and cancelled.id == started.id
        # aborted all the way to the engine, and its slot given back: the next request is admitted
        assert replicas.aborted == [replicas.requests[0].request_id] and ingress.admission.in_flight == 0
        assert (await client.responses.create(model=MODEL, input="Hi")).status == "completed"
        await asyncio.sleep(0.1)
        # it stays cancelled (its task's end is refused), and cancelling again answers it unchanged
        assert (await client.responses.retrieve(started.id)).status == "cancelled"
        assert (await client.responses.cancel(started.id)) == await client.responses.retrieve(started.id)
        assert not ingress.responses.background

    run(main())


def test_cancel_of_a_finished_unknown_or_foreground_response():
    async def main():
        client, _ = serve(HarmonyReplicas())
        started = await client.responses.create(model=MODEL, input="Hi", background=True)
        done = await poll(client, started.id)
        assert done.status == "completed"
        assert (await client.responses.cancel(started.id)) == done  # as OpenAI: the finished response, unchanged
        foreground = await client.responses.create(model=MODEL, input="Hi")
        with pytest.raises(openai.BadRequestError) as e:  # only a background response can be cancelled
            await client.responses.cancel(foreground.id)
        assert "synchronous" in e.value.body["message"]
        for call in (client.responses.cancel, client.responses.retrieve):
            with pytest.raises(openai.NotFoundError) as e:
                await call("resp_unknown")
            assert set(e.value.body) == {"message", "type", "param", "code"} and e.value.body["code"] == "not_found"

    run(main())


def test_background_needs_store():
    async def main():
        client, ingress = serve(HarmonyReplicas())
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.create(model=MODEL, input="Hi", background=True, store=False)
        assert e.value.body["param"] == "background" and e.value.body["message"].startswith("background")
        assert ingress.admission.in_flight == 0

    run(main())


def test_background_stream_sends_events_and_outlives_its_client():
    async def main():
        replicas = HarmonyReplicas(delay=0.002)
        client, ingress = serve(replicas)
        events = [e async for e in await client.responses.create(model=MODEL, input="Hi", background=True,
                                                                   stream=True)]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert events[0].type == "response.created" and events[0].response.background is True
        assert events[-1].type == "response.completed" and events[-1].response.output_text == "Hello there!"
        assert (await client.responses.retrieve(events[-1].response.id)) == events[-1].response
        # a client that leaves mid-stream does not cancel it: it runs to its end, and is stored
        replicas.delay = 0.01
        sent = await ingress.responses.create(ResponsesRequest(model=MODEL, input="Hi", background=True,
                                                               stream=True))
        first = await sent.body_iterator.__anext__()
        response_id = json.loads(first.split("data: ", 1)[1].split("\n", 1)[0])["response"]["id"]
        await sent.body_iterator.aclose()  # what Starlette does when the client goes
        assert (await poll(client, response_id)).status == "completed" and replicas.aborted == []
        assert ingress.admission.in_flight == 0

    run(main())


def test_resuming_a_stream_is_refused_naming_it():
    async def main():
        client, _ = serve(HarmonyReplicas())
        started = await client.responses.create(model=MODEL, input="Hi", background=True, stream=False)
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.retrieve(started.id, stream=True, starting_after=3)
        assert e.value.body["param"] == "stream"
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.retrieve(started.id, starting_after=3)
        assert e.value.body["param"] == "starting_after"

    run(main())


def test_an_engine_failure_is_stored_as_failed():
    async def main():
        client, ingress = serve(FailingReplicas())
        started = await client.responses.create(model=MODEL, input="Hi", background=True)
        failed = await poll(client, started.id)
        assert failed.status == "failed" and failed.error.code == "server_error" and ingress.admission.in_flight == 0
        events = [e async for e in await client.responses.create(model=MODEL, input="Hi", background=True,
                                                                   stream=True)]
        assert events[-1].type == "response.failed"
        assert (await client.responses.retrieve(events[-1].response.id)).status == "failed"

    run(main())


def test_a_background_response_counts_against_the_store_bounds():
    async def main():
        client, ingress = serve(HarmonyReplicas(delay=0.005), AppArgs(response_store_max_entries=1))
        foreground = await client.responses.create(model=MODEL, input="Hi")
        started = await client.responses.create(model=MODEL, input="Hi", background=True)
        with pytest.raises(openai.NotFoundError):  # pushed out by the background one, the store holding one
            await client.responses.retrieve(foreground.id)
        assert (await poll(client, started.id)).status == "completed"
        assert ingress.responses.store._target.stats()["entries"] == 1
        # a background request too large to store is refused: it could not be polled
        client, ingress = serve(HarmonyReplicas(), AppArgs(response_store_max_entry_bytes=1024))
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.create(model=MODEL, input="x" * 2000, background=True)
        assert e.value.body["param"] == "background" and ingress.admission.in_flight == 0

    run(main())


def test_a_cancel_through_another_replica_stops_it_at_the_next_poll():
    async def main():
        replicas = HarmonyReplicas(delay=0.05)
        client, ingress = serve(replicas)
        other_client, other = serve(HarmonyReplicas())
        other.responses.store = ingress.responses.store  # two replicas of one app share the store
        started = await client.responses.create(model=MODEL, input="Hi", background=True)
        cancelled = await other_client.responses.cancel(started.id)
        assert cancelled.status == "cancelled"
        async with asyncio.timeout(5):
            while ingress.responses.background:
                await asyncio.sleep(0.01)
        assert replicas.aborted == [replicas.requests[0].request_id] and ingress.admission.in_flight == 0
        assert (await client.responses.retrieve(started.id)).status == "cancelled"

    run(main())


def test_shutdown_fails_what_runs():
    async def main():
        replicas = HarmonyReplicas(delay=0.05)
        client, ingress = serve(replicas)
        started = await client.responses.create(model=MODEL, input="Hi", background=True)
        await ingress.responses.shutdown()
        failed = await client.responses.retrieve(started.id)
        assert failed.status == "failed" and failed.error.message == SHUT_DOWN["message"]
        assert replicas.aborted == [replicas.requests[0].request_id] and ingress.admission.in_flight == 0

    run(main())


def test_a_lapsed_lease_fails_a_response_whose_replica_died():
    now = [0.0]
    store = ResponseStore(max_entries=10, max_bytes=1 << 20, ttl_s=1e9, clock=lambda: now[0], lease_s=30)
    store.put("r", {"response": {"id": "r", "status": "in_progress", "background": True}, "input_items": []},
              running=True)
    now[0] = 20
    assert store.poll(["r"]) == [] and store.get("r")["response"]["status"] == "in_progress"  # renewed
    now[0] = 45
    assert store.get("r")["response"]["status"] == "in_progress"
    now[0] = 51  # 31 s since its replica's last poll
    assert store.get("r")["response"] | {"error": REPLICA_GONE} == {
        "id": "r", "status": "failed", "background": True, "error": REPLICA_GONE}
    assert store.poll(["r"]) == ["r"]  # a replica still running it (it was only slow) is told to stop
    assert store.update("r", {"response": {"id": "r", "status": "completed"}}) == "stopped"
    assert store.get("r")["response"]["status"] == "failed"
    # a cancel marks it at once; the end that comes after is refused; a deleted one's end is dropped
    store.put("c", {"response": {"id": "c", "status": "in_progress", "background": True}}, running=True)
    assert json.loads(store.cancel("c"))["status"] == "cancelled" and store.poll(["c"]) == ["c"]
    assert store.update("c", {"response": {"id": "c", "status": "completed"}}) == "stopped"
    assert json.loads(store.cancel("c"))["status"] == "cancelled" and store.cancel("x") is None
    store.put("d", {"response": {"id": "d"}}, running=True)
    store.delete("d")
    assert store.update("d", {"response": {"id": "d"}}) == "gone" and not store.running and not store.stopped


def test_strict_shapes_of_what_a_background_response_sends():
    async def main():
        client, ingress = serve(HarmonyReplicas())
        sent = await ingress.responses.create(ResponsesRequest(model=MODEL, input="Hi", background=True))
        check_response(sent)
        chunks = "".join([c async for c in (await ingress.responses.create(ResponsesRequest(
            model=MODEL, input="Hi", background=True, stream=True))).body_iterator])
        for line in chunks.splitlines():
            if line.startswith("data: "):
                check_event(json.loads(line[len("data: "):]))
        await poll(client, sent["id"])

    run(main())
