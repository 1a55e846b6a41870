"""Structured outputs and tool_choice, enforced by constrained decoding: the grammars (cluster/constraints.py), the
engine (cluster/grammar.py, the sampler; the bitmask kernel has tests/test_token_bitmask.py), and the whole path
through the OpenAI ingress in front of a real AttentionReplica and engine core (in-process, no Ray): on the random
tiny model for /v1/completions, on a tiny model scripted to reason first (tests/scripted_model.py) for chat."""

from __future__ import annotations

import asyncio
import functools
import json
import math

import httpx
import jsonschema
import pytest
import torch

from gptoss_serve.cluster import engine as engine_module
from gptoss_serve.cluster.constraints import JSON_FORMAT, completion_constraint, harmony_constraint
from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.engine_protocol import StreamItem
from gptoss_serve.cluster.grammar import GrammarCompiler, GrammarMatcher, advance, token_bitmasks
from gptoss_serve.cluster.sampling_params import SamplingParams, StructuredOutput
from gptoss_serve.deployments.admission import raise_if_error
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.attention_replica import AttentionReplica
from gptoss_serve.deployments.openai_ingress import OpenAIIngress, build_fastapi_app
from gptoss_serve.deployments.protocol import APIError
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.harmony import render_chat
from gptoss_serve.model.harmony_parser import parse_completion
from gptoss_serve.model.tokenizer import load_tokenizer
from tests.scripted_model import follow_chain
from tests.test_router_and_ingress import FakeReplicas
from tests.test_tool_calls import ReplicaHandle

# Every document of this schema is short, whatever a model writes: enums, bounded integers, at most 3 items, a string
# of at most 6 characters (36 bytes as \u escapes). Its longest document is under 300 bytes, and every token is at
# least one byte: with max_tokens 400 a document can never be cut, so each output must end with the grammar ("stop").
WEATHER = {
    "type": "object", "additionalProperties": False, "required": ["city", "unit", "days", "ok"],
    "properties": {
        "city": {"type": "object", "additionalProperties": False, "required": ["name", "country"],
                 "properties": {"name": {"enum": ["Paris", "Lyon", "Nice"]},
                                "country": {"type": "string", "maxLength": 6}}},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "array", "minItems": 1, "maxItems": 3,
                 "items": {"type": "object", "additionalProperties": False, "required": ["day", "high"],
                           "properties": {"day": {"type": "integer", "minimum": 1, "maximum": 7},
                                          "high": {"type": "integer", "minimum": -40, "maximum": 50}}}},
        "ok": {"type": "boolean"}}}
WEATHER_FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
MAX_TOKENS = 400
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["city", "unit"],
        "properties": {"city": {"enum": ["Paris", "Lyon"]}, "unit": {"enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["zone"],
        "properties": {"zone": {"type": "string", "maxLength": 5}}}}},
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "Weather in Paris, as JSON?"}]
REASONING = "The user wants JSON."


# ---- the grammars --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("response_format, param", [
    ({"type": "xml"}, "response_format.type"),
    ("json", "response_format"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": [1, 2]}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": "object"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "a"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "strin"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": "yes"}},
     "response_format.json_schema.strict"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "extra": 1}},
     "response_format.json_schema.extra"),
    ({"type": "json_object", "schema": {}}, "response_format.schema"),
])
def test_a_bad_response_format_names_the_field(response_format, param):
    for build in (completion_constraint, lambda f: harmony_constraint(f, None, None)):
        with pytest.raises(ValueError) as e:
            build(response_format)
        assert str(e.value).split(":", 1)[0] == param, e.value


def test_strict_schemas_refuse_what_is_not_enforced_and_loose_ones_ignore_it():
    schema = {"type": "object", "properties": {"d": {"type": "string", "format": "no-such-format"}}}
    with pytest.raises(ValueError, match="response_format.json_schema.schema: .*no-such-format"):
        completion_constraint({"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}})
    assert completion_constraint({"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}) is not None


@pytest.mark.parametrize("tools, tool_choice, param", [
    (TOOLS, {"type": "function", "function": {"name": "get_stock"}}, "tool_choice.function.name"),
    (TOOLS, {"type": "function"}, "tool_choice.function"),
    (TOOLS, {"type": "custom", "custom": {"name": "x"}}, "tool_choice.type"),
    (TOOLS, "sometimes", "tool_choice"),
    (None, "required", "tool_choice"),
    (None, {"type": "function", "function": {"name": "get_time"}}, "tool_choice.function.name"),
    ([*TOOLS, TOOLS[0]], "required", "tools[2].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}], "required",
     "tools[0].function.parameters"),
])
def test_a_bad_tool_choice_names_the_field(tools, tool_choice, param):
    with pytest.raises(ValueError) as e:
        harmony_constraint(None, tools, tool_choice)
    assert str(e.value).split(":", 1)[0] == param, e.value


def test_a_free_request_is_never_refused_for_its_tools_schemas():
    # a schema llguidance cannot compile, a function defined twice: harmony renders them; nothing holds a call to them
    odd = [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}, TOOLS[0], TOOLS[0]]
    assert harmony_constraint(None, odd, "auto") is None
    with pytest.raises(ValueError, match=r"^tools\[0\]\.function\.parameters: "):
        harmony_constraint(None, odd, "required")
    with pytest.raises(ValueError, match=r"^tools\[1\]\.function\.name: 'get_weather' is defined twice"):
        harmony_constraint(None, odd[1:] + [TOOLS[1]], {"type": "function", "function": {"name": "get_weather"}})
    # only get_time may be called: f's schema is never compiled
    assert harmony_constraint(None, [odd[0], TOOLS[1]], {"type": "function", "function": {"name": "get_time"}})


def test_free_requests_have_no_grammar():
    assert completion_constraint(None) is None and completion_constraint({"type": "text"}) is None
    assert harmony_constraint(None, None, None) is None and harmony_constraint({"type": "text"}, TOOLS, "auto") is None
    assert harmony_constraint(None, None, "none") is None  # no function to forbid
    for spec in (harmony_constraint(None, TOOLS, "none"), harmony_constraint(WEATHER_FORMAT, TOOLS, "required"),
                 completion_constraint({"type": "json_object"})):
        assert isinstance(spec, StructuredOutput) and spec.description


def harmony_ids(text: str) -> list[int]:
    return load_tokenizer().encode(text, allow_special=True)


def consume(spec: StructuredOutput, ids: list[int]) -> tuple[bool, bool]:
    """-> (every token accepted, the grammar finished) for these ids fed through a fresh matcher."""
    matcher = GrammarCompiler(load_tokenizer()).matcher(spec)
    for token in ids:
        advance([(matcher, token)])
        if matcher.error is not None:
            return False, False
    return True, matcher.finished


CALL = ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
        '{"city":"Lyon","unit":"celsius"}<|call|>')
ANSWER = '<|channel|>final<|message|>{"city": {"name":"Nice","country":"FR"},"unit":"celsius",' \
         '"days":[{"day":1,"high":20}],"ok":true}<|return|>'
REASONED = f"<|channel|>analysis<|message|>{REASONING}<|end|><|start|>assistant"


def test_the_harmony_grammar_and_the_parser_agree():
    """What the grammars accept is what HarmonyStreamParser reads as reasoning, content and tool calls."""
    auto = harmony_constraint(WEATHER_FORMAT, TOOLS, "auto")
    for text in (ANSWER, REASONED + ANSWER, CALL, REASONED + CALL):
        assert consume(auto, harmony_ids(text)) == (True, True), text
    assert consume(harmony_constraint(WEATHER_FORMAT, TOOLS, "none"), harmony_ids(REASONED + CALL))[0] is False
    assert consume(harmony_constraint(None, TOOLS, "required"), harmony_ids(REASONED + ANSWER))[0] is False
    named = harmony_constraint(None, TOOLS, {"type": "function", "function": {"name": "get_time"}})
    assert consume(named, harmony_ids(CALL))[0] is False
    # the reasoning is free (even to write special tokens' text), but one analysis message comes before the answer
    free = harmony_ids("<|channel|>analysis<|message|>") + load_tokenizer().encode("Say <|end|>, <|call|>") \
        + harmony_ids("<|end|><|start|>assistant" + ANSWER)
    assert consume(auto, free) == (True, True)
    assert consume(auto, harmony_ids(REASONED + REASONED + ANSWER))[0] is False

    parsed = parse_completion(harmony_ids(REASONED + CALL))
    assert parsed.reasoning_content.startswith(REASONING) and parsed.content is None and parsed.parse_error is None
    [call] = parsed.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Lyon", "unit": "celsius"}
    parsed = parse_completion(harmony_ids(REASONED + ANSWER))
    jsonschema.validate(json.loads(parsed.content), WEATHER)


def test_the_json_is_compact_or_spaced_but_never_padded():
    spec = completion_constraint({"type": "json_object"})
    ids = load_tokenizer().encode
    assert consume(spec, ids('{"a":1,"b":[1,2]}')) == (True, True)
    assert consume(spec, ids('{"a": 1, "b": [1, 2]}')) == (True, True)
    assert consume(spec, ids('{"a":  1}'))[0] is False and consume(spec, ids('{\n"a":1}'))[0] is False


# ---- the engine ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tiny_bf16):
    return load_model(tiny_bf16, dtype=torch.float32)


def weather_params(seed: int, **kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": seed,
                             "structured_output": completion_constraint(WEATHER_FORMAT), **kw})


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_the_engine_writes_documents_of_the_schema(model, async_scheduling):
    engine = LLMEngine(model, load_tokenizer(), EngineConfig(num_kv_blocks=256, max_model_len=1024,
                                                             async_scheduling=async_scheduling))
    prompt = load_tokenizer().encode("The weather:")
    for seed in range(4):
        engine.add_request(f"json-{seed}", prompt, weather_params(seed))
    # a free request beside them keeps its own sampling
    engine.add_request("free", prompt, SamplingParams(max_tokens=30, ignore_eos=True))
    texts, reasons, tokens = {}, {}, {}
    while engine.has_unfinished_requests:
        for out in engine.step():
            texts[out.request_id] = texts.get(out.request_id, "") + out.new_text
            tokens[out.request_id] = out.num_output_tokens
            reasons[out.request_id] = out.finish_reason
        # a constrained request's next mask needs its last token: no step is left in flight while one runs
        assert engine.in_flight is None or not engine.synchronous_requests
    for seed in range(4):
        assert reasons[f"json-{seed}"] == "stop", texts[f"json-{seed}"]
        jsonschema.validate(json.loads(texts[f"json-{seed}"]), WEATHER)
    assert tokens["free"] == 30 and reasons["free"] == "length"
    assert len(engine.grammars._compiled) == 1  # one schema, compiled once
    assert engine.is_idle() and not engine.synchronous_requests


def test_logprobs_are_those_of_the_constrained_distribution(model):
    engine = LLMEngine(model, load_tokenizer(), EngineConfig(num_kv_blocks=256, max_model_len=1024))
    [out] = engine.generate(["The weather:"], weather_params(0, logprobs=5))
    spec = completion_constraint(WEATHER_FORMAT)
    matcher = GrammarCompiler(load_tokenizer()).matcher(spec)
    for token, lp in zip(out.token_ids, out.logprobs):
        allowed = token_bitmasks([matcher])[0]
        allows = lambda t: int(allowed[t // 32]) >> (t % 32) & 1  # noqa: E731
        # every alternative offered is one the grammar allowed, and all of the mass lies on those
        assert all(allows(t) for t, v in lp.top if v > -math.inf)
        if sum(bin(word & 0xFFFFFFFF).count("1") for word in allowed.tolist()) == 1:  # forced: all the mass
            assert lp.logprob == 0 and lp.rank == 1
        advance([(matcher, token)])
    assert out.token_ids[0] == load_tokenizer().encode('{"')[0] and out.logprobs[0].logprob == 0  # forced


def test_max_tokens_still_ends_a_constrained_request(model):
    engine = LLMEngine(model, load_tokenizer(), EngineConfig(num_kv_blocks=256, max_model_len=1024))
    [out] = engine.generate(["The weather:"], weather_params(3, max_tokens=5))
    assert out.finish_reason == "length" and len(out.token_ids) == 5 and out.text.startswith('{"city')


def test_a_grammar_that_does_not_compile_is_refused_when_added(model):
    engine = LLMEngine(model, load_tokenizer(), EngineConfig(num_kv_blocks=64, max_model_len=256))
    bad = StructuredOutput(grammar="start: <|no-such-token|>", description="broken")
    with pytest.raises(ValueError, match="broken"):
        engine.add_request("r", [1, 2, 3], SamplingParams(structured_output=bad))
    assert not engine.requests and not engine.synchronous_requests


def test_the_grammar_cache_holds_no_more_text_than_its_budget():
    # compiled grammars hold ~130 times their text: the cache is bounded by the bytes of text as well as by count
    compiler = GrammarCompiler(load_tokenizer(), cache_size=100, cache_bytes=3000)
    specs = [completion_constraint({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"key_{i}_{j}": {"type": "integer"} for j in range(20)}}}}) for i in range(6)]
    for spec in specs:
        compiler.matcher(spec)
    kept = list(compiler._compiled)
    assert 0 < len(kept) < len(specs) and kept == [s.grammar for s in specs][-len(kept):]
    assert compiler._cached_bytes == sum(map(len, kept)) <= 3000
    compiler.matcher(specs[-1])  # a hit compiles nothing new
    assert list(compiler._compiled) == kept


def test_a_grammar_that_fails_mid_generation_ends_its_request_as_the_clients_fault(model, monkeypatch):
    # llguidance can give up on a token its own mask allowed (its lexer's budget, say): the same request would fail
    # again, so it is a 400 about the structured output, not a 503 "retry"; the free request beside it goes on
    engine = LLMEngine(model, load_tokenizer(), EngineConfig(num_kv_blocks=256, max_model_len=1024))
    real_advance = engine_module.advance

    def advance_counting(pairs):
        real_advance(pairs)
        for matcher, _ in pairs:
            matcher.advanced = getattr(matcher, "advanced", 0) + 1

    monkeypatch.setattr(engine_module, "advance", advance_counting)
    monkeypatch.setattr(GrammarMatcher, "error", property(
        lambda self: "lexer budget exceeded" if getattr(self, "advanced", 0) >= 3 else None))
    prompt = load_tokenizer().encode("The weather:")
    engine.add_request("json", prompt, weather_params(0))
    engine.add_request("free", prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    ends = {}
    while engine.has_unfinished_requests:
        for out in engine.step():
            if out.finished:
                ends[out.request_id] = out
    failed = ends["json"]
    assert failed.finish_reason == "error" and failed.error_status == 400 and failed.num_output_tokens == 3
    assert failed.error.startswith("structured_output: its grammar could not go on after output token 3: lexer")
    assert ends["free"].finish_reason == "length" and ends["free"].error is None
    assert engine.is_idle() and not engine.synchronous_requests
    for format_param in ("response_format", "text"):
        with pytest.raises(APIError) as caught:
            raise_if_error([StreamItem("json", error=failed.error, status=failed.error_status)], format_param)
        assert (caught.value.status, caught.value.param) == (400, format_param)


# ---- through the ingress -------------------------------------------------------------------------------------------

def build_random(path: str):
    """The engine core's engine: the random tiny model."""
    return LLMEngine(load_model(path, dtype=torch.float32), load_tokenizer(),
                     EngineConfig(num_kv_blocks=512, max_model_len=1024)), None


def build_reasoning(path: str):
    """The tiny model scripted to open with an analysis message (REASONING), then to say anything at all: after
    that, all it writes is what a grammar makes of nearly uniform logits."""
    tokenizer = load_tokenizer()
    model = load_model(path, dtype=torch.float32)
    prompt = render_chat(MESSAGES, tools=TOOLS)  # every chat prompt ends with <|start|>assistant
    follow_chain(model, [prompt[-1], *harmony_ids(f"<|channel|>analysis<|message|>{REASONING}<|end|>")])
    return LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=512, max_model_len=1024)), None


@pytest.fixture(scope="module")
def random_replica(tiny_bf16):
    replica = AttentionReplica(AppArgs(), build=functools.partial(build_random, str(tiny_bf16)))
    yield replica
    replica.core.shutdown()


@pytest.fixture(scope="module")
def reasoning_replica(tiny_bf16):
    replica = AttentionReplica(AppArgs(), build=functools.partial(build_reasoning, str(tiny_bf16)))
    yield replica
    replica.core.shutdown()


def post_all(handle, path: str, bodies: list[dict]) -> list[httpx.Response]:
    app = build_fastapi_app(OpenAIIngress(handle, AppArgs()))

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress", timeout=300) as client:
            return await asyncio.gather(*(client.post(path, json=body) for body in bodies))

    return asyncio.run(main())


def test_completions_follow_a_json_schema_for_20_seeds(random_replica):
    bodies = [{"model": "gpt-oss", "prompt": "Tomorrow's weather as JSON:", "max_tokens": MAX_TOKENS,
               "temperature": 1, "seed": seed, "response_format": WEATHER_FORMAT} for seed in range(20)]
    texts = set()
    for r in post_all(ReplicaHandle(random_replica), "/v1/completions", bodies):
        assert r.status_code == 200, r.text
        [choice] = r.json()["choices"]
        assert choice["finish_reason"] == "stop", choice  # never cut: see WEATHER
        jsonschema.validate(json.loads(choice["text"]), WEATHER)
        texts.add(choice["text"])
    assert len(texts) == 20  # the seeds drew 20 different documents: the model chose, the grammar only held it


def chat(**extra) -> dict:
    return {"model": "gpt-oss", "messages": MESSAGES, "tools": TOOLS, "max_tokens": MAX_TOKENS, "temperature": 1,
            **extra}


def test_chat_holds_the_final_channel_to_the_schema_and_leaves_the_reasoning_free(reasoning_replica):
    # tool_choice none: the tools are shown to the model, but the answer may not be a call
    bodies = [chat(seed=seed, response_format=WEATHER_FORMAT, tool_choice="none", stream=seed % 2 == 1)
              for seed in range(4)]
    for seed, r in enumerate(post_all(ReplicaHandle(reasoning_replica), "/v1/chat/completions", bodies)):
        assert r.status_code == 200, r.text
        if seed % 2:  # streamed: the deltas add up to the same message
            chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: {")]
            deltas = [c["choices"][0] for c in chunks if c["choices"]]
            message = {"reasoning": "".join(d["delta"].get("reasoning", "") for d in deltas),
                       "content": "".join(d["delta"].get("content") or "" for d in deltas)}
            finish = deltas[-1]["finish_reason"]
        else:
            [choice] = r.json()["choices"]
            message, finish = choice["message"], choice["finish_reason"]
            assert "tool_calls" not in message
        assert message["reasoning"] == REASONING  # the model's own words, unconstrained
        jsonschema.validate(json.loads(message["content"]), WEATHER)
        assert finish == "stop"


def tool_call(r: httpx.Response) -> tuple[str, dict]:
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["content"] is None and choice["message"]["reasoning"] == REASONING
    [call] = choice["message"]["tool_calls"]
    return call["function"]["name"], json.loads(call["function"]["arguments"])


def test_tool_choice_required_and_named_make_a_call_with_valid_arguments(reasoning_replica):
    named = {"type": "function", "function": {"name": "get_time"}}
    bodies = [chat(seed=seed, tool_choice="required") for seed in range(6)] + [chat(seed=0, tool_choice=named)]
    responses = post_all(ReplicaHandle(reasoning_replica), "/v1/chat/completions", bodies)
    for r in responses:
        name, arguments = tool_call(r)
        jsonschema.validate(arguments, PARAMETERS[name])
    assert tool_call(responses[-1])[0] == "get_time"
    # without tool_choice the model, done reasoning, writes anything at all: it calls nothing by itself
    [free] = post_all(ReplicaHandle(reasoning_replica), "/v1/chat/completions", [chat(seed=0, max_tokens=30)])
    assert free.json()["choices"][0]["finish_reason"] == "length"


# a property whose schema is a $ref cycle: llguidance compiles it, and the grammar matches nothing
CYCLIC = {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "required": ["x"],
          "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}


def test_a_schema_the_engine_could_never_follow_is_a_400_before_it_reaches_the_engine(random_replica,
                                                                                       reasoning_replica):
    """What the engine makes of it: the grammar forces `{"x": ` and then allows no token at all, so every request
    failed there, 'retry' (a 503; streamed chat, a 200 and an error event). The ingress refuses it first."""
    matcher = GrammarCompiler(load_tokenizer()).matcher(StructuredOutput(
        grammar=f"start: %json {json.dumps(CYCLIC | {'x-guidance': JSON_FORMAT})}", description="cyclic"))
    forced = []
    for _ in range(10):
        allowed = token_bitmasks([matcher])[0]
        tokens = [32 * w + b for w, word in enumerate(allowed.tolist()) if word for b in range(32) if word >> b & 1]
        if matcher.error is not None:
            break
        assert len(tokens) == 1, tokens  # one way forward at each step ...
        forced += tokens
        advance([(matcher, tokens[0])])
    assert load_tokenizer().decode(forced) == '{"x": ' and matcher.error is not None  # ... into a dead end
    response_format = {"type": "json_schema", "json_schema": {"name": "c", "schema": CYCLIC}}
    param = "response_format.json_schema.schema"
    [r] = post_all(ReplicaHandle(random_replica), "/v1/completions", [
        {"model": "gpt-oss", "prompt": "x", "max_tokens": 20, "response_format": response_format}])
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert "$ref cycle" in r.json()["error"]["message"]
    [r] = post_all(ReplicaHandle(reasoning_replica), "/v1/chat/completions", [
        chat(seed=0, stream=True, response_format=response_format, tool_choice="none")])
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# ---- 400s, and what clients send by default -------------------------------------------------------------------------

def fake_post(path: str, body: dict) -> httpx.Response:
    return post_all(FakeReplicas(tokens=2, delay=0), path, [body])[0]


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "response_format.type"),
    ("/v1/completions", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"frobnicate": True}, "frobnicate"),
    ("/v1/completions", {"guided_json": {"type": "object"}}, "guided_json"),
    ("/v1/chat/completions", {"logit_bias": {"50256": -100}}, "logit_bias"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/chat/completions",
     {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}, "stream_options"),
    ("/v1/chat/completions", {"stream_options": {"include_usag": True}}, "stream_options"),
])
def test_unknown_or_unsupported_fields_are_400s_naming_them(path, extra, param):
    base = {"model": "gpt-oss", "max_tokens": 3}
    base |= {"messages": MESSAGES} if "chat" in path else {"prompt": "hi"}
    r = fake_post(path, base | extra)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(param), error


@pytest.mark.parametrize("path, extra", [
    # fields of OpenAI's that change nothing here, at their no-op values where they have one
    ("/v1/chat/completions", {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
                              "parallel_tool_calls": False, "prediction": None, "logit_bias": {},
                              "modalities": ["text"], "prompt_cache_key": "k", "safety_identifier": "s",
                              "tools": TOOLS, "tool_choice": "auto"}),
    ("/v1/completions", {"user": "u1", "logit_bias": None, "best_of": 1, "suffix": None}),
    # what AIPerf sends by default (its chat and completions payloads), and genai-perf's extras
    ("/v1/chat/completions", {"stream": True, "stream_options": {"include_usage": True}, "max_completion_tokens": 3}),
    ("/v1/completions", {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": False},
                         "prompt": ["a", "b"], "ignore_eos": True, "min_tokens": 1}),
    ("/v1/completions", {"response_format": {"type": "text"}}),
])
def test_fields_that_change_nothing_are_accepted(path, extra):
    base = {"model": "gpt-oss", "max_tokens": 3}
    base |= {"messages": MESSAGES} if "chat" in path else {"prompt": "hi"}
    r = fake_post(path, base | extra)
    assert r.status_code == 200, r.text


def test_the_openai_client_sends_structured_outputs_we_accept():
    openai = pytest.importorskip("openai")
    from pydantic import BaseModel

    class Weather(BaseModel):
        city: str
        high: int

    from openai.lib._parsing._completions import type_to_response_format_param

    app = build_fastapi_app(OpenAIIngress(FakeReplicas(tokens=2, delay=0), AppArgs()))

    async def main():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress/v1")
        client = openai.AsyncOpenAI(api_key="x", base_url="http://ingress/v1", http_client=http)
        return await client.chat.completions.create(
            model="gpt-oss", messages=MESSAGES, max_completion_tokens=3, user="u", metadata={"a": "b"}, store=False,
            response_format=type_to_response_format_param(Weather), tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False)

    completion = asyncio.run(main())
    assert completion.choices[0].finish_reason is not None


def test_a_grammar_that_could_go_on_ends_at_a_stop_token(tiny_bf16):
    """A number may always take one more digit: once it is whole the grammar also allows <|return|> (its EOS, a stop
    token), which ends the request. The model is scripted to write 12 and then <|return|>."""
    tokenizer = load_tokenizer()
    model = load_model(tiny_bf16, dtype=torch.float32)
    prompt = tokenizer.encode("A number:")
    follow_chain(model, [prompt[-1], *tokenizer.encode("12"), tokenizer.return_token_id])
    engine = LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=64, max_model_len=256))
    spec = completion_constraint({"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "integer", "minimum": 0, "maximum": 99999}}})
    [out] = engine.generate([prompt], SamplingParams(max_tokens=20, structured_output=spec))
    assert out.finish_reason == "stop" and out.text == "12"
    assert out.token_ids == [*tokenizer.encode("12"), tokenizer.return_token_id]
