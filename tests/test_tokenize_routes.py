"""vLLM's extras, in-process (no Ray): POST /tokenize and /detokenize (their ids are those the generating routes send
to the engine), GET /version, and chat's include_reasoning (the reasoning left out of the answer, not out of the
prompt or the generation). A stand-in engine records the requests it gets and answers with harmony tokens."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json

import httpx
import httpx2
import openai
import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.deployments.args import API_KEYS_ENV, AppArgs
from gptoss_serve.deployments.openai_ingress import OpenAIIngress, build_fastapi_app
from gptoss_serve.model.harmony import render_chat
from gptoss_serve.model.tokenizer import load_tokenizer
from tests.responses_cases import ANSWER
from tests.test_off_loop import BIG, while_posting
from tests.test_responses_api import HarmonyReplicas
from tests.test_router_and_ingress import FakeReplicas

MODEL = "gpt-oss"
tokenizer = load_tokenizer()
HEADER = tokenizer.encode("<|start|>assistant", allow_special=True)  # what a chat prompt ends with
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CALLED = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
          {"role": "assistant", "reasoning_content": "Call the tool.", "content": None, "tool_calls": [
              {"id": "call_1", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
          {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}]
# (messages, the chat fields that change the rendering)
CHATS = [
    ([{"role": "user", "content": "hi"}], {}),
    ([{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hello <|end|> there"},
      {"role": "assistant", "reasoning_content": "Greet back.", "content": "Bonjour !"},
      {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "text", "text": "again"}]}],
     {"reasoning_effort": "low"}),
    (CALLED, {"tools": TOOLS, "reasoning_effort": "high"}),
    # long enough to be spliced (harmony_splice) and rendered on a thread (off_loop.QUICK_CHARS)
    ([{"role": "user", "content": "All work and no play. " * 3000}], {}),
]


class TextReplicas(FakeReplicas):
    """FakeReplicas (text outputs, for /v1/completions) that keep the requests they get."""

    def __init__(self) -> None:
        super().__init__(tokens=1, delay=0)
        self.requests: list = []

    def _generate_batch(self, requests):
        self.requests += requests
        return super()._generate_batch(requests)


def app_for(replicas=None, args: AppArgs | None = None):
    return build_fastapi_app(OpenAIIngress(replicas or HarmonyReplicas(), args or AppArgs()))


def call(app, method: str, path: str, body=None, headers: dict | None = None) -> httpx.Response:
    """body: JSON, or a str sent as it is (JSON that Python's encoder would not write)."""
    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
            if isinstance(body, str):
                return await client.request(method, path, content=body.encode(), headers={
                    "content-type": "application/json", **(headers or {})})
            return await client.request(method, path, json=body, headers=headers)

    return asyncio.run(main())


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(response: httpx.Response, status: int, param: str | None, says: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and says in error["message"], error
    return error


# ---- /tokenize: a text --------------------------------------------------------------------------------------------

def test_a_text_tokenizes_as_completions_sends_it():
    replicas = TextReplicas()
    app = app_for(replicas)
    for text in ["Hello world", "The <|start|> of something<|return|>", "😀 漢字\n\n  tabs\t", ""]:
        body = ok(call(app, "POST", "/tokenize", {"model": MODEL, "prompt": text}))
        # special-token text stays text, and nothing (no BOS) is added: o200k_harmony has none
        assert body["tokens"] == tokenizer.encode(text) and body["count"] == len(body["tokens"])
        assert body["max_model_len"] == 131072 and body["token_strs"] is None
        assert ok(call(app, "POST", "/tokenize", {"prompt": text, "add_special_tokens": False}))["tokens"] == \
            body["tokens"]
        if text:  # what /v1/completions gives the engine for the same text
            ok(call(app, "POST", "/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1}))
            assert replicas.requests[-1].prompt_token_ids == body["tokens"]


def test_token_strs_are_hf_byte_level_strings():
    body = ok(call(app_for(), "POST", "/tokenize", {"model": MODEL, "prompt": "Hello world\n😀",
                                                    "return_token_strs": True}))
    byte_level = bytes_to_unicode()  # what transformers' TikTokenConverter names gpt-oss's tokens with
    expected = ["".join(byte_level[b] for b in tokenizer.decode_bytes([t])) for t in body["tokens"]]
    assert body["token_strs"] == expected and body["token_strs"][:2] == ["Hello", "Ġworld"]
    assert len(body["token_strs"]) == body["count"]
    chat = ok(call(app_for(), "POST", "/tokenize", {"messages": [{"role": "user", "content": "hi"}],
                                                    "return_token_strs": True}))
    assert chat["token_strs"][0] == "<|start|>" and chat["token_strs"][-2:] == ["<|start|>", "assistant"]


def test_max_model_len_is_the_servers_limit():
    tokenize = {"prompt": "hi"}
    assert ok(call(app_for(args=AppArgs(max_prompt_tokens=1000)), "POST", "/tokenize", tokenize))[
        "max_model_len"] == 1000
    engine_limited = AppArgs(engine=EngineConfig(max_model_len=4096))
    assert ok(call(app_for(args=engine_limited), "POST", "/tokenize", tokenize))["max_model_len"] == 4096
    # a prompt past the limit is refused as the generating routes refuse it
    small = app_for(args=AppArgs(max_prompt_tokens=5))
    assert_error(call(small, "POST", "/tokenize", {"prompt": "one two three four five six"}), 400, "prompt",
                 "limit of 5")
    assert_error(call(small, "POST", "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}), 400,
                 "messages", "limit of 5")


# ---- /tokenize: a chat --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("messages, fields", CHATS)
def test_a_chat_tokenizes_as_the_chat_route_renders_it(messages, fields):
    replicas = HarmonyReplicas(lambda prompt: "<|channel|>final<|message|>ok<|return|>")
    app = app_for(replicas)
    body = ok(call(app, "POST", "/tokenize", {"model": MODEL, "messages": messages, **fields}))
    assert body["tokens"] == render_chat(messages, **fields) and body["count"] == len(body["tokens"])
    # and what the engine gets from /v1/chat/completions for the same messages and fields
    ok(call(app, "POST", "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 4, **fields}))
    assert replicas.requests[-1].prompt_token_ids == body["tokens"]
    # add_special_tokens adds nothing (no BOS); add_generation_prompt is the default
    again = {"messages": messages, "add_special_tokens": True, "add_generation_prompt": True, **fields}
    assert ok(call(app, "POST", "/tokenize", again))["tokens"] == body["tokens"]


@pytest.mark.parametrize("messages, fields", CHATS[:3])
def test_without_the_generation_prompt_the_prompt_lacks_the_assistants_header(messages, fields):
    body = ok(call(app_for(), "POST", "/tokenize", {"messages": messages, "add_generation_prompt": False, **fields}))
    assert body["tokens"] + HEADER == render_chat(messages, **fields)
    assert body["tokens"][-1] == tokenizer.end_token_id  # every message closed, none opened


def test_continue_final_message_leaves_the_assistants_message_open():
    history = [{"role": "user", "content": "hi"}]
    app = app_for()

    def continued(last: dict, **fields) -> list[int]:
        return ok(call(app, "POST", "/tokenize", {"messages": history + [last], "continue_final_message": True,
                                                  **fields}))["tokens"]

    prompt = render_chat(history)  # the chat route's prompt for the earlier messages, header included
    assert continued({"role": "assistant", "content": "Hel"}) == \
        prompt + tokenizer.encode("<|channel|>final<|message|>Hel", allow_special=True)
    # as the model writes a turn: its reasoning closed, then its answer so far
    assert continued({"role": "assistant", "reasoning_content": "Greet.", "content": "Hel"},
                     add_generation_prompt=False) == prompt + tokenizer.encode(
        "<|channel|>analysis<|message|>Greet.<|end|><|start|>assistant<|channel|>final<|message|>Hel",
        allow_special=True)
    # reasoning alone is continued on the analysis channel; empty content starts the final answer
    assert continued({"role": "assistant", "reasoning": [{"type": "text", "text": "Hmm"}]}) == \
        prompt + tokenizer.encode("<|channel|>analysis<|message|>Hmm", allow_special=True)
    assert continued({"role": "assistant", "content": ""}) == \
        prompt + tokenizer.encode("<|channel|>final<|message|>", allow_special=True)
    # ids /v1/completions takes as they are, for the model to go on with the answer
    replicas = TextReplicas()
    ids = continued({"role": "assistant", "content": "Hel"})
    ok(call(app_for(replicas), "POST", "/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 1}))
    assert replicas.requests[-1].prompt_token_ids == ids
    # the same tools and effort as the chat route's prompt
    open_final = tokenizer.encode("<|channel|>final<|message|>x", allow_special=True)
    assert continued({"role": "assistant", "content": "x"}, tools=TOOLS, reasoning_effort="low") == \
        render_chat(history, tools=TOOLS, reasoning_effort="low") + open_final


def test_continuations_the_format_cannot_make_are_400s_naming_the_field():
    app = app_for()
    user = [{"role": "user", "content": "hi"}]

    def tokenize(messages, **fields):
        return call(app, "POST", "/tokenize", {"messages": messages, "continue_final_message": True, **fields})

    assert_error(tokenize(user, add_generation_prompt=True), 400, "continue_final_message", "add_generation_prompt")
    assert_error(tokenize(user), 400, "continue_final_message", "must be an assistant message")
    assert_error(tokenize(CALLED[:3]), 400, "continue_final_message", "tool_calls")
    assert_error(tokenize(user + [{"role": "assistant", "content": None}]), 400, "messages[1].content")
    assert_error(tokenize(user + [{"role": "assistant", "content": [{"type": "image_url"}]}]), 400,
                 "messages[1].content[0].type")
    # the earlier messages are checked as the chat route checks them
    assert_error(tokenize([{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]), 400,
                 "messages[0].role")


def test_tokenize_checks_its_body_as_the_other_routes_do():
    app = app_for(args=AppArgs(max_tools=1, max_request_bytes=4096))
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert_error(call(app, "POST", "/tokenize", {"prompt": "x", "messages": chat["messages"]}), 400, "prompt")
    assert_error(call(app, "POST", "/tokenize", {}), 400, "prompt", "Field required")
    assert_error(call(app, "POST", "/tokenize", [1, 2]), 400, None, "JSON object")
    assert_error(call(app, "POST", "/tokenize", {**chat, "chat_template": "{{ x }}"}), 400, "chat_template",
                 "unknown field")
    assert_error(call(app, "POST", "/tokenize", {"prompt": "x", "add_generation_prompt": False}), 400,
                 "add_generation_prompt", "unknown field")
    assert_error(call(app, "POST", "/tokenize", {**chat, "reasoning_effort": "max"}), 400, "reasoning_effort")
    assert_error(call(app, "POST", "/tokenize", {**chat, "tools": TOOLS * 2}), 400, "tools", "limit of 1")
    assert_error(call(app, "POST", "/tokenize", {**chat, "tools": [{"type": "web_search"}]}), 400, "tools")
    assert_error(call(app, "POST", "/tokenize", '{"prompt": "a\\ud800"}'), 400, "prompt", "Unicode")
    assert_error(call(app, "POST", "/tokenize", '{"messages": [{"role": "user", "content": "\\udc00"}]}'), 400,
                 "messages", "messages.0.content")
    assert_error(call(app, "POST", "/tokenize", {"prompt": " " * 70_000}), 413, None)
    assert_error(call(app_for(), "POST", "/tokenize", {"prompt": "a" + " " * 70_000}), 400, "prompt",
                 "whitespace")


def test_a_prompt_that_cannot_fit_is_refused_without_holding_the_loop():
    app = app_for()
    for body, param in [({"prompt": BIG}, "prompt"), ({"messages": [{"role": "user", "content": BIG}]}, "messages"),
                        ({"messages": [{"role": "assistant", "content": BIG}], "continue_final_message": True},
                         "messages")]:
        answer, latest = asyncio.run(while_posting(app, "/tokenize", body))
        assert_error(answer, 400, param, "at least")
        # reading the 16 MB body takes the loop a few tenths of a second (more on a loaded 2-core machine); rendering
        # its 2.7M tokens would take it many seconds
        assert latest < 2.0, (param, latest)


# ---- /detokenize --------------------------------------------------------------------------------------------------

def test_detokenize_gives_the_text_back():
    app = app_for()
    for text in ["Hello world", "😀 漢字\n\n  tabs\t", "The <|start|> of it", ""]:
        ids = ok(call(app, "POST", "/tokenize", {"model": MODEL, "prompt": text}))["tokens"]
        assert ok(call(app, "POST", "/detokenize", {"model": MODEL, "tokens": ids})) == {"prompt": text}
    # a chat's ids: harmony's text, special tokens by name
    ids = ok(call(app, "POST", "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}))["tokens"]
    text = ok(call(app, "POST", "/detokenize", {"tokens": ids}))["prompt"]
    assert text.startswith("<|start|>system<|message|>") and text.endswith("<|start|>user<|message|>hi<|end|>"
                                                                            "<|start|>assistant")
    # a character cut between ids: U+FFFD, as the other routes decode it
    emoji = tokenizer.encode("🦜")
    assert len(emoji) > 1 and ok(call(app, "POST", "/detokenize", {"tokens": emoji[:1]}))["prompt"] == "\ufffd"


@pytest.mark.parametrize("tokens", [[-1], [1, tokenizer.vocab_size], [2**40]])
def test_ids_outside_the_vocabulary_are_a_400_naming_tokens(tokens):
    assert_error(call(app_for(), "POST", "/detokenize", {"model": MODEL, "tokens": tokens}), 400, "tokens",
                 f"[0, {tokenizer.vocab_size})")


@pytest.mark.parametrize("tokens", [[True], ["1"], [1.5], None, 7])
def test_tokens_that_are_not_integers_are_a_400_naming_tokens(tokens):
    assert_error(call(app_for(), "POST", "/detokenize", {"tokens": tokens}), 400, "tokens")


# ---- the model, keys, /version ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body", [("/tokenize", {"prompt": "hi"}),
                                        ("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}),
                                        ("/detokenize", {"tokens": [1]})])
def test_an_unknown_model_is_a_404_and_none_is_the_served_one(path, body):
    app = app_for()
    error = assert_error(call(app, "POST", path, {**body, "model": "gpt-4o"}), 404, "model", "does not exist")
    assert error["type"] == "not_found_error" and error["code"] == "model_not_found"
    assert call(app, "POST", path, body).status_code == 200  # vLLM's routes may leave the model out
    assert call(app, "POST", path, {**body, "model": MODEL}).status_code == 200


def test_the_routes_need_a_key_when_keys_are_set(monkeypatch):
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    app = app_for(args=AppArgs(api_keys=["k-one"]))
    for method, path, body in [("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [1]}),
                               ("GET", "/version", None), ("HEAD", "/version", None)]:
        assert call(app, method, path, body).status_code == 401
        assert call(app, method, path, body, {"Authorization": "Bearer wrong"}).status_code == 401
        assert call(app, method, path, body, {"Authorization": "Bearer k-one"}).status_code == 200


def test_version_is_the_packages():
    app = app_for()
    assert ok(call(app, "GET", "/version")) == {"version": importlib.metadata.version("gptoss-serve")}
    head = call(app, "HEAD", "/version")
    assert head.status_code == 200 and head.content == b""


def test_the_openapi_document_shows_the_new_routes():
    document = ok(call(app_for(), "GET", "/openapi.json"))
    paths, schemas = document["paths"], document["components"]["schemas"]
    tokenize = paths["/tokenize"]["post"]
    assert tokenize["requestBody"]["content"]["application/json"]["schema"] == {"anyOf": [
        {"$ref": "#/components/schemas/TokenizeCompletionRequest"},
        {"$ref": "#/components/schemas/TokenizeChatRequest"}]}
    assert set(schemas["TokenizeCompletionRequest"]["properties"]) == {"model", "prompt", "add_special_tokens",
                                                                       "return_token_strs"}
    assert {"messages", "add_generation_prompt", "continue_final_message", "tools", "reasoning_effort"} <= set(
        schemas["TokenizeChatRequest"]["properties"])
    assert tokenize["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TokenizeResponse"}
    assert set(schemas["TokenizeResponse"]["properties"]) == {"count", "max_model_len", "tokens", "token_strs"}
    assert paths["/detokenize"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/DetokenizeRequest"}
    assert set(schemas["DetokenizeResponse"]["properties"]) == {"prompt"}
    assert set(paths["/version"]) == {"get"} and "VersionResponse" in schemas
    assert "include_reasoning" in schemas["ChatCompletionRequest"]["properties"]
    assert all("422" not in op["responses"] for path in ("/tokenize", "/detokenize", "/version")
               for op in paths[path].values())


# ---- chat's include_reasoning -------------------------------------------------------------------------------------

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}


def sse_chunks(response: httpx.Response) -> list[dict]:
    lines = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [choice for event in map(json.loads, lines[:-1]) for choice in event["choices"]]


def test_include_reasoning_false_leaves_the_reasoning_out_of_the_answer():
    replicas = HarmonyReplicas()  # answers ANSWER: analysis, then a final answer
    app = app_for(replicas)
    shown = ok(call(app, "POST", "/v1/chat/completions", CHAT))["choices"][0]["message"]
    assert shown["reasoning_content"] == shown["reasoning"] == "User greets." and shown["content"] == "Hello there!"
    hidden = ok(call(app, "POST", "/v1/chat/completions", {**CHAT, "include_reasoning": False}))
    message = hidden["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Hello there!"}
    assert hidden["choices"][0]["finish_reason"] == "stop"
    # the engine reasoned all the same: the same prompt, the same tokens generated
    first, second = replicas.requests
    assert first.prompt_token_ids == second.prompt_token_ids and first.params == second.params
    assert hidden["usage"]["completion_tokens"] == len(tokenizer.encode(ANSWER, allow_special=True))


def test_include_reasoning_false_streams_no_reasoning_delta():
    app = app_for()
    shown = sse_chunks(call(app, "POST", "/v1/chat/completions", {**CHAT, "stream": True}))
    assert "".join(c["delta"].get("reasoning_content", "") for c in shown) == "User greets."
    hidden = sse_chunks(call(app, "POST", "/v1/chat/completions", {**CHAT, "stream": True,
                                                                    "include_reasoning": False}))
    assert not any("reasoning" in c["delta"] or "reasoning_content" in c["delta"] for c in hidden)
    assert all(c["delta"] for c in hidden if c["finish_reason"] is None)  # no empty chunk for a reasoning delta
    assert hidden[0]["delta"] == {"role": "assistant"}
    assert "".join(c["delta"].get("content", "") for c in hidden) == "Hello there!"
    assert hidden[-1]["finish_reason"] == "stop"


def test_include_reasoning_must_be_a_boolean():
    assert_error(call(app_for(), "POST", "/v1/chat/completions", {**CHAT, "include_reasoning": "maybe"}), 400,
                 "include_reasoning")


# ---- the official client ------------------------------------------------------------------------------------------

def client_for(replicas: HarmonyReplicas) -> openai.AsyncOpenAI:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app_for(replicas)), base_url="http://ingress")
    return openai.AsyncOpenAI(base_url="http://ingress/v1", api_key="none", http_client=http, max_retries=0,
                              _strict_response_validation=True)


def test_the_openai_client_reaches_it_all():
    async def main():
        replicas = HarmonyReplicas()
        client = client_for(replicas)
        # no tokenize method: its generic post, at vLLM's path outside /v1
        tokenized = await client.post("http://ingress/tokenize", cast_to=object,
                                      body={"model": MODEL, "messages": CHAT["messages"], "return_token_strs": True})
        assert tokenized["tokens"] == render_chat(CHAT["messages"]) and len(tokenized["token_strs"]) == \
            tokenized["count"]
        text = await client.post("http://ingress/detokenize", cast_to=object,
                                 body={"model": MODEL, "tokens": tokenized["tokens"]})
        assert text["prompt"].endswith("<|start|>assistant")
        assert (await client.get("http://ingress/version", cast_to=object))["version"] == \
            importlib.metadata.version("gptoss-serve")
        with pytest.raises(openai.NotFoundError):
            await client.post("http://ingress/tokenize", cast_to=object, body={"model": "other", "prompt": "x"})
        with pytest.raises(openai.BadRequestError):
            await client.post("http://ingress/detokenize", cast_to=object, body={"tokens": [-5]})

        answer = await client.chat.completions.create(model=MODEL, messages=CHAT["messages"],
                                                      extra_body={"include_reasoning": False})
        assert answer.choices[0].message.content == "Hello there!"
        assert "reasoning_content" not in answer.choices[0].message.model_dump()
        assert replicas.requests[-1].prompt_token_ids == tokenized["tokens"]  # what /tokenize said
        stream = await client.chat.completions.create(model=MODEL, messages=CHAT["messages"], stream=True,
                                                      extra_body={"include_reasoning": False})
        chunks = [chunk async for chunk in stream]
        deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
        assert "".join(d["content"] or "" for d in deltas) == "Hello there!"
        assert not any("reasoning_content" in d for d in deltas)
        reasoned = await client.chat.completions.create(model=MODEL, messages=CHAT["messages"])
        assert reasoned.choices[0].message.model_dump()["reasoning_content"] == "User greets."

    asyncio.run(main())
