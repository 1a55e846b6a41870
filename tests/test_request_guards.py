"""What the ingress answers to bad, oversized and unauthenticated requests: 4xx in OpenAI's error shape, naming the
problem, before anything reaches the engine (in-process, no Ray; the router stand-in fails if it is ever reached)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.openai_ingress import OpenAIIngress, build_fastapi_app
from tests.test_router_and_ingress import ExplodingRouter

CHAT = {"model": "gpt-oss", "messages": [{"role": "user", "content": "hi"}]}


def call(method: str, path: str, args: AppArgs | None = None, **kwargs) -> httpx.Response:
    app = build_fastapi_app(OpenAIIngress(ExplodingRouter(), args or AppArgs()))

    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(main())


def assert_error(response: httpx.Response, status: int, *, param: str | None = "any", says: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert says in error["message"], error["message"]
    if param != "any":
        assert error["param"] == param, error
    return error


def test_a_body_over_the_limit_is_a_413_from_its_length_or_its_bytes():
    args = AppArgs(max_request_bytes=4096)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 10_000}]}
    assert_error(call("POST", "/v1/chat/completions", args, json=big), 413, says="4096 bytes")

    async def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 1000

    assert_error(call("POST", "/v1/chat/completions", args, content=chunks(),
                      headers={"content-type": "application/json"}), 413)


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405),
                                                  ("DELETE", "/v1/models", 405)])
def test_unknown_paths_and_methods_answer_in_openai_shape(method, path, status):
    assert_error(call(method, path), status, says=path)


@pytest.mark.parametrize("body, says", [
    (b"\xff\xfe{", "could not be parsed"),  # not UTF-8
    (b"[" * 10_000 + b"]" * 10_000, ""),  # nested too deep (or not an object)
    (b'{"model": "gpt-oss", "messages": [}', "not valid JSON"),
])
def test_unparseable_bodies_are_400s_without_offsets(body, says):
    error = assert_error(call("POST", "/v1/chat/completions", content=body,
                              headers={"content-type": "application/json"}), 400, says=says)
    assert error["param"] is None or not error["param"].isdigit()


@pytest.mark.parametrize("extra, param", [({"max_tokens": True}, "max_tokens"), ({"n": True}, "n"),
                                          ({"seed": 1.5}, "seed"), ({"top_logprobs": 3}, "top_logprobs")])
def test_loose_values_are_refused(extra, param):
    assert_error(call("POST", "/v1/chat/completions", json={**CHAT, **extra}), 400, param=param)


@pytest.mark.parametrize("tool, says", [
    ({"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}, "parameters.type"),
    ({"type": "function", "function": {"parameters": {}}}, "function.name"),
    ({"type": "retrieval"}, "only function tools"),
    ({"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": 3}}}}, "properties"),
])
def test_malformed_tools_are_refused(tool, says):
    assert_error(call("POST", "/v1/chat/completions", json={**CHAT, "tools": [tool]}), 400, param="tools", says=says)


def test_request_limits_name_what_is_over():
    args = AppArgs(max_stop_strings=2, max_stop_length=5, max_tools=1, max_prompt_tokens=10)
    post = lambda body: call("POST", "/v1/chat/completions", args, json=body)  # noqa: E731
    assert_error(post({**CHAT, "stop": ["a", "b", "c"]}), 400, param="stop", says="limit of 2")
    assert_error(post({**CHAT, "stop": "abcdefg"}), 400, param="stop", says="5 characters")
    tool = {"type": "function", "function": {"name": "f"}}
    assert_error(post({**CHAT, "tools": [tool, tool]}), 400, param="tools", says="limit of 1")
    assert_error(post(CHAT), 400, param="messages", says="limit of 10")  # the harmony prompt is longer than 10
    long_prompt = {"model": "gpt-oss", "prompt": "one two three four five six seven eight nine ten eleven twelve"}
    assert_error(call("POST", "/v1/completions", args, json=long_prompt), 400, param="prompt")


def test_api_keys_guard_every_route_but_health(monkeypatch):
    args = AppArgs(api_keys=["k-one", "k-two"])
    assert "k-one" not in repr(args) and "k-one" not in str(args.model_dump())
    assert call("GET", "/health", args).status_code == 200
    error = assert_error(call("GET", "/v1/models", args), 401, says="missing API key")
    assert error["code"] == "invalid_api_key"
    assert_error(call("GET", "/v1/models", args, headers={"Authorization": "Bearer k-three"}), 401,
                 says="invalid API key")
    assert_error(call("GET", "/v1/models", args, headers={"Authorization": "Basic k-one"}), 401)
    assert call("GET", "/v1/models", args, headers={"Authorization": "Bearer k-two"}).status_code == 200
    # a valid key reaches the route (which here fails further on, with no internals)
    reached = call("POST", "/v1/chat/completions", args, json=CHAT, headers={"Authorization": "Bearer k-one"})
    assert reached.status_code == 503 and "k-one" not in reached.text
    monkeypatch.setenv("GPTOSS_API_KEYS", "from-env, other")
    assert call("GET", "/v1/models", AppArgs(), headers={"Authorization": "Bearer other"}).status_code == 200
    assert call("GET", "/v1/models", AppArgs()).status_code == 401


def test_no_keys_means_no_authentication(monkeypatch):
    monkeypatch.delenv("GPTOSS_API_KEYS", raising=False)
    assert call("GET", "/v1/models").status_code == 200


def test_the_openapi_document_lists_the_errors_the_app_sends():
    document = call("GET", "/openapi.json").json()
    for path, methods in document["paths"].items():
        for operation in methods.values():
            assert "422" not in operation["responses"], path  # never sent: errors are 400s in OpenAI's shape
            if path != "/health":
                assert {"400", "401", "413", "429", "503"} <= set(operation["responses"]), path
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert "text/event-stream" in document["paths"][path]["post"]["responses"]["200"]["content"]
    assert "HTTPValidationError" not in document.get("components", {}).get("schemas", {})


SCHEMA = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(200)}}  # about 5 KB


def test_what_one_request_may_carry_is_capped_naming_the_field():
    args = AppArgs(max_stop_token_ids=3, max_schema_bytes=2048)
    post = lambda body, path="/v1/chat/completions": call("POST", path, args, json=body)  # noqa: E731
    assert_error(post({**CHAT, "stop_token_ids": [1, 2, 3, 4]}), 400, param="stop_token_ids", says="limit of 3")
    assert_error(post({"model": "gpt-oss", "prompt": "hi", "stop_token_ids": list(range(200_000))}, "/v1/completions"),
                 400, param="stop_token_ids")
    assert_error(post({**CHAT, "user": "u" * 257}), 400, param="user")
    assert_error(post({**CHAT, "metadata": {f"k{i}": "v" for i in range(17)}}), 400, param="metadata", says="16")
    assert_error(post({**CHAT, "metadata": {"k": "v" * 513}}), 400, param="metadata", says="512")
    assert_error(post({**CHAT, "metadata": {"k" * 65: "v"}}), 400, param="metadata")
    assert_error(post({**CHAT, "metadata": {"k": {"nested": "object"}}}), 400, param="metadata")
    big_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    assert_error(post({**CHAT, "response_format": big_format}), 400, param="response_format", says="2048 bytes")
    described = {"type": "json_schema", "json_schema": {"name": "x", "description": "d" * 3000, "schema": {}}}
    assert_error(post({**CHAT, "response_format": described}), 400, param="response_format")
    assert_error(post({"model": "gpt-oss", "prompt": "hi", "response_format": big_format}, "/v1/completions"), 400,
                 param="response_format")
    tool = {"type": "function", "function": {"name": "f", "parameters": SCHEMA}}
    assert_error(post({**CHAT, "tools": [tool]}), 400, param="tools", says="tools.0")
    # at the caps, a request goes on (to the router stand-in, which fails: 503)
    within = {**CHAT, "stop_token_ids": [1, 2, 3], "user": "u" * 256, "metadata": {f"k{i}": "v" * 512 for i in range(16)}}
    assert post(within).status_code == 503


def test_responses_caps_name_the_field():
    args = AppArgs(max_schema_bytes=2048)
    post = lambda extra: call("POST", "/v1/responses", args, json={"model": "gpt-oss", "input": "hi", **extra})  # noqa: E731
    assert_error(post({"text": {"format": {"type": "json_schema", "name": "x", "schema": SCHEMA}}}), 400, param="text",
                 says="text.format")
    assert_error(post({"text": {"format": {"type": "json_schema", "name": "x", "schema": {}, "description": "d" * 3000}}}),
                 400, param="text")
    assert_error(post({"tools": [{"type": "function", "name": "f", "parameters": SCHEMA}]}), 400, param="tools")
    assert_error(post({"user": "u" * 257}), 400, param="user")
    assert_error(post({"metadata": {"k": "v" * 513}}), 400, param="metadata")


def test_json_size_is_about_the_json_and_stops_past_the_limit():
    import json
    import time

    from gptoss_serve.deployments.protocol import json_size

    for value in (SCHEMA, {"a": [1, 2.5, None, True, "x"], "b": {}}, "text", [], 12):
        exact = len(json.dumps(value, separators=(",", ":")))
        assert exact - 2 <= json_size(value, 1 << 20) <= exact + 2, value
    huge = {"properties": {f"p{i}": {"type": "string"} for i in range(1_000_000)}}
    start = time.perf_counter()
    assert json_size(huge, 65536) > 65536 and time.perf_counter() - start < 0.1
    deep: list = []
    for _ in range(100_000):  # far deeper than Python's recursion limit
        deep = [deep]
    assert json_size(deep, 1 << 20) == 2 * 100_001  # [[[...]]]


def test_stop_token_ids_are_looked_up_in_a_set_and_filtered_once():
    from gptoss_serve.cluster.sampler import SamplingState
    from gptoss_serve.cluster.sampling_params import SamplingParams

    state = SamplingState(SamplingParams(stop_token_ids=[5, 3, 900, 3]), [])
    assert state.stop_token_ids == (5, 3, 900, 3) and state.stop_token_set == {3, 5, 900}
    assert state.stops_below(100) == [3, 5] and state.stops_below(100) is state.stops_below(100)
    assert state.stops_below(1000) == [3, 5, 900]
