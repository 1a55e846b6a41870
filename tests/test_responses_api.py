"""POST /v1/responses without Ray: the whole route in-process, driven by the official `openai` client (strict
response validation on) in front of a stand-in engine that answers with harmony tokens the test chooses."""

from __future__ import annotations

import asyncio
import json

import httpx2
import openai
import pytest

from gptoss_serve.cluster.engine_protocol import RequestOutput
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.cluster.engine_protocol import StreamItem
from gptoss_serve.deployments.openai_ingress import OpenAIIngress, build_fastapi_app
from gptoss_serve.deployments.protocol import APIError
from gptoss_serve.deployments.responses.protocol import ResponsesRequest
from gptoss_serve.model.harmony import render_chat
from gptoss_serve.model.tokenizer import load_tokenizer
from tests.responses_cases import ANSWER, ARGUMENTS, CALL, JSON_ANSWER, JSON_FORMAT, TOOLS, check_event

MODEL = "gpt-oss"
tokenizer = load_tokenizer()


def ids(text: str) -> list[int]:
    return tokenizer.encode(text, allow_special=True)


class HarmonyReplicas:
    """Stands in for the AttentionReplica handle: each request is answered with the tokens of `answer(prompt)`, one
    token a step, cut at its max_tokens; the requests and aborts are recorded."""

    def __init__(self, answer=lambda prompt: ANSWER, *, delay: float = 0.0) -> None:
        self.answer, self.delay = answer, delay
        self.requests: list = []
        self.aborted: list[str] = []
        self.generate_batch = _Method(self._generate_batch)
        self.abort = _Method(self._abort)

    def options(self, **kwargs):
        return self

    async def _abort(self, request_ids, target_replica=None):
        self.aborted += request_ids

    async def _generate_batch(self, requests):
        self.requests += requests
        yield "replica-0"
        answers = {r.request_id: ids(self.answer(tokenizer.decode(r.prompt_token_ids))) for r in requests}
        for r in requests:
            if r.params.max_tokens is not None:
                answers[r.request_id] = answers[r.request_id][:r.params.max_tokens]
        for n in range(1, max(map(len, answers.values())) + 1):
            await asyncio.sleep(self.delay)
            items = []
            for r in requests:
                tokens = answers[r.request_id]
                if n <= len(tokens):
                    last = n == len(tokens)
                    reason = None if not last else "length" if n == r.params.max_tokens else "stop"
                    items.append(StreamItem(r.request_id, output=RequestOutput(
                        r.request_id, [tokens[n - 1]], None, last, reason, num_prompt_tokens=len(r.prompt_token_ids),
                        num_output_tokens=n)))
            yield items


class _Method:
    def __init__(self, fn) -> None:
        self.remote = fn


def serve(replicas: HarmonyReplicas, args: AppArgs | None = None):
    """The ingress app in this process, and the official client in front of it (strict validation of every answer)."""
    app = build_fastapi_app(OpenAIIngress(replicas, args or AppArgs()))
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://ingress")
    return openai.AsyncOpenAI(base_url="http://ingress/v1", api_key="none", http_client=http, max_retries=0,
                              _strict_response_validation=True)


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_response_in_openai_shape():
    async def main():
        replicas = HarmonyReplicas()
        client = serve(replicas)
        response = await client.responses.create(model=MODEL, input="Hi", instructions="Be kind.", temperature=0.5,
                                                 metadata={"k": "v"}, reasoning={"effort": "low"})
        assert response.output_text == "Hello there!" and response.status == "completed"
        assert [item.type for item in response.output] == ["reasoning", "message"]
        assert response.output[0].content[0].text == "User greets."
        assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL
        assert response.instructions == "Be kind." and response.temperature == 0.5 and response.top_p == 1.0
        assert response.metadata == {"k": "v"} and response.reasoning.effort == "low"
        assert response.tool_choice == "auto" and response.tools == [] and response.parallel_tool_calls
        [request] = replicas.requests
        assert response.usage.input_tokens == len(request.prompt_token_ids)
        assert response.usage.output_tokens == len(ids(ANSWER))
        assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
        assert 0 < response.usage.output_tokens_details.reasoning_tokens < response.usage.output_tokens
        # rendered as chat renders it
        assert request.prompt_token_ids == render_chat([{"role": "developer", "content": "Be kind."},
                                                        {"role": "user", "content": "Hi"}], reasoning_effort="low")
        assert request.params.temperature == 0.5 and request.params.structured_output is None
        # stored by default: GET gives it back
        assert (await client.responses.retrieve(response.id)) == response

    run(main())


def test_streamed_events_in_order_and_the_same_response():
    async def main():
        client = serve(HarmonyReplicas())
        whole = await client.responses.create(model=MODEL, input="Hi")
        events = [event async for event in await client.responses.create(model=MODEL, input="Hi", stream=True)]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
        assert events[0].response.status == "in_progress" and events[0].response.output == []
        assert events[-1].type == "response.completed"
        final = events[-1].response
        # the same items as the whole response (ids and times aside), and the deltas add up to them
        assert strip(final.model_dump()) == strip(whole.model_dump())
        texts = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert texts == final.output_text == "Hello there!"
        done = [e.item for e in events if e.type == "response.output_item.done"]
        assert done == final.output
        # the client's stream helper accumulates the same response
        async with client.responses.stream(model=MODEL, input="Hi") as stream:
            helped = await stream.get_final_response()
        # (its items are its own Parsed* types: compared by what they say)
        assert helped.output_text == whole.output_text and helped.usage == whole.usage
        assert [item.type for item in helped.output] == [item.type for item in whole.output]
        # and the streamed response was stored as it was sent
        assert (await client.responses.retrieve(final.id)) == final

    run(main())


def strip(body: dict) -> dict:
    """A response less what differs between two runs (ids, times, call ids)."""
    body = {k: v for k, v in body.items() if k not in ("id", "created_at", "completed_at")}
    body["output"] = [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in body["output"]]
    return body


def weather_replicas() -> HarmonyReplicas:
    """A model that calls get_weather, and answers once the call's output is in its prompt."""
    return HarmonyReplicas(lambda prompt: ANSWER if "functions.get_weather<|channel|>" in prompt else CALL)


async def weather_call(client):
    """A first turn that asks for the weather: -> (the response, its one function call)."""
    first = await client.responses.create(model=MODEL, input="Weather in Paris?", tools=TOOLS)
    [call] = first.output
    return first, call


def test_function_call_then_its_output_over_previous_response_id():
    async def main():
        replicas = weather_replicas()
        client = serve(replicas)
        first, call = await weather_call(client)
        assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {
            "city": "Paris"}
        assert first.tools[0].name == "get_weather" and first.output_text == ""
        second = await client.responses.create(model=MODEL, previous_response_id=first.id, tools=TOOLS, input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}])
        assert second.output_text == "Hello there!" and second.previous_response_id == first.id
        # the second prompt is the whole conversation, as chat would render it
        expected = render_chat([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function", "function": {
                "name": "get_weather", "arguments": ARGUMENTS}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp": 21}'},
        ], tools=[{"type": "function", "function": {k: TOOLS[0][k] for k in ("name", "description", "parameters")}}])
        assert replicas.requests[-1].prompt_token_ids == expected
        # a third turn goes on from the second
        await client.responses.create(model=MODEL, previous_response_id=second.id, input="And tomorrow?")
        assert tokenizer.decode(replicas.requests[-1].prompt_token_ids).count('{"temp": 21}') == 1

    run(main())


def test_input_items_list_a_responses_own_input():
    async def main():
        replicas = weather_replicas()
        client = serve(replicas)
        first, call = await weather_call(client)
        second = await client.responses.create(model=MODEL, previous_response_id=first.id, tools=TOOLS, input=[
            {"role": "user", "content": "In Celsius, please."},
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}])
        [asked] = (await client.responses.input_items.list(first.id)).data
        assert asked.type == "message" and asked.role == "user" and asked.content[0].text == "Weather in Paris?"
        # only the second response's own input, not the turn it continued; newest first unless asked otherwise
        page = await client.responses.input_items.list(second.id, order="asc")
        assert [item.type for item in page.data] == ["message", "function_call_output"]
        assert page.data[1].call_id == call.call_id and page.data[1].output == '{"temp": 21}'
        newest_first = [item.id async for item in client.responses.input_items.list(second.id, limit=1)]
        assert newest_first == [item.id for item in reversed(page.data)] and len(set(newest_first)) == 2
        with pytest.raises(openai.NotFoundError):
            await client.responses.input_items.list("resp_unknown")
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.input_items.list(second.id, after="msg_unknown")
        assert e.value.body["param"] == "after"

    run(main())


def test_store_false_is_not_kept_and_delete_forgets():
    async def main():
        client = serve(HarmonyReplicas())
        unstored = await client.responses.create(model=MODEL, input="Hi", store=False)
        assert unstored.store is False
        with pytest.raises(openai.NotFoundError) as e:
            await client.responses.create(model=MODEL, input="Go on", previous_response_id=unstored.id)
        assert e.value.body["param"] == "previous_response_id"
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(unstored.id)
        stored = await client.responses.create(model=MODEL, input="Hi")
        await client.responses.delete(stored.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(stored.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.delete(stored.id)

    run(main())


def test_max_output_tokens_makes_an_incomplete_response():
    async def main():
        client = serve(HarmonyReplicas())
        response = await client.responses.create(model=MODEL, input="Hi", max_output_tokens=12)
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
        assert response.usage.output_tokens == 12 and response.output[-1].status == "incomplete"
        events = [e async for e in await client.responses.create(model=MODEL, input="Hi", max_output_tokens=12,
                                                                   stream=True)]
        assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"

    run(main())


def test_text_format_and_tool_choice_reach_the_engine_as_a_grammar():
    async def main():
        replicas = HarmonyReplicas(lambda prompt: JSON_ANSWER)
        client = serve(replicas)
        response = await client.responses.create(model=MODEL, input="Where?", text=JSON_FORMAT)
        assert json.loads(response.output_text) == {"city": "Paris"}
        assert response.text.format.type == "json_schema" and response.text.format.name == "city"
        grammar = replicas.requests[-1].params.structured_output
        assert grammar is not None and "city" in grammar.description
        await client.responses.create(model=MODEL, input="Weather?", tools=TOOLS,
                                      tool_choice={"type": "function", "name": "get_weather"})
        grammar = replicas.requests[-1].params.structured_output
        assert grammar is not None and "functions.get_weather" in grammar.grammar
        await client.responses.create(model=MODEL, input="Weather?", tools=TOOLS)  # auto: free
        assert replicas.requests[-1].params.structured_output is None

    run(main())


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),  # no browser tool server is configured
    ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools[0].type"),
    ({"tools": [{"type": "file_search", "vector_store_ids": []}]}, "tools"),
    ({"background": True, "store": False}, "background"),  # a background response must be stored
    ({"conversation": "conv_1"}, "conversation"),
    ({"truncation": "auto"}, "truncation"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"reasoning": {"effort": "minimal"}}, "reasoning"),
    ({"tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"temperature": -1}, "temperature"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 7}}}}, "text"),
    ({"input": [{"type": "function_call_output", "call_id": "c1", "output": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x"}]}]}, "input"),
    ({"model": "other"}, "model"),
])
def test_unsupported_or_invalid_fields_are_named(extra, param):
    async def main():
        client = serve(HarmonyReplicas())
        with pytest.raises(openai.APIStatusError) as e:
            await client.responses.create(**{"model": MODEL, "input": "Hi", **extra})
        assert e.value.status_code == (404 if param == "model" else 400)
        error = e.value.body
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
        assert param == "model" or error["message"].startswith(param), error

    run(main())


class FailingReplicas(HarmonyReplicas):
    """Answers a few tokens, then the request fails (a replica or expert worker gone)."""

    async def _generate_batch(self, requests):
        stream = super()._generate_batch(requests)
        for _ in range(4):
            yield await stream.__anext__()
        yield [StreamItem(r.request_id, error="the serving replica failed", status=503) for r in requests]


def test_an_engine_failure_fails_the_response():
    async def main():
        client = serve(FailingReplicas())
        with pytest.raises(openai.InternalServerError) as e:
            await client.responses.create(model=MODEL, input="Hi")
        assert e.value.status_code == 503
        ingress = OpenAIIngress(FailingReplicas(), AppArgs())
        sent = await ingress.responses.create(ResponsesRequest(model=MODEL, input="Hi", stream=True))
        chunks = "".join([chunk async for chunk in sent.body_iterator])
        events = [json.loads(line[len("data: "):]) for line in chunks.splitlines() if line.startswith("data: ")]
        for event in events:
            check_event(event)
        failed = events[-1]
        assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
        assert failed["response"]["error"]["code"] == "server_error" and ingress.admission.in_flight == 0
        assert (await ingress.responses.store.get(failed["response"]["id"])) is None

    run(main())


def test_a_client_that_leaves_aborts_its_request():
    async def main():
        replicas = HarmonyReplicas(delay=0.01)
        ingress = OpenAIIngress(replicas, AppArgs())
        sent = await ingress.responses.create(ResponsesRequest(model=MODEL, input="Hi", stream=True))
        events = sent.body_iterator
        assert "response.created" in await events.__anext__()
        await events.__anext__()
        await events.aclose()  # what Starlette does when the client goes
        await asyncio.sleep(0.05)
        assert replicas.aborted == [replicas.requests[0].request_id] and ingress.admission.in_flight == 0

    run(main())


def test_requests_past_capacity_get_429():
    async def main():
        ingress = OpenAIIngress(HarmonyReplicas(delay=0.01), AppArgs(max_ongoing_requests=1, max_queued_requests=0))
        streaming = await ingress.responses.create(ResponsesRequest(model=MODEL, input="Hi", stream=True))
        with pytest.raises(APIError) as e:
            await ingress.responses.create(ResponsesRequest(model=MODEL, input="Hi"))
        assert e.value.status == 429 and e.value.retry_after
        assert "response.completed" in "".join([chunk async for chunk in streaming.body_iterator])
        assert (await ingress.responses.create(ResponsesRequest(model=MODEL, input="Hi")))["status"] == "completed"

    run(main())
