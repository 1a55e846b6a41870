"""A tool call comes back parsed, streamed or not: the OpenAI ingress, in-process (no Ray), in front of a real
AttentionReplica and its engine core, whose tiny model is scripted (tests/scripted_model.py) to answer with
harmony's tokens of a get_weather call; tool_choice (none, required, a named function) holds it to what the request
allows, by constrained decoding."""

from __future__ import annotations

import asyncio
import functools
import json

import httpx
import jsonschema
import pytest
import torch

from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.attention_replica import AttentionReplica
from gptoss_serve.deployments.openai_ingress import OpenAIIngress, build_fastapi_app
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.harmony import render_chat
from gptoss_serve.model.tokenizer import load_tokenizer
from tests.scripted_model import follow_chain

ARGUMENTS = '{"city":"Paris"}'
CALL = f"<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{ARGUMENTS}<|call|>"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def build_scripted(path: str):
    """The engine core's engine: the tiny model, scripted to answer with a get_weather call."""
    tokenizer = load_tokenizer()
    model = load_model(path, dtype=torch.float32)
    prompt = render_chat(MESSAGES, tools=TOOLS)  # what the ingress renders for the request below
    follow_chain(model, [prompt[-1], *tokenizer.encode(CALL, allow_special=True)])
    return LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=128, max_model_len=512)), None


class ReplicaHandle:
    """Stands in for a DeploymentHandle: `options(...)`, `generate_batch.remote(...)`, `abort.remote(...)`
    call the real AttentionReplica in this process."""

    def __init__(self, replica: AttentionReplica) -> None:
        self.replica = replica
        self.generate_batch = _Remote(replica.generate_batch)
        self.abort = _Remote(replica.abort)

    def options(self, **kwargs):
        return self


class _Remote:
    def __init__(self, fn) -> None:
        self.remote = fn


@pytest.fixture(scope="module")
def replica(tiny_bf16):
    replica = AttentionReplica(AppArgs(), build=functools.partial(build_scripted, str(tiny_bf16)))
    yield replica
    replica.core.shutdown()


def post(replica: AttentionReplica, body: dict) -> httpx.Response:
    # the ingress talks to the replica straight (the router between them only batches and relays)
    app = build_fastapi_app(OpenAIIngress(ReplicaHandle(replica), AppArgs()))

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as client:
            return await client.post("/v1/chat/completions", json=body)

    return asyncio.run(main())


def request(**extra) -> dict:
    # temperature 1 (the default): the scripted token outweighs every other
    return {"model": "gpt-oss", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 40, **extra}


def test_a_tool_call_comes_back_parsed(replica):
    r = post(replica, request())
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    # the engine stopped on <|call|> (a default stop token) and counted it
    assert body["usage"]["completion_tokens"] == len(load_tokenizer().encode(CALL, allow_special=True))


def test_a_streamed_tool_call_comes_back_parsed(replica):
    r = post(replica, request(stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [c for e in map(json.loads, lines[:-1]) for c in e["choices"]]
    assert chunks[0]["delta"] == {"role": "assistant"}
    assert not any(c["delta"].get("content") for c in chunks)
    calls = [call for c in chunks for call in c["delta"].get("tool_calls", [])]
    # the first delta of a call names it; the rest carry argument text only
    first, rest = calls[0], calls[1:]
    assert first["index"] == 0 and first["type"] == "function" and first["id"].startswith("call_")
    assert first["function"]["name"] == "get_weather"
    assert all(c["index"] == 0 and set(c) == {"index", "function"} and set(c["function"]) == {"arguments"}
               for c in rest)
    arguments = first["function"]["arguments"] + "".join(c["function"]["arguments"] for c in rest)
    assert json.loads(arguments) == {"city": "Paris"}
    assert chunks[-1]["finish_reason"] == "tool_calls"
    assert all(c["finish_reason"] is None for c in chunks[:-1])


# ---- tool_choice: the same model, which always wants to call get_weather, held to what the request allows ----------

GET_TIME = {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"type": "string", "maxLength": 5}}}}}


def test_tool_choice_none_forbids_the_call_the_model_wants(replica):
    body = post(replica, request(tool_choice="none", max_tokens=20)).json()
    [choice] = body["choices"]
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "length"


def test_tool_choice_required_lets_the_models_own_call_through(replica):
    body = post(replica, request(tool_choice="required")).json()
    [call] = body["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_tool_choice_naming_a_function_calls_that_one(replica):
    named = {"type": "function", "function": {"name": "get_time"}}
    body = post(replica, request(tools=[*TOOLS, GET_TIME], tool_choice=named, max_tokens=60)).json()
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_time"
    jsonschema.validate(json.loads(call["function"]["arguments"]), GET_TIME["function"]["parameters"])
