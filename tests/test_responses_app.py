"""/v1/responses on the Serve application as `serve run config.yaml` deploys it (the same builder), driven by the
official `openai` client with strict validation of every answer.

The tiny model is scripted (tests/scripted_model.py), written as a checkpoint the replicas load: a random model
answers anything, and these tests need answers to check. Two apps share the session's Ray cluster: one says a JSON
final answer (plain, streamed, json_schema; two ingress replicas sharing the response store), the other calls
get_weather (function calling over two turns). A third, given an MCP tool server of the tests' own, calls its tool
inside one response (tests/test_responses_tools.py has the rest of that, in-process)."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import httpx
import jsonschema
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from gptoss_serve.deployments.builder import build_app
from gptoss_serve.deployments.responses.store import STORE_NAMESPACE, store_name
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.harmony import render_chat
from gptoss_serve.model.tokenizer import load_tokenizer
from tests.mcp_servers import RunningServer, docs_server
from tests.responses_cases import ARGUMENTS, CALL, CITY_SCHEMA, JSON_ANSWER, JSON_FORMAT, TOOLS, check_response
from tests.scripted_model import follow_chain

MODEL = "gpt-oss"
ARGS = {"served_model_name": MODEL, "engine": {"max_model_len": 512, "num_kv_blocks": 128},
        "num_cpus_per_ingress": 0.25, "num_cpus_per_router": 0.25}
SCRIPTED = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")  # what follow_chain rewrites


def write_scripted(source, out, answer: str):
    """A copy of the checkpoint whose model answers every chat with `answer` (harmony text)."""
    shutil.copytree(source, out)
    tokenizer = load_tokenizer()
    model = load_model(str(out), dtype=torch.float32)
    follow_chain(model, [render_chat([{"role": "user", "content": "x"}])[-1],
                         *tokenizer.encode(answer, allow_special=True)])
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in {weight_map[name] for name in SCRIPTED}:
        tensors = load_file(out / shard)
        for name in SCRIPTED:
            if name in tensors:
                tensors[name] = model.get_parameter(name).detach().to(tensors[name].dtype).contiguous()
        save_file(tensors, out / shard, metadata={"format": "pt"})
    return out


def deploy(name: str, checkpoint, ray_cluster, **args) -> str:
    from ray import serve

    serve.run(build_app({**ARGS, **args, "model": str(checkpoint)}), name=name, route_prefix=f"/{name}")
    return f"{ray_cluster['http_url']}/{name}"


def undeploy(name: str) -> None:
    import ray
    from ray import serve

    serve.delete(name)
    try:  # detached: it outlives the app
        ray.kill(ray.get_actor(store_name(name), namespace=STORE_NAMESPACE))
    except ValueError:  # no request stored anything: it was never made
        pass


@pytest.fixture(scope="module")
def apps(ray_cluster, tiny_bf16, tmp_path_factory):
    folder = tmp_path_factory.mktemp("scripted")
    answers = deploy("responses", write_scripted(tiny_bf16, folder / "json", JSON_ANSWER), ray_cluster,
                     num_ingress_replicas=2)
    calls = deploy("responses-tools", write_scripted(tiny_bf16, folder / "call", CALL), ray_cluster)
    yield {"answers": answers, "calls": calls}
    undeploy("responses")
    undeploy("responses-tools")


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120,
                         _strict_response_validation=True)


def strip(body: dict) -> dict:
    """A response less what differs between two runs of it (ids, times)."""
    body = {k: v for k, v in body.items() if k not in ("id", "created_at", "completed_at")}
    body["output"] = [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in body["output"]]
    return body


def test_plain_response(apps):
    response = client(apps["answers"]).responses.create(model=MODEL, input="Where is it sunny?", temperature=0)
    assert response.status == "completed" and response.output_text == ARGUMENTS
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    prompt = render_chat([{"role": "user", "content": "Where is it sunny?"}])
    usage = response.usage
    assert usage.input_tokens == len(prompt) and usage.output_tokens == len(load_tokenizer().encode(
        JSON_ANSWER, allow_special=True)) and usage.output_tokens_details.reasoning_tokens == 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_streamed_response_is_the_plain_one_in_ordered_events(apps):
    api = client(apps["answers"])
    whole = api.responses.create(model=MODEL, input="Where?", temperature=0)
    events = list(api.responses.create(model=MODEL, input="Where?", temperature=0, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * (len(events) - 8), "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    final = events[-1].response
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final.output_text == ARGUMENTS
    assert strip(final.model_dump()) == strip(whole.model_dump())
    assert api.responses.retrieve(final.id) == final
    with api.responses.stream(model=MODEL, input="Where?", temperature=0) as stream:
        assert stream.get_final_response().output_text == ARGUMENTS


def test_json_schema_output(apps):
    """The engine decodes under the schema's grammar (text.format -> harmony_constraint); the answer parses."""
    api = client(apps["answers"])
    response = api.responses.create(model=MODEL, input="Which city?", text=JSON_FORMAT, temperature=0)
    assert response.status == "completed" and response.text.format.type == "json_schema"
    jsonschema.validate(json.loads(response.output_text), CITY_SCHEMA)
    # a schema the scripted answer does not meet: what comes out meets it all the same
    count = {"type": "object", "properties": {"count": {"type": "integer"}}, "required": ["count"],
             "additionalProperties": False}
    response = api.responses.create(model=MODEL, input="How many?", max_output_tokens=64, temperature=0, text={
        "format": {"type": "json_schema", "name": "count", "schema": count, "strict": True}})
    assert response.status == "completed", response.output
    jsonschema.validate(json.loads(response.output_text), count)


def test_function_call_then_its_output_over_previous_response_id(apps):
    api = client(apps["calls"])
    first = api.responses.create(model=MODEL, input="Weather in Paris?", tools=TOOLS,
                                 tool_choice={"type": "function", "name": "get_weather"})
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id.startswith("call_")
    second = api.responses.create(model=MODEL, previous_response_id=first.id, tools=TOOLS, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}])
    assert second.status == "completed" and second.previous_response_id == first.id
    # the prompt was the stored conversation and the new item (this scripted model then calls again)
    conversation = render_chat([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function",
                                              "function": {"name": "get_weather", "arguments": ARGUMENTS}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp": 21}'},
    ], tools=[{"type": "function", "function": {k: TOOLS[0][k] for k in ("name", "description", "parameters")}}])
    assert second.usage.input_tokens == len(conversation)
    assert [item.type for item in second.output] == ["function_call"]


def test_the_store_is_shared_by_the_ingress_replicas(apps):
    """Two ingress replicas: every request may land on either, so a chain of continuations and reads (each with even
    odds of the replica that did not store the response) only all succeed if they share one store."""
    api = client(apps["answers"])
    previous = api.responses.create(model=MODEL, input="Start", max_output_tokens=4)
    for turn in range(6):
        assert api.responses.retrieve(previous.id).id == previous.id
        previous = api.responses.create(model=MODEL, input=f"Turn {turn}", previous_response_id=previous.id,
                                        max_output_tokens=4)
        assert previous.status == "incomplete" and previous.incomplete_details.reason == "max_output_tokens"
    from ray import serve

    assert serve.status().applications["responses"].deployments["OpenAIIngress"].replica_states == {"RUNNING": 2}


class Replica:
    """Stands in for an ingress replica in a process of its own: it opens the app's store as a replica does."""

    def __init__(self, app_name: str) -> None:
        from gptoss_serve.deployments.responses.store import StoreClient, store_actor

        self.store = StoreClient(lambda: store_actor(app_name, max_entries=10, max_bytes=1 << 20, ttl_s=60))

    async def put(self, key: str, entry: dict) -> bool:
        return await self.store.put(key, entry)

    async def get(self, key: str) -> dict | None:
        return await self.store.get(key)


def test_replicas_in_other_processes_find_the_same_store(ray_cluster):
    import ray

    first, second = (ray.remote(num_cpus=0)(Replica).remote("store-check") for _ in range(2))
    assert ray.get(first.put.remote("resp_1", {"conversation": []}))
    assert ray.get(second.get.remote("resp_1")) == {"conversation": []}
    assert ray.get(second.get.remote("resp_2")) is None
    for actor in (first, second):
        ray.kill(actor)
    ray.kill(ray.get_actor(store_name("store-check"), namespace=STORE_NAMESPACE))


def test_store_false_and_unknown_ids_are_404(apps):
    api = client(apps["answers"])
    unstored = api.responses.create(model=MODEL, input="Hi", store=False)
    with pytest.raises(openai.NotFoundError):
        api.responses.create(model=MODEL, input="More", previous_response_id=unstored.id)
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(unstored.id)
    stored = api.responses.create(model=MODEL, input="Hi")
    api.responses.delete(stored.id)
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(stored.id)


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),  # the app has no browser tool server
    ({"background": True, "store": False}, "background"),  # a background response must be stored
    ({"unknown_field": 1}, "unknown_field"),
])
def test_unsupported_fields_are_400s_naming_them(apps, extra, param):
    r = httpx.post(f"{apps['answers']}/v1/responses", json={"model": MODEL, "input": "Hi", **extra}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


LOOKUP = '<|channel|>commentary to=docs.lookup <|constrain|>json<|message|>{"term":"gpt"}<|call|>'


@pytest.fixture(scope="module")
def mcp_app(ray_cluster, tiny_bf16, tmp_path_factory):
    calls = Counter()
    docs = RunningServer(docs_server(calls))
    checkpoint = write_scripted(tiny_bf16, tmp_path_factory.mktemp("scripted-mcp") / "lookup", LOOKUP)
    url = deploy("responses-mcp", checkpoint, ray_cluster, max_tool_calls=1,
                 tool_servers=[{"url": docs.url, "label": "docs", "headers": {"X-Test": "1"}}])
    yield url, calls
    undeploy("responses-mcp")
    docs.stop()


def test_an_mcp_tool_is_called_inside_a_response_of_the_serve_app(mcp_app):
    """The app args reach the ingress replica, which lists the server's tools and calls one between two engine
    requests; this scripted model calls again each round, so the calls limit (1) ends it: the second call is refused
    and the model told, the third ends the response."""
    url, calls = mcp_app
    api = client(url)
    tools = [{"type": "mcp", "server_label": "docs", "allowed_tools": ["lookup"], "require_approval": "never"}]
    response = api.responses.create(model=MODEL, input="Look it up", tools=tools)
    listing, *made = response.output
    assert listing.type == "mcp_list_tools" and [tool.name for tool in listing.tools] == ["lookup"]
    assert [(item.type, item.status) for item in made] == [("mcp_call", "completed"), ("mcp_call", "failed"),
                                                          ("mcp_call", "failed")]
    assert made[0].output == "gpt: a word in the docs." and calls["lookup"] == 1
    assert response.status == "completed" and api.responses.retrieve(response.id) == response
    events = list(api.responses.create(model=MODEL, input="Again", tools=tools, stream=True))
    assert events[-1].type == "response.completed" and calls["lookup"] == 2
    assert [e.type for e in events].count("response.mcp_call.completed") == 1
    check_response(events[-1].response.model_dump(mode="json", exclude_unset=True))
