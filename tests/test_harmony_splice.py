"""Long texts of a chat prompt are encoded by tiktoken and spliced into harmony's rendering (model/harmony_splice.py):
the ids are the same as harmony's own, texts whose runs make harmony's BPE quadratic no longer go through it, and
whitespace runs that overflow the tokenizers' regex stack are a 400 naming the field."""

from __future__ import annotations

import random

import pytest

from gptoss_serve.model import harmony, harmony_splice
from gptoss_serve.model.harmony import render_chat
from gptoss_serve.model.tokenizer import MAX_WHITESPACE_RUN, check_whitespace_runs, load_tokenizer
from tests.test_bad_inputs import COMPLETION, CHAT, RESPONSE, assert_400, post

# letters on both sides of a space (where instructions may be cut), and every kind of piece boundary o200k has
ALPHABET = list("aZq ö\n\t.,!?'0123456789_-中 ") + ["  ", "\n\n", "'s", " 's", "\r\n", "<|end|>"]


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def unspliced(monkeypatch, messages, **kwargs) -> list[int]:
    with monkeypatch.context() as m:
        m.setattr(harmony_splice, "SPLICE_CHARS", 10 ** 12)
        return render_chat(messages, **kwargs)


@pytest.mark.parametrize("seed", range(12))
def test_spliced_rendering_equals_harmonys_own(monkeypatch, seed):
    rng = random.Random(seed)
    n = lambda: rng.randint(harmony_splice.SPLICE_CHARS, 3 * harmony_splice.SPLICE_CHARS)  # noqa: E731
    messages = [
        {"role": "system", "content": random_text(rng, n())},
        {"role": "developer", "content": random_text(rng, rng.randint(1, 50))},
        {"role": "user", "content": [{"type": "text", "text": random_text(rng, n())}]},
        {"role": "assistant", "reasoning_content": random_text(rng, n()), "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": random_text(rng, n())}}]},
        {"role": "tool", "tool_call_id": "c1", "content": random_text(rng, n())},
        {"role": "assistant", "content": random_text(rng, n())},  # the analysis before this answer is dropped
        {"role": "user", "content": random_text(rng, rng.choice([5, n()]))},
    ]
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]
    spliced = render_chat(messages, tools=tools)
    assert spliced == unspliced(monkeypatch, messages, tools=tools)


def test_a_long_run_is_encoded_by_tiktoken_and_never_given_to_harmony(monkeypatch):
    given = []
    real = harmony._render

    def spy(messages):
        given.extend(str(m.content) for m in messages)
        return real(messages)

    monkeypatch.setattr(harmony, "_render", spy)
    text = "a" * 200_000  # harmony alone: ~15 s (quadratic in the run); tiktoken: milliseconds
    ids = render_chat([{"role": "system", "content": "be brief " * 1000}, {"role": "user", "content": text}])
    assert max(map(len, given)) < 20_000
    tok = load_tokenizer()
    start = len(ids) - ids[::-1].index(tok.message_token_id)
    assert ids[start:ids.index(tok.end_token_id, start)] == tok.encode(text)


def test_instructions_are_cut_only_between_letters_around_a_space():
    splice = harmony_splice.Splice()
    text = "x" * 5000 + " word " + "y" * 5000
    given = splice.instructions(text)
    assert given.startswith("x" * 5000) and given.endswith(" " + "y" * 5000) and len(given) < 10_100
    # with no place to cut, the text goes as it is while its unbroken ends stay short, and is refused past that
    assert splice.instructions("!" * 8000) == "!" * 8000
    with pytest.raises(ValueError, match="^messages: more than 16384 characters without a space between two letters"):
        harmony_splice.Splice().instructions("b" * 20_000 + " c", "messages")


def test_whitespace_runs_past_the_limit_are_refused_naming_the_field():
    ok = " " * MAX_WHITESPACE_RUN
    assert check_whitespace_runs(ok + "a" + ok, "prompt") == ok + "a" + ok
    with pytest.raises(ValueError, match="^prompt: 65537 whitespace characters in a row"):
        check_whitespace_runs("a" + "\n" * (MAX_WHITESPACE_RUN + 1), "prompt")
    with pytest.raises(ValueError, match=r"^messages\[0\].content: "):
        render_chat([{"role": "user", "content": " \t" * MAX_WHITESPACE_RUN}])


# the reproductions: a million spaces took the tokenizer's thread down (a Rust panic, a BaseException); now a 400
MILLION_SPACES = '"' + " " * 1_000_000 + '"'


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", COMPLETION.replace('"hi"', MILLION_SPACES) + "}", "prompt"),
    ("/v1/chat/completions", CHAT.replace('"hi"', MILLION_SPACES) + "}", "messages[0].content"),
    ("/v1/responses", RESPONSE.replace('"hi"', MILLION_SPACES) + "}", "input"),
])
def test_a_million_spaces_are_a_400(path, body, param):
    assert_400(post(path, body), param, f"{param}: ")
