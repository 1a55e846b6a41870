"""Stop strings on chat completions end the answer where they first appear in its final channel (the reasoning
may contain them), the text shown stops before them, and the choice finishes with "stop"."""

from __future__ import annotations

import pytest

from gptoss_serve.cluster.engine_protocol import RequestOutput
from gptoss_serve.deployments.completion_bodies import ChatChoice
from gptoss_serve.model.tokenizer import load_tokenizer

ANSWER = ("<|channel|>analysis<|message|>The user says hi; be brief.<|end|>"
          "<|start|>assistant<|channel|>final<|message|>Hello there, see you tomorrow!<|return|>")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def run(tokenizer, stop: tuple[str, ...], *, per_output: int = 1):
    """Feeds the answer's tokens a few per output; -> (streamed content, streamed reasoning, the choice, outputs
    fed before the choice stopped)."""
    tokens = tokenizer.encode(ANSWER, allow_special=True)
    choice = ChatChoice(0, tokenizer, logprobs=False, stop=stop)
    content, reasoning, fed = "", "", 0
    for start in range(0, len(tokens), per_output):
        chunk = tokens[start:start + per_output]
        last = start + per_output >= len(tokens)
        out = RequestOutput("r", chunk, None, last, "stop" if last else None, num_output_tokens=start + len(chunk))
        result = choice.feed(out)
        if result is None:
            break
        fed += 1
        delta, _ = result
        content += delta.get("content", "")
        assert delta.get("reasoning") == delta.get("reasoning_content")  # vLLM's name and its older one
        reasoning += delta.get("reasoning", "")
    return content, reasoning, choice, fed


@pytest.mark.parametrize("per_output", [1, 3, 100])
@pytest.mark.parametrize("stop, shown", [(("e",), "H"), ((", see",), "Hello there"), (("tomorrow!",), "Hello there, see you "),
                                         (("xyz", "you"), "Hello there, see "), (("brief",), "Hello there, see you tomorrow!")])
def test_stop_strings_cut_the_final_channel_only(tokenizer, stop, shown, per_output):
    content, reasoning, choice, _ = run(tokenizer, stop, per_output=per_output)
    assert content == shown
    assert reasoning == "The user says hi; be brief."  # "e" and "brief" appear here and end nothing
    assert choice.finish_reason == "stop"
    message = choice.message()["message"]
    assert message["content"] == shown and message["reasoning"] == message["reasoning_content"] == reasoning


def test_outputs_after_the_stop_are_dropped(tokenizer):
    content, _, choice, fed = run(tokenizer, ("there",))
    assert content == "Hello " and choice.stopped
    tokens = tokenizer.encode(ANSWER, allow_special=True)
    assert fed < len(tokens)  # the rest came "in flight" and was ignored
    assert choice.feed(RequestOutput("r", [tokens[-1]], None, True, "stop", num_output_tokens=99)) is None


def test_without_stop_strings_nothing_is_held_back(tokenizer):
    content, _, choice, _ = run(tokenizer, ())
    assert content == "Hello there, see you tomorrow!" and not choice.stopped


def content_per_output(tokenizer, stop: tuple[str, ...]) -> list[str]:
    """The streamed content after each output, one token an output."""
    tokens = tokenizer.encode(ANSWER, allow_special=True)
    choice, shown, so_far = ChatChoice(0, tokenizer, logprobs=False, stop=stop), "", []
    for i, token in enumerate(tokens):
        last = i == len(tokens) - 1
        fed = choice.feed(RequestOutput("r", [token], None, last, "stop" if last else None, num_output_tokens=i + 1))
        if fed is None:
            break
        shown += fed[0].get("content", "")
        so_far.append(shown)
    return so_far


def test_final_channel_text_is_streamed_as_soon_as_it_cannot_become_a_stop_string(tokenizer):
    unstopped = content_per_output(tokenizer, ())
    # no stop string can begin anywhere in "Hello there, see you tomorrow!": nothing ever waits (the old rule held
    # back the longest stop's length less one, 7 characters here, until the end)
    assert content_per_output(tokenizer, ("Goodbye",)) == unstopped
    # " you" may begin "you there": its "you" waits one token, until " tomorrow" rules it out
    waiting = content_per_output(tokenizer, ("you there",))
    assert [u for u, w in zip(unstopped, waiting) if u != w] == ["Hello there, see you"]
    assert waiting[unstopped.index("Hello there, see you")] == "Hello there, see "
    assert waiting[-1] == unstopped[-1] == "Hello there, see you tomorrow!"
