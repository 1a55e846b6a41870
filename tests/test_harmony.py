"""model/harmony.py: chat rendering and stream parsing through openai_harmony, offline."""

from __future__ import annotations

import os
import random

import pytest
import tiktoken.load

import gptoss_serve.model.harmony as hm
import gptoss_serve.model.tokenizer as tk
from gptoss_serve.model.harmony import render_chat
from gptoss_serve.model.harmony_parser import HarmonyDelta, HarmonyOutput, HarmonyStreamParser, parse_completion

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Gets the current weather.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}


def _no_download(url, expected_hash=None):
    raise OSError("network unreachable (test)")


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """Vocabulary only from bpe-openai into a temp cache; downloading fails loudly."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-cache")))
        mp.setenv("GPTOSS_CACHE_DIR", str(tmp_path_factory.mktemp("ours")))
        mp.setattr(tiktoken.load, "read_file_cached", _no_download)
        tk.clear_caches()
        hm.load_encoding.cache_clear()
        yield
    tk.clear_caches()


@pytest.fixture(scope="module")
def tok():
    return tk.load_tokenizer()


def _text(ids: list[int]) -> str:
    return tk.load_tokenizer().decode(ids)


# --------------------------------------------------------------------------- rendering


def test_load_encoding_restores_the_environment():
    hm.load_encoding.cache_clear()
    before = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    hm.load_encoding()
    assert os.environ.get("TIKTOKEN_ENCODINGS_BASE") == before


def test_harmony_and_our_tokenizer_agree(tok):
    text = "Grüße 🤖 — <|return|> tokens\n\n  x"
    assert hm.load_encoding().encode(text, disallowed_special=()) == tok.encode(text)


def test_stop_token_ids():
    assert hm.stop_token_ids() == [200002, 200012]


def test_render_basic_chat(tok):
    ids = render_chat(
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there"}],
        reasoning_effort="high",
        conversation_start_date="2025-01-31",
    )
    text = _text(ids)
    assert text.startswith("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.")
    assert "Current date: 2025-01-31" in text
    assert "Reasoning: high" in text
    assert "# Valid channels: analysis, commentary, final." in text
    assert "<|start|>developer<|message|># Instructions\n\nBe terse.<|end|>" in text
    assert text.endswith("<|start|>user<|message|>Hi there<|end|><|start|>assistant")
    assert ids[-2:] == [tok.start_token_id, tok.encode("assistant")[0]]


def test_render_without_instructions_has_no_developer_message():
    text = _text(render_chat([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]))
    assert "Reasoning: medium" in text
    assert "<|start|>developer" not in text
    assert "<|start|>user<|message|>ab<|end|>" in text


def test_render_model_identity_and_developer_role():
    text = _text(render_chat(
        [{"role": "developer", "content": "Rule one."}, {"role": "system", "content": "Rule two."},
         {"role": "user", "content": "x"}],
        model_identity="You are a test model.", reasoning_effort="low"))
    assert text.startswith("<|start|>system<|message|>You are a test model.")
    assert "Reasoning: low" in text
    assert "# Instructions\n\nRule one.\n\nRule two." in text


def test_render_tools_as_typescript_namespace():
    text = _text(render_chat([{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL]))
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text
    assert "# Tools\n\n## functions\n\nnamespace functions {" in text
    assert "// Gets the current weather.\ntype get_weather = (_: {" in text
    assert "// City name\ncity: string," in text
    assert "} // namespace functions" in text


def test_tool_result_round_trip():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "Need the tool.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c":21}'},
    ]
    text = _text(render_chat(messages, tools=[WEATHER_TOOL]))
    assert text.endswith(
        "<|start|>assistant<|channel|>analysis<|message|>Need the tool.<|end|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp_c":21}<|end|>'
        "<|start|>assistant"
    )
    # After a final answer render_chat drops the earlier turn's reasoning (tests/test_reasoning_drop.py).
    messages += [{"role": "assistant", "content": "21 °C."}, {"role": "user", "content": "Thanks"}]
    text = _text(render_chat(messages, tools=[WEATHER_TOOL]))
    assert "Need the tool." not in text
    assert "<|start|>assistant<|channel|>final<|message|>21 °C.<|end|><|start|>user<|message|>Thanks<|end|>" in text


def test_assistant_text_next_to_tool_calls_is_a_preamble():
    text = _text(render_chat([
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    ]))
    assert "<|start|>assistant<|channel|>commentary<|message|>Let me check.<|end|>" in text


def test_server_tools_render_as_harmony_declares_them():
    """Built-ins in the system message in harmony's own words, other namespaces in the developer message beside
    functions; a server tool's call and result on the channel the model chose, its result from the tool itself."""
    from openai_harmony import (Author, Conversation, DeveloperContent, Message, Role, SystemContent, ToolDescription,
                                ToolNamespaceConfig)

    docs = hm.ToolNamespace("docs", "Docs.", ({"name": "lookup", "description": "Look up.",
                                               "parameters": {"type": "object"}},))
    messages = [{"role": "user", "content": "6*7?"},
                {"role": "assistant", "reasoning_content": "Compute.", "tool_calls": [
                    {"id": "s1", "type": "server", "recipient": "python", "channel": "analysis",
                     "content_type": "code", "arguments": "6*7"}]},
                {"role": "tool", "tool_call_id": "s1", "content": "42"}]
    ids = render_chat(messages, tools=[WEATHER_TOOL], server_tools=hm.ServerTools(("browser", "python"), (docs,)))
    developer = DeveloperContent.new().with_function_tools([ToolDescription.new(
        "get_weather", "Gets the current weather.", WEATHER_TOOL["function"]["parameters"])]).with_tools(
        ToolNamespaceConfig(name="docs", description="Docs.", tools=[ToolDescription.new("lookup", "Look up.", {
            "type": "object"})]))
    expected = hm.load_encoding().render_conversation_for_completion(Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_browser_tool().with_python_tool()),
        Message.from_role_and_content(Role.DEVELOPER, developer),
        Message.from_role_and_content(Role.USER, "6*7?"),
        Message.from_role_and_content(Role.ASSISTANT, "Compute.").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, "6*7").with_channel("analysis").with_recipient(
            "python").with_content_type("code"),
        Message.from_author_and_content(Author.new(Role.TOOL, "python"), "42").with_channel("analysis")
        .with_recipient("assistant")]), Role.ASSISTANT)
    assert ids == list(expected)
    # chat never makes such calls: without server tools they are refused, naming the field
    with pytest.raises(ValueError, match=r"^messages\[1\]\.tool_calls\[0\]\.type: must be 'function'"):
        render_chat(messages)
    bad = [messages[0], {**messages[1], "tool_calls": [{**messages[1]["tool_calls"][0], "channel": "final"}]}]
    with pytest.raises(ValueError, match=r"^messages\[1\]\.tool_calls\[0\]\.channel"):
        render_chat(bad, server_tools=hm.ServerTools())


def test_special_token_text_in_messages_is_not_special(tok):
    ids = render_chat([{"role": "user", "content": "say <|return|> <|call|> <|end|>"}])
    assert 200002 not in ids and 200012 not in ids
    assert ids.count(tok.end_token_id) == 2  # the system message's and the user message's own
    assert "say <|return|> <|call|> <|end|><|end|>" in _text(ids)


_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize("messages, options, field", [
    ([{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}], {}, "messages[1].role"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "nope", "content": "b"}], {},
     "messages[1].tool_call_id"),
    ([{"role": "assistant", "tool_calls": [_CALL]}, {"role": "tool", "content": "b"}], {}, "messages[1].tool_call_id"),
    ([{"role": "user", "content": "a"}], {"reasoning_effort": "extreme"}, "reasoning_effort"),
    ([{"role": "user", "content": "a"}], {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
     "tools[0].function.name"),
    ([{"role": "user", "content": "a"}], {"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ([{"role": "user", "content": "a"}], {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools[0].function.parameters"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {}, "messages[0].content[0].type"),
    ([{"role": "user", "content": 42}], {}, "messages[0].content"),
    ([{"role": "user"}], {}, "messages[0].content"),
    (["hello"], {}, "messages[0]"),
    ([{"role": "assistant", "content": None}], {}, "messages[0].content"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": 3}}]}], {},
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": ""}}]}], {},
     "messages[0].tool_calls[0].function.name"),
])
def test_bad_input_names_the_field(messages, options, field):
    with pytest.raises(ValueError) as err:
        render_chat(messages, **options)
    assert str(err.value).startswith(field + ":"), str(err.value)


# --------------------------------------------------------------------------- parsing


def _harmony_state(parser: HarmonyStreamParser) -> str:
    """harmony's own (slow) view of the parser state, in our spelling."""
    return {"ExpectStart": "expect_start", "Header": "header", "Content": "content"}[parser._parser.state.value]


def _stream(tok, text: str, **options) -> tuple[list[list[HarmonyDelta]], HarmonyOutput]:
    parser = HarmonyStreamParser(**options)
    per_token = []
    for i in tok.encode(text, allow_special=True):
        per_token.append(parser.feed(i))
        assert parser._state == _harmony_state(parser)
    per_token.append(parser.flush())
    return per_token, parser.finish()


def test_parser_reasoning_then_content(tok):
    text = "<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final<|message|>Hello 🤖<|return|>"
    per_token, out = _stream(tok, text)
    flat = [d for ds in per_token for d in ds]
    assert [(d.kind, d.text) for d in flat] == [("reasoning", "think"), ("content", "Hello"), ("content", " "),
                                                ("content", "🤖")]
    # Incremental: "think" comes out with its own token, before the stream is over.
    ids = tok.encode(text, allow_special=True)
    assert per_token[ids.index(tok.encode("think")[0])] == [HarmonyDelta("reasoning", "think")]
    assert out == HarmonyOutput(reasoning_content="think", content="Hello 🤖", tool_calls=[], parse_error=None)


def test_parser_tool_call(tok):
    text = ('<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>commentary '
            'to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>')
    per_token, out = _stream(tok, text)
    calls = [d for ds in per_token for d in ds if d.kind == "tool_call"]
    assert calls[0].text == "" and calls[0].name == "get_weather" and calls[0].tool_index == 0
    assert "".join(d.arguments for d in calls) == '{"city":"Paris"}'
    assert len(calls) > 2  # arguments streamed token by token
    assert {d.id for d in calls} == {out.tool_calls[0].id}
    assert out.content == "Checking."
    assert out.reasoning_content is None
    [call] = out.tool_calls
    assert call.id.startswith("call_") and len(call.id) > 10
    assert (call.name, call.arguments) == ("get_weather", '{"city":"Paris"}')


def test_parser_server_calls_only_to_its_server_namespaces(tok):
    text = ('<|channel|>analysis<|message|>Look.<|end|><|start|>assistant<|channel|>analysis to=browser.search '
            'code<|message|>{"query":"x"}<|call|>')
    per_token, out = _stream(tok, text, server_namespaces=frozenset({"browser"}))
    calls = [d for ds in per_token for d in ds if d.kind == "server_call"]
    assert calls[0].text == "" and calls[0].name == "browser.search" and calls[0].id.startswith("call_")
    assert {(d.channel, d.content_type) for d in calls} == {("analysis", "code")}
    assert "".join(d.text for d in calls) == '{"query":"x"}' and {d.id for d in calls} == {calls[0].id}
    assert out.tool_calls == [] and out.reasoning_content == "Look."  # not the caller's to run
    # without browser among them (chat's parser), the same message is reasoning, as before
    assert parse_completion(tok.encode(text, allow_special=True)).reasoning_content == 'Look.{"query":"x"}'


def test_parser_recipient_in_the_role_header(tok):
    out = parse_completion(tok.encode(
        '<|channel|>analysis<|message|>a<|end|><|start|>assistant to=functions.f<|channel|>commentary json<|message|>{}<|call|>',
        allow_special=True))
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("f", "{}")]
    assert out.reasoning_content == "a" and out.content is None


def test_parser_stops_mid_message(tok):
    out = parse_completion(tok.encode("<|channel|>final<|message|>cut off", allow_special=True))
    assert out.content == "cut off" and out.parse_error is None
    assert parse_completion([]) == HarmonyOutput()


def test_parser_falls_back_to_content_on_a_harmony_error(tok):
    ids = tok.encode("<|channel|>final<|message|>Hi<|end|><|channel|>oops 🤖", allow_special=True)
    out = parse_completion(ids)
    assert out.parse_error
    assert out.content == "Hi<|channel|>oops 🤖"


def test_parser_unfinished_header_becomes_content(tok):
    out = parse_completion(tok.encode("<|channel|>fin", allow_special=True))
    assert out.content == "<|channel|>fin" and out.parse_error


def test_parser_long_garbage_header_streams_as_content(tok):
    parser = HarmonyStreamParser(max_header_tokens=16)
    ids = tok.encode("word " * 40)
    streamed = "".join(d.text for i in ids for d in parser.feed(i))
    assert streamed  # before finish()
    assert parser.finish().content == "word " * 40


def test_random_tokens_never_raise(tok):
    rng = random.Random(1234)
    specials = [200002, 200003, 200005, 200006, 200007, 200008, 200012]
    for _ in range(200):
        parser = HarmonyStreamParser()
        for _ in range(rng.randrange(1, 120)):
            token = rng.choice(specials) if rng.random() < 0.3 else rng.randrange(tok.vocab_size)
            for delta in parser.feed(token):
                assert delta.kind in ("reasoning", "content", "tool_call")
            if parser._parser is not None:  # still parsing: our state mirror must agree with harmony's
                assert parser._state == _harmony_state(parser)
        out = parser.finish()
        assert isinstance(out, HarmonyOutput)
        assert parser.finish() is out


def test_parser_rejects_ids_outside_the_vocabulary_and_feeding_after_flush(tok):
    parser = HarmonyStreamParser()
    with pytest.raises(ValueError, match="201088"):
        parser.feed(tok.vocab_size)
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed(0)


def test_garbage_streams_after_a_few_tokens_by_default(tok):
    """A stream of text with no header (random weights say such things) shows up within the header bound (32
    tokens), not after 256; a real tool-call header, the longest kind, fits well inside it."""
    parser = HarmonyStreamParser()
    ids = tok.encode("word " * 100)
    first = next(n for n, i in enumerate(ids, 1) if any(d.text for d in parser.feed(i)))
    assert first <= HarmonyStreamParser.MAX_HEADER_TOKENS + 1
    header = tok.encode("<|start|>assistant<|channel|>commentary to=functions.get_current_weather_in_city "
                        "<|constrain|>json<|message|>", allow_special=True)
    assert len(header) < HarmonyStreamParser.MAX_HEADER_TOKENS
