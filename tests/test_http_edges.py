"""Small HTTP edges of the ingress: a body that is not a JSON object, HEAD on the GET routes, and min_tokens beyond
what can be generated (over max_tokens, or past the model's context: the engine refuses it, and the ingress names
min_tokens). In-process, no Ray: stand-ins for the router handle."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.engine_protocol import StreamItem
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.openai_ingress import OpenAIIngress, build_fastapi_app
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer
from tests.test_request_guards import assert_error, call
from tests.test_responses_api import HarmonyReplicas

CHAT = {"model": "gpt-oss", "messages": [{"role": "user", "content": "hi"}]}
POSTS = ["/v1/chat/completions", "/v1/completions", "/v1/responses"]


@pytest.mark.parametrize("path", POSTS)
@pytest.mark.parametrize("body, content_type", [(b"", "application/json"), (b"null", "application/json"),
                                                (b"[]", "application/json"), (b'"hi"', "application/json"),
                                                (b"3", "application/json"), (b"", None),
                                                (b'{"model": "gpt-oss"}', "text/plain")])
def test_a_body_that_is_not_a_json_object_is_a_400_about_the_body(path, body, content_type):
    headers = {"content-type": content_type} if content_type else {}
    error = assert_error(call("POST", path, content=body, headers=headers), 400,
                         says="the request body must be a JSON object")
    assert error["param"] is None


def test_checks_across_fields_still_name_their_field():
    assert_error(call("POST", "/v1/chat/completions", json={**CHAT, "top_logprobs": 2}), 400, param="top_logprobs")
    assert_error(call("POST", "/v1/chat/completions", json={"model": "gpt-oss"}), 400, param="messages")


async def asgi(app, method: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """The raw ASGI exchange (httpx drops a HEAD answer's body itself, so it cannot show that none was sent)."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    path, _, query = path.partition("?")
    await app({"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
               "raw_path": path.encode(), "query_string": query.encode(), "root_path": "", "scheme": "http",
               "server": ("t", 80), "client": ("c", 1),
               "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def test_head_answers_every_get_route_as_get_without_a_body():
    async def main():
        replicas = HarmonyReplicas()
        app = build_fastapi_app(OpenAIIngress(replicas, AppArgs()))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            created = (await client.post("/v1/responses", json={"model": "gpt-oss", "input": "Hi"})).json()
        paths = ["/health", "/v1/models", "/v1/models/gpt-oss", "/v1/models/other", f"/v1/responses/{created['id']}",
                 f"/v1/responses/{created['id']}/input_items", "/v1/responses/resp_unknown"]
        for path in paths:
            got, got_headers, got_body = await asgi(app, "GET", path)
            head, head_headers, head_body = await asgi(app, "HEAD", path)
            assert (head, head_body) == (got, b""), path
            assert head_headers["content-type"] == got_headers["content-type"], path
            assert head_headers["content-length"] == str(len(got_body)), path
        assert (await asgi(app, "HEAD", "/v1/models/other"))[0] == 404
        # POST routes and unknown paths stay what they were
        status, _, body = await asgi(app, "HEAD", "/v1/chat/completions")
        assert (status, body) == (405, b"")
        assert (await asgi(app, "HEAD", "/v1/nothing"))[0] == 404

    asyncio.run(main())


def test_head_needs_a_key_as_get_does():
    async def main():
        app = build_fastapi_app(OpenAIIngress(HarmonyReplicas(), AppArgs(api_keys=["k1"])))
        assert (await asgi(app, "HEAD", "/v1/models"))[:3:2] == (401, b"")
        assert (await asgi(app, "HEAD", "/v1/models", {"Authorization": "Bearer k1"}))[0] == 200
        assert (await asgi(app, "HEAD", "/health"))[0] == 200

    asyncio.run(main())


def test_head_routes_stay_out_of_the_openapi_document():
    document = call("GET", "/openapi.json").json()
    assert all("head" not in methods for methods in document["paths"].values())
    assert "get" in document["paths"]["/v1/models"]


@pytest.mark.parametrize("body", [{**CHAT, "max_tokens": 3, "min_tokens": 5},
                                  {**CHAT, "max_completion_tokens": 3, "min_tokens": 5}])
def test_min_tokens_over_max_tokens_is_a_400_naming_min_tokens(body):
    assert_error(call("POST", "/v1/chat/completions", json=body), 400, param="min_tokens", says="min_tokens")
    completion = {"model": "gpt-oss", "prompt": "hi", "min_tokens": 17}  # max_tokens defaults to 16
    assert_error(call("POST", "/v1/completions", json=completion), 400, param="min_tokens", says="max_tokens (16)")


@pytest.fixture(scope="module")
def engine(tiny_bf16):
    return LLMEngine(load_model(tiny_bf16, dtype=torch.float32), load_tokenizer(),
                     EngineConfig(num_kv_blocks=16, max_model_len=64, async_scheduling=False))


def test_the_engine_refuses_min_tokens_past_the_context(engine):
    with pytest.raises(ValueError, match=r"^min_tokens is 60, but the prompt has 10 tokens .* at most 54"):
        engine.add_request("long", list(range(10)), SamplingParams(max_tokens=None, min_tokens=60))
    engine.add_request("fits", list(range(10)), SamplingParams(max_tokens=None, min_tokens=54))
    assert engine.abort("fits")


class EngineReplicas:
    """Stands in for the router handle: each request goes to a real engine's add_request, and what it refuses
    comes back as the attention replica sends it (the engine core's Rejected: a 400 carrying the message)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.generate_batch = type("M", (), {"remote": staticmethod(self._generate_batch)})
        self.abort = type("M", (), {"remote": staticmethod(self._abort)})

    def options(self, **kwargs):
        return self

    async def _abort(self, request_ids, target_replica=None):
        for request_id in request_ids:
            self.engine.abort(request_id)

    async def _generate_batch(self, requests):
        yield "replica-0"
        items = []
        for r in requests:
            try:
                self.engine.add_request(r.request_id, r.prompt_token_ids, r.params)
                self.engine.abort(r.request_id)
                items.append(StreamItem(r.request_id, error="admitted (the test stops here)", status=503))
            except ValueError as e:
                items.append(StreamItem(r.request_id, error=str(e), status=400))
        yield items


def test_min_tokens_past_the_context_is_a_400_naming_min_tokens(engine):
    async def main():
        app = build_fastapi_app(OpenAIIngress(EngineReplicas(engine), AppArgs()))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            token_prompt = {"model": "gpt-oss", "prompt": list(range(10)), "max_tokens": None}
            over = await client.post("/v1/completions", json={**token_prompt, "min_tokens": 60})
            fits = await client.post("/v1/completions", json={**token_prompt, "min_tokens": 54})
            long = await client.post("/v1/completions", json={**token_prompt, "max_tokens": 60})
        assert_error(over, 400, param="min_tokens", says="min_tokens is 60, but the prompt has 10 tokens")
        assert fits.status_code == 503  # reached the engine and was admitted
        assert_error(long, 400, says="max_tokens is 60")

    asyncio.run(main())
