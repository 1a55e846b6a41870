"""Bad input an attacker's run found answered with a 5xx, each now a 400 naming the field, decided before admission
(in-process, no Ray; the router stand-in answers 503 if it is ever reached): lone surrogates in any text, values
nested hundreds of levels deep, and structured outputs no request could follow ($ref cycles, patterns past
llguidance's lexer budget). And the pieces that decide it: the body check (deployments/json_body.py), harmony's
render errors (model/harmony.py), the schema checks (cluster/schema_checks.py) and the probe against the tokenizer
(cluster/constraints.py)."""

from __future__ import annotations

import asyncio
import json
import sys

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptoss_serve.cluster import constraints
from gptoss_serve.cluster.constraints import JSON_FORMAT, completion_constraint, harmony_constraint
from gptoss_serve.cluster.schema_checks import MAX_NESTED_REPEAT, MAX_REPEAT, schema_problem
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.json_body import MAX_JSON_DEPTH, check_json_body
from gptoss_serve.deployments.openai_ingress import OpenAIIngress, build_fastapi_app
from gptoss_serve.model import harmony
from tests.test_router_and_ingress import ExplodingRouter, FakeReplicas

SURROGATE = '"\\ud800"'  # as a client sends it: JSON's escape of a lone surrogate
CHAT = '{"model": "gpt-oss", "messages": [{"role": "user", "content": "hi"}]'
COMPLETION = '{"model": "gpt-oss", "prompt": "hi"'
RESPONSE = '{"model": "gpt-oss", "input": "hi"'
CYCLE = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}


def post(path: str, body: str | dict, router=None) -> httpx.Response:
    app = build_fastapi_app(OpenAIIngress(router or ExplodingRouter(), AppArgs()))
    content = body if isinstance(body, str) else json.dumps(body)

    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
            return await client.post(path, content=content.encode(), headers={"content-type": "application/json"})

    return asyncio.run(main())


def assert_400(response: httpx.Response, param: str, starts: str) -> dict:
    assert response.status_code == 400, response.text
    assert "text/event-stream" not in response.headers.get("content-type", "")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"].startswith(starts), error
    return error


def nested(depth: int, leaf=1):
    """A JSON object `depth` objects deep."""
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


# ---- 1. lone surrogates ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, param, starts", [
    # the reproductions: Responses echoes user and metadata, whose JSON could not be encoded (500; 200 streamed)
    ("/v1/responses", RESPONSE + f', "user": {SURROGATE}}}', "user", "user: not valid Unicode"),
    ("/v1/responses", RESPONSE + f', "user": {SURROGATE}, "stream": true}}', "user", "user: "),
    ("/v1/responses", RESPONSE + f', "metadata": {{"k": {SURROGATE}}}}}', "metadata", "metadata.k: "),
    ("/v1/responses", RESPONSE + f', "metadata": {{{SURROGATE}: "v"}}}}', "metadata", "metadata: a key"),
    ("/v1/responses", f'{{"model": "gpt-oss", "input": {SURROGATE}}}', "input", "input: "),
    ("/v1/responses", '{"model": "gpt-oss", "input": [{"role": "user", "content": [{"type": "input_text", "text": '
     f'{SURROGATE}}}]}}]}}', "input", "input.0.content.0.text: "),
    ("/v1/responses", RESPONSE + f', "instructions": {SURROGATE}}}', "instructions", "instructions: "),
    ("/v1/responses", RESPONSE + f', "tools": [{{"type": "function", "name": "f", "description": {SURROGATE}}}]}}',
     "tools", "tools.0.description: "),
    ("/v1/responses", RESPONSE + ', "text": {"format": {"type": "json_schema", "name": "x", "schema": '
     f'{{"enum": [{SURROGATE}]}}}}}}}}', "text", "text.format.schema.enum.0: "),
    # chat: content, stop strings, tools, user, response_format
    ("/v1/chat/completions", f'{{"model": "gpt-oss", "messages": [{{"role": "user", "content": {SURROGATE}}}]}}',
     "messages", "messages.0.content: "),
    ("/v1/chat/completions", CHAT + f', "stop": {SURROGATE}}}', "stop", "stop: "),
    ("/v1/chat/completions", CHAT + f', "stop": ["a", {SURROGATE}]}}', "stop", "stop.1: "),
    ("/v1/chat/completions", CHAT + f', "user": {SURROGATE}}}', "user", "user: "),
    ("/v1/chat/completions", CHAT + ', "tools": [{"type": "function", "function": {"name": "f", "description": '
     f'{SURROGATE}}}}}]}}', "tools", "tools.0.function.description: "),
    ("/v1/chat/completions", CHAT + ', "response_format": {"type": "json_schema", "json_schema": {"name": "x", '
     f'"schema": {{"const": {SURROGATE}}}}}}}}}', "response_format", "response_format.json_schema.schema.const: "),
    # completions: the prompt (500: the tokenizer could not encode it), stop strings (500)
    ("/v1/completions", f'{{"model": "gpt-oss", "prompt": {SURROGATE}}}', "prompt", "prompt: "),
    ("/v1/completions", f'{{"model": "gpt-oss", "prompt": ["ok", "x{SURROGATE[1:-1]}y"]}}', "prompt", "prompt.1: "),
    ("/v1/completions", COMPLETION + f', "stop": [{SURROGATE}]}}', "stop", "stop.0: "),
    # any field at all, known or not: the whole body is checked before its fields
    ("/v1/completions", COMPLETION + f', "no_such_field": {SURROGATE}}}', "no_such_field", "no_such_field: "),
])
def test_a_lone_surrogate_anywhere_is_a_400_naming_the_field(path, body, param, starts):
    assert_400(post(path, body), param, starts)


def test_text_with_real_non_ascii_characters_and_surrogate_pairs_is_fine():
    # a pair of surrogates escapes one character (an emoji): that is valid Unicode
    body = '{"model": "gpt-oss", "prompt": "caf\\u00e9 \\ud83d\\ude00 \u4e2d", "max_tokens": 2}'
    assert post("/v1/completions", body, FakeReplicas(tokens=2, delay=0)).status_code == 200
    check_json_body({"a": ["caf\u00e9 \U0001F600", {"\u4e2d": "\u00e9"}]})


# ---- 2. deep nesting -----------------------------------------------------------------------------------------------

def tool(parameters) -> dict:
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


@pytest.mark.parametrize("depth", [60, 100, 300, 460, 480])
def test_tool_parameters_nested_deep_are_a_400_naming_them(depth):
    parameters = {"type": "object", "properties": {"a": nested(depth)}}
    chat = {"model": "gpt-oss", "messages": [{"role": "user", "content": "hi"}], "tools": [tool(parameters)]}
    error = assert_400(post("/v1/chat/completions", chat), "tools", "tools.0.function.parameters: nested too deeply")
    assert str(MAX_JSON_DEPTH) in error["message"]
    response = {"model": "gpt-oss", "input": "hi", "tools": [{"type": "function", "name": "f",
                                                              "parameters": parameters}]}
    assert_400(post("/v1/responses", response), "tools", "tools.0.parameters: nested too deeply")


@pytest.mark.parametrize("path, body, param, starts", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": nested(70)}}}, "response_format", "response_format.json_schema.schema: "),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [nested(70)]}]}, "messages",
     "messages.0.content: "),
    ("/v1/completions", {"prompt": "hi", "metadata": nested(70, "v")}, "metadata", "metadata.a.a: "),
    ("/v1/responses", {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x",
                                                          "schema": nested(70)}}}, "text", "text.format.schema: "),
    ("/v1/responses", {"input": [{"role": "user", "content": [nested(70)]}]}, "input", "input.0.content: "),
])
def test_any_value_nested_deep_is_a_400_naming_its_field(path, body, param, starts):
    base = {"model": "gpt-oss"} | ({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {})
    assert_400(post(path, base | body), param, starts + "nested too deeply")


def test_the_depth_limit_counts_the_body_itself():
    # the body, tools, the tool, function, parameters: 5 levels; 59 more are allowed inside the parameters
    parameters = nested(MAX_JSON_DEPTH - 5, {})
    check_json_body({"tools": [{"function": {"parameters": parameters}}]})
    with pytest.raises(ValueError, match=r"^tools\.0\.function\.parameters: nested too deeply"):
        check_json_body({"tools": [{"function": {"parameters": {"a": parameters}}}]})


def test_harmonys_render_errors_are_ours_and_name_the_field():
    """Past the body's checks (the offline path, tests): harmony's own failures become a RenderError (a ValueError)
    naming tools or messages, never a RecursionError or harmony's words about its own JSON document."""
    deep_tools = [tool(nested(300))]
    with pytest.raises(harmony.RenderError) as e:
        harmony.render_chat([{"role": "user", "content": "hi"}], tools=deep_tools)
    assert e.value.param == "tools" and str(e.value).startswith("tools: cannot be rendered") and "column" not in str(
        e.value)
    with pytest.raises(harmony.RenderError) as e:
        harmony.render_chat([{"role": "system", "content": "s"}, {"role": "user", "content": "\ud800"}],
                            tools=[tool({"type": "object"})])
    assert e.value.param == "messages" and "not valid Unicode" in str(e.value)
    # where Python's own recursion limit comes first (a Serve replica's deep stack): the same error, not a 500
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(400)
    try:
        with pytest.raises(harmony.RenderError, match="^tools: .*nested too deeply"):
            harmony.render_chat([{"role": "user", "content": "hi"}], tools=[tool(nested(390))])
    finally:
        sys.setrecursionlimit(limit)


# ---- 3. structured outputs no request could follow ----------------------------------------------------------------

BAD_SCHEMAS = {
    "ref cycle": (CYCLE, "at #/$defs/a: no finite JSON value"),
    "ref cycle under a property": ({"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "required": ["x"],
                                    "$defs": CYCLE["$defs"]}, "at #/$defs/a: "),
    "ref to itself": ({"$ref": "#"}, "at #: "),
    "an object that must contain itself": ({"$defs": {"n": {"type": "object", "required": ["n"],
                                                            "properties": {"n": {"$ref": "#/$defs/n"}}}},
                                            "$ref": "#/$defs/n"}, "at #/$defs/n: "),
    "a long counted repetition": ({"type": "string", "pattern": "[\\s\\S]{0,100000}"}, "at #/pattern: "),
    "nested counted repetitions": ({"type": "string", "pattern": "(.{0,20}){0,20}"}, "at #/pattern: "),
    "a pattern property": ({"type": "object", "patternProperties": {"^.{0,1000}$": {"type": "integer"}}},
                           "at #/patternProperties: "),
}


@pytest.mark.parametrize("name", BAD_SCHEMAS)
def test_a_schema_no_request_could_follow_is_a_400_before_admission(name):
    schema, says = BAD_SCHEMAS[name]
    where = "response_format.json_schema.schema"
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    for stream in (False, True):  # streamed chat answered 200 and an error event
        chat = {"model": "gpt-oss", "messages": [{"role": "user", "content": "hi"}], "stream": stream,
                "response_format": response_format}
        assert_400(post("/v1/chat/completions", chat), where, f"{where}: {says}")
    assert_400(post("/v1/completions", {"model": "gpt-oss", "prompt": "hi", "response_format": response_format}),
               where, f"{where}: {says}")
    text = {"format": {"type": "json_schema", "name": "x", "schema": schema}}
    assert_400(post("/v1/responses", {"model": "gpt-oss", "input": "hi", "text": text, "stream": True}), "text",
               f"text.format.schema: {says}")
    # a tool's parameters, where a call of the tool is held to them
    chat = {"model": "gpt-oss", "messages": [{"role": "user", "content": "hi"}], "tools": [tool(schema)],
            "tool_choice": "required"}
    assert_400(post("/v1/chat/completions", chat), "tools[0].function.parameters",
               f"tools[0].function.parameters: {says}")
    response = {"model": "gpt-oss", "input": "hi", "tool_choice": "required",
                "tools": [{"type": "function", "name": "f", "parameters": schema}]}
    assert_400(post("/v1/responses", response), "tools", f"tools.0.parameters: {says}")


@pytest.mark.parametrize("schema", [
    # recursion with a way out: a tree, a linked list ending in null, a self-reference among alternatives
    {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"}}},
     "required": ["v", "kids"]},
    {"$defs": {"node": {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#/$defs/node"},
                                                                            {"type": "null"}]}},
                        "required": ["next"]}}, "$ref": "#/$defs/node"},
    {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
    {"type": "array", "items": {"$ref": "#"}, "minItems": 0},
    # patterns as schemas write them
    {"type": "string", "pattern": "^(\\d{1,3}\\.){3}\\d{1,3}$"},
    {"type": "string", "pattern": "^([a-z0-9-]{1,63}\\.)+[a-z]{2,63}$"},
    {"type": "string", "pattern": f"^.{{1,{MAX_REPEAT}}}$"},
    {"type": "string", "pattern": "^(.{0,4}){0,32}$"},
    {"type": "string", "pattern": "^\\{[a-z]+\\}[{}]{2}\\p{L}{2}$"},
    {"type": "string", "maxLength": 1_000_000},
])
def test_schemas_that_can_be_followed_are_taken(schema):
    assert schema_problem(schema) is None
    assert completion_constraint({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})


def test_counted_repetitions_are_bounded_alone_and_nested():
    ok, too_many = f"a{{{MAX_REPEAT}}}", f"a{{0,{MAX_REPEAT + 1}}}"
    assert schema_problem({"pattern": ok}) is None
    assert "counts up to" in schema_problem({"pattern": too_many})
    assert schema_problem({"pattern": f"a{{{MAX_REPEAT + 1},}}"}) is not None  # at least that many
    assert schema_problem({"pattern": f"(a{{2}}){{{MAX_NESTED_REPEAT // 2}}}"}) is None
    assert "nests" in schema_problem({"pattern": f"(a{{2}}){{{MAX_NESTED_REPEAT // 2 + 1}}}"})
    assert schema_problem({"pattern": "\\{9999\\}|[{9999}]|x\\{1,9999}"}) is None  # braces as characters
    assert schema_problem({"enum": [{"pattern": "a{9999}"}]}) is None  # a value, not a schema
    assert schema_problem({"pattern": "a{" + "9" * 5000 + "}"}) is not None


def test_a_free_request_still_never_compiles_its_tools_schemas():
    # auto: the schemas are shown to the model, no call is held to them, nothing is compiled (and nothing refused)
    assert harmony_constraint(None, [tool(CYCLE)], "auto") is None
    r = post("/v1/chat/completions", {"model": "gpt-oss", "messages": [{"role": "user", "content": "hi"}],
                                      "tools": [tool(CYCLE)], "max_tokens": 2}, FakeReplicas(tokens=2, delay=0))
    assert r.status_code == 200, r.text


def probe_text(schema: dict) -> str:
    return json.dumps(schema | {"x-guidance": {**JSON_FORMAT, "lenient": False}})


def test_the_probe_compiles_against_the_tokenizer_as_the_engine_would():
    """What the schema checks would let through, the compile catches: here the checks are skipped, and the probe
    alone finds the cycle (no token allowed) and the nested repetitions (the lexer's fuel runs out a step in)."""
    assert "no JSON value matches" in constraints._probe(probe_text(CYCLE))
    assert "too complex to enforce" in constraints._probe(probe_text({"type": "string", "pattern": "(.{0,20}){0,20}"}))
    assert constraints._probe(probe_text({"type": "object", "properties": {"a": {"type": "integer"}}})) is None
    assert constraints._probe(probe_text({"type": "string", "pattern": "^(\\d{1,3}\\.){3}\\d{1,3}$"})) is None


@settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(schema=st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["#", "#/$defs/a", "#/a/0", "#/$defs/%61", "x{3}",
                                                                      "(a{9}){99}", "object", "array", "[{]"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["$ref", "$defs", "a", "type", "properties", "required", "items", "prefixItems", "anyOf",
                         "oneOf", "allOf", "minItems", "pattern", "patternProperties", "additionalProperties"]),
        inner, max_size=4), max_leaves=16))
def test_the_schema_checks_take_any_json(schema):
    problem = schema_problem(schema)
    assert problem is None or problem.startswith("at #")
