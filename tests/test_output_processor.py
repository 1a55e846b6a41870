"""The one stop-string matcher every output path uses (cluster/output_processor.py): it ends the text at the first
stop string, however the pieces split it, and holds back only a tail that could still become one. Torch-free and
model-free: the engine's end-to-end cases are in test_stop_strings.py, chat's in test_chat_stop.py."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss_serve.cluster.engine_protocol import RequestOutput
from gptoss_serve.cluster.output_processor import StopStringMatcher, StreamingText, TextStreams
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.model.tokenizer import load_tokenizer


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> list[str]:
    """What each piece released, then what the end of the text released (as the last entry)."""
    return [matcher.feed(piece) for piece in pieces] + [matcher.flush()]


def could_become_stop(text: str, stops: tuple[str, ...]) -> int:
    """The reference: length of the longest tail of text that is a proper prefix of a stop string."""
    return max((n for n in range(1, len(text) + 1) for s in stops if len(s) > n and s.startswith(text[-n:])),
               default=0)


# ---- the matcher ------------------------------------------------------------------------------------------------

def test_a_stop_string_split_across_pieces_ends_the_text_before_it():
    matcher = StopStringMatcher(("world",))
    assert feed_all(matcher, ["Hello wo", "rld", ", see you"]) == ["Hello ", "", "", ""]
    assert matcher.stopped and matcher.stop_hit == "world"


def test_include_stop_keeps_the_stop_string():
    matcher = StopStringMatcher(("world",), include_stop=True)
    assert feed_all(matcher, ["Hello wo", "rld, see", " you"]) == ["Hello ", "world", "", ""]
    assert matcher.stop_hit == "world"


def test_a_tail_that_may_begin_a_stop_string_waits_until_the_next_piece_rules_it_out():
    matcher = StopStringMatcher(("you there",))
    assert feed_all(matcher, [" see", " you", " tomorrow", "!"]) == [" see", " ", "you tomorrow", "!", ""]
    assert not matcher.stopped


def test_text_that_no_stop_string_can_begin_with_is_released_at_once():
    # chat's old rule held back the longest stop's length less one (8 characters here) whatever the text was
    matcher = StopStringMatcher(("tomorrow!", "Goodbye"))
    assert matcher.feed("Hello there, see you") == "Hello there, see you"
    assert matcher.feed(" to") == " "  # "to" may begin "tomorrow!"
    assert matcher.feed("day") == "today"


def test_only_the_longest_tail_that_is_a_prefix_is_held_back():
    matcher = StopStringMatcher(("abcd",))
    assert matcher.feed("xabcab") == "xabc"  # "ab" may begin "abcd"; "cab" and "bcab" cannot
    assert matcher.feed("c") == ""
    assert matcher.feed("d!") == "" and matcher.stopped


def test_overlapping_prefixes():
    matcher = StopStringMatcher(("aab",))
    assert feed_all(matcher, ["a", "a", "a", "b"]) == ["", "", "a", "", ""]


def test_the_stop_string_that_occurs_first_wins_not_the_first_listed():
    matcher = StopStringMatcher(("tomorrow", "world"))
    assert matcher.feed("Hello world, see you tomorrow") == "Hello "
    assert matcher.stop_hit == "world"


def test_the_held_tail_comes_out_when_the_text_ends():
    matcher = StopStringMatcher(("you there",))
    assert feed_all(matcher, ["see you"]) == ["see ", "you"]


def test_after_the_stop_nothing_more_comes_out():
    matcher = StopStringMatcher(("!",))
    assert feed_all(matcher, ["Hi! there", "more", "!"]) == ["Hi", "", "", ""]


def test_without_stop_strings_text_passes_through():
    matcher = StopStringMatcher(("",))  # an empty stop string is no stop string
    assert feed_all(matcher, ["a", "", "bc"]) == ["a", "", "bc", ""] and not matcher.stopped


@settings(max_examples=300, deadline=None)
@given(text=st.text("abc", max_size=24), stop=st.text("abc", min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 24), max_size=8), include=st.booleans())
def test_any_split_gives_the_text_cut_at_the_first_occurrence_holding_back_no_more_than_needed(text, stop, cuts,
                                                                                               include):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    matcher = StopStringMatcher((stop,), include_stop=include)
    released, fed = "", ""
    for piece in pieces:
        released += matcher.feed(piece)
        fed += piece
        if matcher.stopped:
            break
        # everything but a tail that could still become the stop string is out
        assert released == fed[:len(fed) - could_become_stop(fed, (stop,))]
    released += matcher.flush()
    at = text.find(stop)
    assert released == (text if at < 0 else text[:at + len(stop) if include else at])
    assert matcher.stopped == (at >= 0)


# ---- tokens to text ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_a_character_split_across_tokens_is_matched_whole(tokenizer):
    tokens = tokenizer.encode("Snow and 🎉 party")
    assert "\ufffd" in [tokenizer.decode([t]) for t in tokens]  # the emoji takes two tokens
    text = StreamingText(tokenizer, stop=("🎉",))
    released = "".join(text.feed(t) for t in tokens)
    assert released == "Snow and " and text.stopped and text.stop_hit == "🎉"


def test_text_streams_end_an_output_at_a_stop_string(tokenizer):
    """As the replica uses them: a stop string finishes an output the engine had not finished."""
    streams = TextStreams(tokenizer)
    streams.add("r", SamplingParams(stop=("you there",)))
    streams.add("s", SamplingParams(stop=("see",)))
    tokens = tokenizer.encode(" Hello world, see you tomorrow!")
    r = [streams.process(RequestOutput("r", [t], None, False)) for t in tokens[:-1]]
    r.append(streams.process(RequestOutput("r", [tokens[-1]], None, True, "length")))
    assert "".join(o.new_text for o in r) == " Hello world, see you tomorrow!"
    assert (r[-1].finish_reason, r[-1].stop_reason) == ("length", None) and "r" not in streams.texts
    s = [streams.process(RequestOutput("s", [t], None, False)) for t in tokens]
    assert [o.finished for o in s].index(True) == 3  # " see" is the fourth token
    assert s[3].new_text == " " and (s[3].finish_reason, s[3].stop_reason) == ("stop", "see")
    assert "".join(o.new_text for o in s[:4]) == " Hello world, " and "s" not in streams.texts


def test_the_matcher_loads_no_torch():
    """The HTTP ingress imports it (through completion_bodies), and the ingress runs without torch."""
    import subprocess

    probe = ("import sys; import gptoss_serve.cluster.output_processor, gptoss_serve.deployments.completion_bodies; "
             "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", probe], check=True)
