"""Work of one request that would hold the ingress's event loop: a structured-output grammar compiles on a worker
thread (a trivial request is answered meanwhile), and a prompt whose text is already more tokens than the server takes
is refused before harmony renders it (which holds the GIL: no thread would help). In-process, no Ray."""

from __future__ import annotations

import asyncio
import time

import httpx

from gptoss_serve.deployments import off_loop
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.openai_ingress import OpenAIIngress, build_fastapi_app
from gptoss_serve.model import harmony
from gptoss_serve.model.tokenizer import load_tokenizer
from tests.test_router_and_ingress import ExplodingRouter

BIG = "hello world " * (16_000_000 // 12)  # 16 MB, about 2.7M tokens
FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}


async def while_posting(app, path: str, body: dict) -> tuple[httpx.Response, float]:
    """POSTs body; meanwhile a GET /v1/models is due every 10 ms. -> (the POST's answer, the latest a GET was)."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
        latest, done = [0.0], asyncio.Event()

        async def trivial():
            while not done.is_set():
                due = time.perf_counter() + 0.01
                await asyncio.sleep(0.01)
                assert (await client.get("/v1/models")).status_code == 200
                latest[0] = max(latest[0], time.perf_counter() - due)

        watcher = asyncio.create_task(trivial())
        await asyncio.sleep(0.05)
        answer = await client.post(path, json=body)
        done.set()
        await watcher
        return answer, latest[0]


def test_a_grammar_compiles_off_the_event_loop(monkeypatch):
    from gptoss_serve.deployments import openai_ingress
    from gptoss_serve.deployments.responses import api

    def slow_compile(*args):  # as llguidance on a 10,000-property schema: seconds, holding no GIL
        time.sleep(0.8)
        return None

    monkeypatch.setattr(openai_ingress, "harmony_constraint", slow_compile)
    monkeypatch.setattr(openai_ingress, "completion_constraint", slow_compile)
    monkeypatch.setattr(api, "harmony_constraint", slow_compile)
    app = build_fastapi_app(OpenAIIngress(ExplodingRouter(), AppArgs()))
    for path, body in [
        ("/v1/chat/completions", {"model": "gpt-oss", "messages": [{"role": "user", "content": "hi"}],
                                  "response_format": FORMAT}),
        ("/v1/completions", {"model": "gpt-oss", "prompt": "hi", "response_format": FORMAT}),
        ("/v1/responses", {"model": "gpt-oss", "input": "hi", "text": {"format": {
            "type": "json_schema", "name": "x", "schema": {"type": "object"}}}}),
    ]:
        answer, latest = asyncio.run(while_posting(app, path, body))
        assert answer.status_code == 503, answer.text  # compiled, then the router stand-in failed
        assert latest < 0.4, (path, latest)  # the 0.8 s compile held no one up


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_rendered(monkeypatch):
    def render_chat(*args, **kwargs):
        raise AssertionError("rendered")

    monkeypatch.setattr(harmony, "render_chat", render_chat)
    app = build_fastapi_app(OpenAIIngress(ExplodingRouter(), AppArgs()))
    for path, body, param in [
        ("/v1/chat/completions", {"model": "gpt-oss", "messages": [{"role": "user", "content": BIG}]}, "messages"),
        ("/v1/chat/completions", {"model": "gpt-oss", "messages": [
            {"role": "user", "content": [{"type": "text", "text": BIG}]}]}, "messages"),
        ("/v1/completions", {"model": "gpt-oss", "prompt": BIG}, "prompt"),
        ("/v1/responses", {"model": "gpt-oss", "input": BIG}, "input"),
    ]:
        answer, latest = asyncio.run(while_posting(app, path, body))
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == param and "at least" in error["message"] and "131072" in error["message"]
        # reading the 16 MB body takes the loop a few tenths of a second (more on a loaded 2-core machine); rendering
        # its 2.7M tokens would take it many seconds
        assert latest < 2.0, (path, latest)


def test_the_count_never_exceeds_the_prompts_tokens_and_stops_early():
    encode = load_tokenizer().encode
    texts = ["a" * 40_000, " " * 40_000, "漢字" * 20_000, "1" * 40_000, "hello world, " * 5_000,
             "x\n" * 30_000, "😀" * 20_000]
    for text in texts:
        assert off_loop.tokens_at_least([text], 10**9) <= len(encode(text)), text[:10]
    assert off_loop.tokens_at_least(texts, 10**9) <= sum(len(encode(t)) for t in texts)
    start = time.perf_counter()
    assert off_loop.tokens_at_least([BIG], 1000) > 1000 and time.perf_counter() - start < 0.1
