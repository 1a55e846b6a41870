"""Random requests against the ingress (in-process, a stand-in engine that answers): whatever a client sends, the
answer is a well-formed 2xx or 4xx, never a 5xx, never slow, and the app serves normally afterwards.

Bodies are drawn by hypothesis: every field the endpoints know (chat, completions, Responses with the tools it runs
through MCP tool servers, vLLM's /tokenize in both its forms and /detokenize), each either a
plausible value or any JSON value at all, plus unknown fields, and sometimes no JSON object at all. Text anywhere
(keys too) may hold a lone surrogate, any value may be nested hundreds of levels deep, and the schemas of
response_format, text.format and tools include ones no request could follow ($ref cycles, patterns past
llguidance's lexer budget). 1,000 examples per endpoint, deterministic."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from urllib.parse import quote, urlencode

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptoss_serve.cluster.engine_protocol import StreamItem
from gptoss_serve.cluster.grammar import GrammarCompiler, advance, token_bitmasks
from gptoss_serve.cluster.sampling_params import StructuredOutput
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.openai_ingress import OpenAIIngress, build_fastapi_app
from gptoss_serve.model.tokenizer import load_tokenizer
from tests.mcp_servers import RunningServer, docs_server
from tests.net import free_port
from tests.test_router_and_ingress import FakeReplicas

EXAMPLES = 1000
# lone surrogates, as JSON escapes them ("\ud800"): Python decodes them into text no encoder takes
SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])


def text(*, min_size: int = 0, max_size: int = 20) -> st.SearchStrategy:
    """Text, a quarter of the time with a lone surrogate somewhere in it."""
    plain = st.text(min_size=min_size, max_size=max_size)
    broken = st.builds(lambda s, c, i: s[:i % (len(s) + 1)] + c + s[i % (len(s) + 1):], plain, SURROGATES,
                       st.integers(0, max_size))
    return st.one_of(plain, plain, plain, broken)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                    | text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text(max_size=8), inner, max_size=4),
                    max_leaves=12)


def nest(depth: int, in_list: bool, leaf) -> object:
    for _ in range(depth):
        leaf = [leaf] if in_list else {"a": leaf}
    return leaf


# past the ingress's limit of 64 levels, up to where the body no longer parses
DEEP = st.builds(nest, st.integers(1, 600), st.booleans(), st.sampled_from([1, "x", {"type": "string"}]))


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Usually a plausible value (itself sometimes out of range), now and then any JSON value at all, or a deep one."""
    return st.one_of(*[valid] * 12, JSON, DEEP)


CYCLE = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
# schemas llguidance compiles but no request could follow: every one must be a 400 before the engine
UNFOLLOWABLE = st.sampled_from([
    CYCLE, {"$ref": "#"},
    {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "required": ["x"], "$defs": CYCLE["$defs"]},
    {"$defs": {"n": {"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}, "required": ["n"]}},
     "$ref": "#/$defs/n"},
    {"type": "string", "pattern": "[\\s\\S]{0,100000}"}, {"type": "string", "pattern": "(.{0,20}){0,20}"},
    {"type": "string", "pattern": ".{0,1000}"}, {"type": "object", "patternProperties": {"^.{0,1000}$": {}}}])
SCHEMA = st.one_of(JSON, st.just({"type": "object", "properties": {"a": {"enum": [1]}}}), UNFOLLOWABLE, DEEP)


MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "user", "system", "assistant", "developer", "x"]),
                                 "content": field(text(max_size=40))})
TOOL = st.fixed_dictionaries({"type": st.sampled_from(["function", "function", "other"]),
                              "function": field(st.fixed_dictionaries(
                                  {"name": text(max_size=10) | st.sampled_from(["f", "g"]),
                                   "parameters": field(st.just({"type": "object"}) | UNFOLLOWABLE)},
                                  optional={"description": field(text(max_size=20))}))})
COMMON = {
    "max_tokens": field(st.integers(-1, 8)), "temperature": field(st.floats(-0.5, 2.5)),
    "top_p": field(st.floats(-0.2, 1.2)), "n": field(st.integers(0, 3)), "stream": field(st.booleans()),
    "stop": field(text(max_size=5) | st.lists(text(max_size=5), max_size=3)),
    "seed": field(st.integers(-5, 2**70)), "top_k": field(st.integers(-2, 50)), "min_p": field(st.floats(-1, 2)),
    "presence_penalty": field(st.floats(-3, 3)),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "min_tokens": field(st.integers(-1, 4)), "ignore_eos": field(st.booleans()),
    "response_format": field(st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "xml"}]) | st.builds(
        lambda name, schema: {"type": "json_schema", "json_schema": {"name": name, "schema": schema}},
        st.sampled_from(["w", "bad name"]), SCHEMA)),
    "user": field(text(max_size=5)), "logit_bias": field(st.just({}) | st.just({"1": 5})),
    "metadata": field(st.dictionaries(text(max_size=6), text(max_size=10), max_size=3)),
}
MODEL = {"model": field(st.sampled_from(["gpt-oss"] * 6 + ["other"]))}
# well-formed requests, so that a good share of the fuzz runs all the way through the engine and back
# (poisoned() then breaks one thing in some of them: a surrogate in one string, one value nested deep)
GOOD_SCHEMAS = [{"type": "object", "required": ["a"],
                 "properties": {"a": {"enum": [1, 2]}, "b": {"type": "string", "pattern": "^x{1,3}$"}}},
                {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {
                    "$ref": "#"}}}, "required": ["v"]}]
GOOD_FORMAT = st.sampled_from([{"type": "text"}, {"type": "json_object"}] + [
    {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}} for schema in GOOD_SCHEMAS])
GOOD = {"max_tokens": st.integers(1, 8), "stream": st.booleans(), "n": st.integers(1, 2),
        "temperature": st.floats(0, 2), "seed": st.integers(0, 2**31),
        "stop": st.lists(st.text(max_size=5), max_size=2), "user": st.text(max_size=8),
        "metadata": st.dictionaries(st.text(max_size=6), st.text(max_size=10), max_size=2),
        # now and then a schema no request could follow: the ingress must refuse it (the stand-in engine fails on it)
        "response_format": st.one_of(GOOD_FORMAT, GOOD_FORMAT, GOOD_FORMAT, st.builds(
            lambda schema: {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}, UNFOLLOWABLE))}
GOOD_TOOLS = st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.just("f"), "description": st.text(max_size=20),
     "parameters": st.sampled_from(GOOD_SCHEMAS) | UNFOLLOWABLE})}), min_size=1, max_size=1)
GOOD_CHAT = st.fixed_dictionaries({"model": st.just("gpt-oss"), "messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "user", "system"]), "content": st.text(max_size=40)}), min_size=1, max_size=2)},
    optional={**GOOD, "tools": GOOD_TOOLS, "tool_choice": st.sampled_from(["auto", "required", "none"]),
              "include_reasoning": st.booleans()})
GOOD_COMPLETION = st.fixed_dictionaries({"model": st.just("gpt-oss"), "prompt": st.text(min_size=1, max_size=40)
                                         | st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=2)},
                                        optional=GOOD)
CHAT = ({**MODEL, "messages": field(st.lists(MESSAGE, min_size=1, max_size=3))},
        {**COMMON, "tools": field(st.lists(TOOL, max_size=2)), "logprobs": field(st.booleans()),
         "tool_choice": field(st.sampled_from(["none", "auto", "required", "any"]) | st.builds(
             lambda name: {"type": "function", "function": {"name": name}}, text(max_size=4) | st.just("f"))),
         "parallel_tool_calls": field(st.booleans()),
         "top_logprobs": field(st.integers(-1, 25)),
         "reasoning_effort": field(st.sampled_from(["low", "high", "max"])),
         "include_reasoning": field(st.booleans()),
         "max_completion_tokens": field(st.integers(-1, 8))})
COMPLETION = ({**MODEL, "prompt": field(text(min_size=1, max_size=40) | st.lists(st.integers(-3, 300_000),
                                                                                  max_size=5)
                                        | st.lists(text(min_size=1, max_size=10), min_size=1, max_size=3))},
              {**COMMON, "logprobs": field(st.integers(-1, 25)), "echo": field(st.booleans())})


ALLOWED_URL = "http://127.0.0.1:9/mcp"  # the fuzzed app's allow-list: a request may name it (nothing listens there)
INPUT_ITEM = st.fixed_dictionaries({"role": st.sampled_from(["user", "user", "assistant", "system", "developer", "x"]),
                                    "content": field(text(max_size=30) | st.lists(st.fixed_dictionaries(
                                        {"type": st.sampled_from(["input_text", "output_text", "input_image"]),
                                         "text": field(text(max_size=20))}), max_size=2))})
FUNCTION_TOOL = st.fixed_dictionaries(
    {"type": st.sampled_from(["function", "function", "web_search", "file_search"]),
     "name": st.sampled_from(["f", "g"]) | text(), "parameters": field(st.just({"type": "object"}) | UNFOLLOWABLE)},
    optional={"description": field(text(max_size=20)), "strict": field(st.booleans())})
# the tools the server runs through its MCP tool servers (the fuzzed app has a browser, a python and `docs`, and
# allows one URL): labels and URLs configured or not, OpenAI's options it lacks, any value in any field
SERVER_LABEL = st.sampled_from(["docs", "docs", "browser", "gone", "nowhere", "functions"]) | text(max_size=8)
MCP_TOOL = st.fixed_dictionaries({"type": st.just("mcp"), "server_label": field(SERVER_LABEL)}, optional={
    "server_url": field(st.sampled_from([ALLOWED_URL, "http://10.0.0.1/mcp", "file:///etc/passwd"]) | text()),
    "allowed_tools": field(st.sampled_from([["lookup"], {"tool_names": ["lookup"]}, {"read_only": True}, []])),
    "require_approval": field(st.sampled_from(["never", "always", {"never": {"tool_names": ["lookup"]}}])),
    "headers": field(st.dictionaries(text(max_size=6), text(max_size=6), max_size=2)),
    "authorization": field(text(max_size=8)), "server_description": field(text(max_size=20)),
    "connector_id": field(st.just("connector_gmail")), "defer_loading": field(st.booleans())})
WEB_SEARCH_TOOL = st.fixed_dictionaries({"type": st.sampled_from(["web_search", "web_search_preview"])}, optional={
    "search_context_size": field(st.sampled_from(["low", "high", "huge"])),
    "user_location": field(st.just({"type": "approximate"})), "filters": field(st.just({"allowed_domains": []}))})
CODE_TOOL = st.fixed_dictionaries({"type": st.just("code_interpreter")}, optional={
    "container": field(st.sampled_from(["cntr_1", {"type": "auto"}, {"type": "auto", "file_ids": ["f"]},
                                        {"type": "other"}]))})
RESPONSE_TOOL = st.one_of(FUNCTION_TOOL, FUNCTION_TOOL, MCP_TOOL, WEB_SEARCH_TOOL, CODE_TOOL)
RESPONSES = ({**MODEL, "input": field(text(min_size=1, max_size=40) | st.lists(INPUT_ITEM, min_size=1, max_size=3))},
             {"instructions": field(text(max_size=20)), "user": field(text(max_size=8)),
              "metadata": field(st.dictionaries(text(max_size=6), text(max_size=10), max_size=3)),
              "tools": field(st.lists(RESPONSE_TOOL, max_size=2)),
              "tool_choice": field(st.sampled_from(["none", "auto", "required"]) | st.builds(
                  lambda name: {"type": "function", "name": name}, st.sampled_from(["f", "g"]))),
              "text": field(st.fixed_dictionaries({"format": st.sampled_from(
                  [{"type": "text"}, {"type": "json_object"}]) | st.builds(
                  lambda schema: {"type": "json_schema", "name": "x", "schema": schema}, SCHEMA)})),
              "max_output_tokens": field(st.integers(-1, 8)), "temperature": field(st.floats(-0.5, 2.5)),
              "top_p": field(st.floats(-0.2, 1.2)), "stream": field(st.booleans()), "store": field(st.booleans()),
              "reasoning": field(st.fixed_dictionaries({"effort": st.sampled_from(["low", "high", "minimal"])})),
              "previous_response_id": field(st.just("resp_none")), "parallel_tool_calls": field(st.booleans()),
              "background": field(st.booleans()), "max_tool_calls": field(st.integers(-1, 3)),
              "include": field(st.sampled_from([["code_interpreter_call.outputs"], ["web_search_call.results"]]))})
GOOD_SERVER_TOOL = st.sampled_from([
    {"type": "web_search_preview"}, {"type": "code_interpreter", "container": {"type": "auto"}},
    {"type": "mcp", "server_label": "docs", "require_approval": "never"},
    {"type": "mcp", "server_label": "docs", "allowed_tools": ["lookup"]}])
GOOD_RESPONSE = st.fixed_dictionaries(
    {"model": st.just("gpt-oss"), "input": st.text(min_size=1, max_size=40) | st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "developer"]), "content": st.text(max_size=30)}), min_size=1, max_size=2)},
    optional={"max_output_tokens": st.integers(1, 8), "stream": st.booleans(), "temperature": st.floats(0, 2),
              "instructions": st.text(max_size=20), "user": st.text(max_size=8),
              "metadata": st.dictionaries(st.text(max_size=6), st.text(max_size=10), max_size=2),
              "text": st.builds(lambda schema: {"format": {"type": "json_schema", "name": "s", "schema": schema}},
                                st.sampled_from(GOOD_SCHEMAS) | UNFOLLOWABLE),
              "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "name": st.just("f"),
                                                       "description": st.text(max_size=20),
                                                       "parameters": st.sampled_from(GOOD_SCHEMAS) | UNFOLLOWABLE}),
                                min_size=1, max_size=1) | st.lists(GOOD_SERVER_TOOL, min_size=1, max_size=3,
                                                                   unique_by=lambda tool: tool["type"]),
              "tool_choice": st.sampled_from(["auto", "required"]), "background": st.booleans(),
              "max_tool_calls": st.integers(0, 3)})


# vLLM's /tokenize (a text, or a chat rendered as the chat route renders it) and /detokenize; `model` may be left out
TOKEN_STRS = {"add_special_tokens": field(st.booleans()), "return_token_strs": field(st.booleans() | st.none())}
TOKENIZE_TEXT = ({"prompt": field(text(max_size=40))}, {**MODEL, **TOKEN_STRS})
ASSISTANT = st.fixed_dictionaries({"role": st.just("assistant")}, optional={
    "content": field(text(max_size=20) | st.none()), "reasoning_content": field(text(max_size=20)),
    "tool_calls": field(st.lists(st.fixed_dictionaries({"id": st.just("c1"), "type": st.just("function"), "function": (
        st.fixed_dictionaries({"name": st.sampled_from(["f", "bad name"]), "arguments": text(max_size=10)}))}),
        max_size=1))})
TOKENIZE_CHAT = ({"messages": field(st.lists(MESSAGE | ASSISTANT, min_size=1, max_size=3))},
                 {**MODEL, **TOKEN_STRS, "add_generation_prompt": field(st.booleans()),
                  "continue_final_message": field(st.booleans()), "tools": field(st.lists(TOOL, max_size=2)),
                  "reasoning_effort": field(st.sampled_from(["low", "high", "max"]))})
GOOD_TOKENIZE_TEXT = st.fixed_dictionaries({"prompt": st.text(max_size=40)}, optional={
    "model": st.just("gpt-oss"), "add_special_tokens": st.booleans(), "return_token_strs": st.booleans()})
GOOD_ASSISTANT = st.fixed_dictionaries({"role": st.just("assistant")}, optional={
    "content": st.text(max_size=20), "reasoning_content": st.text(max_size=20)}).filter(lambda m: len(m) > 1)
GOOD_TOKENIZE_CHAT = st.builds(
    lambda body, last, ending: {**body, "messages": body["messages"] + ([last] if ending else []), **(
        {"continue_final_message": True, "add_generation_prompt": False} if ending == "continue" else {})},
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=40)}), min_size=1, max_size=2)},
        optional={"model": st.just("gpt-oss"), "add_generation_prompt": st.booleans(), "tools": GOOD_TOOLS,
                  "reasoning_effort": st.sampled_from(["low", "high"]), "return_token_strs": st.booleans()}),
    GOOD_ASSISTANT, st.sampled_from([None, "closed", "continue"]))
DETOKENIZE = ({"tokens": field(st.lists(st.integers(-3, 202_000), max_size=8))}, MODEL)
GOOD_DETOKENIZE = st.fixed_dictionaries({"tokens": st.lists(st.integers(0, 201_087), max_size=20)},
                                        optional={"model": st.just("gpt-oss")})


def _places(value, found: list) -> list:
    """(container, key) of every value inside `value`, depth first."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found.append((value, key))
        _places(item, found)
    return found


def _poison(body: dict, how: str, where: int, surrogate: str, at: int, deep) -> dict:
    """One thing broken in a good body: a lone surrogate put into one of its strings (or keys), or one of its
    values replaced by a deeply nested one."""
    body = json.loads(json.dumps(body))
    places = [(c, k) for c, k in _places(body, []) if how == "deep" or isinstance(c[k], str) or isinstance(k, str)]
    if not places:
        return body
    container, key = places[where % len(places)]
    if how == "deep":
        container[key] = deep
    elif isinstance(container[key], str):
        text = container[key]
        container[key] = text[:at % (len(text) + 1)] + surrogate + text[at % (len(text) + 1):]
    else:
        container[key + surrogate] = container.pop(key)
    return body


def poisoned(good: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(_poison, good, st.sampled_from(["text", "text", "deep"]), st.integers(0, 10**6), SURROGATES,
                     st.integers(0, 40), DEEP)


def bodies(fields: tuple[dict, dict], good: st.SearchStrategy) -> st.SearchStrategy:
    """A well-formed request, or the required fields and some optional ones (each plausible or not), maybe unknown
    ones; sometimes fields missing, or not an object at all."""
    required, optional = fields
    extra = st.dictionaries(text(min_size=1, max_size=8), JSON | DEEP, max_size=2)
    whole = st.builds(lambda a, b: {**b, **a}, st.fixed_dictionaries(required, optional=optional), extra)
    partial = st.fixed_dictionaries({}, optional={**required, **optional})
    return st.one_of(good, poisoned(good), poisoned(good), whole, whole, whole, partial, JSON)


class GrammarReplicas(FakeReplicas):
    """FakeReplicas that treat a structured output as the engine does, so that a grammar the ingress let through but
    no request could follow fails here as it would there: each JSON schema of the grammar is compiled by the engine's
    GrammarCompiler (a compile error is the engine's 400) and walked a few tokens on a few samples. A mask or a token
    refused mid-way is a 500 here: the engine would answer 400 after generating, but the ingress's probe is meant to
    refuse such a grammar before admission."""

    WALKS, STEPS = 3, 8

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.verdicts: dict[str, tuple[int, str] | None] = {}

    async def _generate_batch(self, requests):
        failures = {r.request_id: self.failure(r.params.structured_output) for r in requests}
        failed = [StreamItem(i, error=f[1], status=f[0]) for i, f in failures.items() if f is not None]
        if not failed:
            async for item in super()._generate_batch(requests):
                yield item
            return
        yield "replica-0"
        yield failed
        rest = super()._generate_batch([r for r in requests if failures[r.request_id] is None])
        if len(failed) < len(requests):
            await rest.__anext__()  # its replica id, sent already
            async for item in rest:
                yield item

    def failure(self, spec: StructuredOutput | None) -> tuple[int, str] | None:
        if spec is None:
            return None
        if spec.grammar not in self.verdicts:
            self.verdicts[spec.grammar] = next(filter(None, map(self.walk, json_schemas(spec.grammar))), None)
        return self.verdicts[spec.grammar]

    def walk(self, schema: str) -> tuple[int, str] | None:
        tokenizer = load_tokenizer()
        spec = StructuredOutput(grammar=f"start: %json {schema}", description="fuzz")
        for seed in range(self.WALKS):
            rng = random.Random(seed)
            try:
                matcher = GrammarCompiler(tokenizer).matcher(spec)  # a compiler of its own: a cold lexer
            except ValueError as e:
                return 400, str(e)
            for _ in range(self.STEPS):
                bits = np.unpackbits(token_bitmasks([matcher]).numpy().view(np.uint8), bitorder="little")
                allowed = [t for t in np.flatnonzero(bits[:tokenizer.vocab_size]).tolist()
                           if t != tokenizer.return_token_id]
                if matcher.error is not None or not allowed:
                    if matcher.finished:
                        break
                    return 500, "the ingress let through a grammar that fails mid-way"
                advance([(matcher, rng.choice(allowed))])
                if matcher.error is not None:
                    return 500, "the ingress let through a grammar that fails mid-way"
                if matcher.finished:
                    break
        return None


def json_schemas(grammar: str) -> list[str]:
    """The JSON schemas a grammar of cluster/constraints.py inlines (`%json {...}`)."""
    decoder = json.JSONDecoder()
    return [json.dumps(decoder.raw_decode(grammar, m.end())[0]) for m in re.finditer(r"%json ", grammar)]


@pytest.fixture(scope="module")
def client():
    loop = asyncio.new_event_loop()
    docs = RunningServer(docs_server(Counter()))  # a live MCP server, its tools listed when a request names it
    nowhere = f"http://127.0.0.1:{free_port()}/mcp"  # servers that are down (the fuzzed model never calls them)
    args = AppArgs(tool_servers=[{"url": nowhere, "label": "browser", "builtin": "browser"},
                                 {"url": nowhere, "label": "python", "builtin": "python"},
                                 {"url": docs.url, "label": "docs"}, {"url": nowhere, "label": "gone"}],
                   mcp_server_url_allowlist=[ALLOWED_URL])
    app = build_fastapi_app(OpenAIIngress(GrammarReplicas(tokens=2, delay=0), args))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    http = httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30)
    seen: dict[int, int] = {}

    def send(path: str, body, method: str = "POST") -> httpx.Response:
        start = time.monotonic()
        content = None if method == "GET" else json.dumps(body).encode()
        response = loop.run_until_complete(http.request(method, path, content=content,
                                                        headers={"content-type": "application/json"}))
        assert time.monotonic() - start < 30
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        return response

    yield send, seen
    loop.run_until_complete(http.aclose())
    # the ingress's background loops (batching, stop polling) end with the loop, not left pending for the collector
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()
    docs.stop()


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    elif "text/event-stream" not in response.headers.get("content-type", ""):
        body = response.json()
        assert body["choices"] if "choices" in body else body["object"] == "response"
    else:  # a stream that started is a 200: a failure inside it is a 5xx all the same
        for line in response.text.splitlines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: "):])
                assert not str(event.get("error", {}).get("code", "")).startswith("5"), event
                assert event.get("type") != "response.failed", event


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@FUZZ
@given(body=bodies(CHAT, GOOD_CHAT))
def test_chat_fuzz(client, body):
    send, _ = client
    check(send("/v1/chat/completions", body))


@FUZZ
@given(body=bodies(COMPLETION, GOOD_COMPLETION))
def test_completions_fuzz(client, body):
    send, _ = client
    check(send("/v1/completions", body))


@FUZZ
@given(body=bodies(RESPONSES, GOOD_RESPONSE))
def test_responses_fuzz(client, body):
    send, _ = client
    check(send("/v1/responses", body))


# well-formed requests whose tools are mostly the server's own, each tool plausible or not: the checks against the
# app's tool servers (requested_tools.py) and the listing of a live MCP server, rather than pydantic's
SERVER_TOOLS_RESPONSE = st.fixed_dictionaries(
    {"model": st.just("gpt-oss"), "input": st.just("hi"),
     "tools": st.lists(st.one_of(MCP_TOOL, MCP_TOOL, WEB_SEARCH_TOOL, CODE_TOOL, GOOD_SERVER_TOOL, FUNCTION_TOOL),
                       min_size=1, max_size=3)},
    optional={"stream": st.booleans(), "max_tool_calls": field(st.integers(-1, 3)), "background": st.booleans(),
              "tool_choice": st.sampled_from(["none", "auto", "required"]), "max_output_tokens": st.integers(1, 4)})


@FUZZ
@given(body=SERVER_TOOLS_RESPONSE)
def test_responses_server_tools_fuzz(client, body):
    send, _ = client
    check(send("/v1/responses", body))


def check_tokenizer_route(response: httpx.Response) -> None:
    """A 4xx in OpenAI's shape, or vLLM's answer: /tokenize's count of ids (and as many strings), /detokenize's text."""
    assert response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    if response.status_code >= 400:
        assert set(body["error"]) == {"message", "type", "param", "code"}
    elif "prompt" in body:
        assert set(body) == {"prompt"} and isinstance(body["prompt"], str)
    else:
        assert set(body) == {"count", "max_model_len", "tokens", "token_strs"} and body["count"] == len(body["tokens"])
        assert body["token_strs"] is None or len(body["token_strs"]) == body["count"]


@FUZZ
@given(body=bodies(TOKENIZE_TEXT, GOOD_TOKENIZE_TEXT))
def test_tokenize_text_fuzz(client, body):
    send, _ = client
    check_tokenizer_route(send("/tokenize", body))


@FUZZ
@given(body=bodies(TOKENIZE_CHAT, GOOD_TOKENIZE_CHAT))
def test_tokenize_chat_fuzz(client, body):
    send, _ = client
    check_tokenizer_route(send("/tokenize", body))


@FUZZ
@given(body=bodies(DETOKENIZE, GOOD_DETOKENIZE))
def test_detokenize_fuzz(client, body):
    send, _ = client
    check_tokenizer_route(send("/detokenize", body))


# the routes of one stored response: an id (a real one, of a background response just started, or anything at all, lone
# surrogates included, sent as their UTF-8 bytes) and query parameters (OpenAI's, any value)
ROUTES = [("POST", "/cancel"), ("GET", ""), ("DELETE", ""), ("GET", "/input_items")]
QUERY = st.dictionaries(st.sampled_from(["stream", "starting_after", "include", "limit", "order", "after", "x"]),
                        text(max_size=6) | st.sampled_from(["true", "false", "1", "-1", "asc"]), max_size=3)


def check_route(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    if 300 <= response.status_code < 400:  # /v1/responses/ (no id): redirected to /v1/responses, as FastAPI does
        return
    body = response.json()
    if response.status_code >= 400:
        assert set(body["error"]) == {"message", "type", "param", "code"}
    else:
        assert body["object"] in ("response", "list")


@FUZZ
@given(route=st.sampled_from(ROUTES), known=st.booleans(), response_id=text(max_size=20), query=QUERY)
def test_response_routes_fuzz(client, route, known, response_id, query):
    send, _ = client
    if known:
        started = send("/v1/responses", {"model": "gpt-oss", "input": "hi", "background": True})
        assert started.status_code in (200, 429), started.text
        response_id = started.json()["id"] if started.status_code == 200 else response_id
    method, suffix = route
    raw = {k: v.encode("utf-8", "surrogatepass") for k, v in query.items()}
    path = f"/v1/responses/{quote(response_id.encode('utf-8', 'surrogatepass'), safe='')}{suffix}?{urlencode(raw)}"
    check_route(send(path, None, method))


def test_the_app_still_serves_after_the_fuzz(client):
    send, seen = client
    ok = send("/v1/completions", {"model": "gpt-oss", "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
    assert send("/tokenize", {"prompt": "hi"}).json()["count"] == 1
    assert send("/version", None, "GET").json()["version"]
    # the fuzz reached the engine often and was refused often; nothing failed on the server's side
    assert seen.get(200, 0) >= 20 and sum(n for s, n in seen.items() if 400 <= s < 500) > 500
    assert not any(s >= 500 for s in seen)
