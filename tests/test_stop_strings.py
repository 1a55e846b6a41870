"""Stop strings end the text exactly where they occur, whatever the token boundaries, and nothing past them is ever
streamed. The engine runs a tiny model scripted to say one chosen sentence (tests/scripted_model.py), so every case
is known in advance."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer
from tests.scripted_model import follow_chain

SENTENCE = " Hello world, see you tomorrow!"
PIECES = [" Hello", " world", ",", " see", " you", " tomorrow", "!"]  # its tokens, one piece of text each


@dataclass
class Run:
    tokens: list[int]
    deltas: list[str]  # the text each step released
    finish_reason: str
    stop_reason: int | str | None

    @property
    def text(self) -> str:
        return "".join(self.deltas)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def scripted(tiny_bf16, tokenizer):
    """(model, prompt, the sentence's tokens): after the prompt, greedy decoding says SENTENCE."""
    model = load_model(tiny_bf16, dtype=torch.float32)
    prompt, script = tokenizer.encode("Say goodbye:"), tokenizer.encode(SENTENCE)
    assert [tokenizer.decode([t]) for t in script] == PIECES
    follow_chain(model, [prompt[-1], *script])
    return model, prompt, script


def run(scripted, tokenizer, **params) -> Run:
    model, prompt, _ = scripted
    engine = LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=64, max_model_len=256))
    engine.add_request("r", prompt, SamplingParams(**{"temperature": 0, "max_tokens": len(PIECES), **params}))
    outputs = []
    while engine.has_unfinished_requests:
        outputs += engine.step()
    assert engine.is_idle() and outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    return Run([t for o in outputs for t in o.new_token_ids], [o.new_text for o in outputs],
               outputs[-1].finish_reason, outputs[-1].stop_reason)


def test_the_script_plays_out(scripted, tokenizer):
    out = run(scripted, tokenizer)
    assert out.tokens == scripted[2] and out.deltas == PIECES
    assert out.finish_reason == "length" and out.stop_reason is None
    # sampled at temperature 1 too: the scripted token outweighs the rest of the vocabulary
    assert run(scripted, tokenizer, temperature=1.0, seed=3).tokens == scripted[2]


@pytest.mark.parametrize("stop, include, text, num_tokens, stop_reason", [
    ("o w", False, " Hell", 2, "o w"),  # spans two tokens
    ("o w", True, " Hello w", 2, "o w"),
    ("morr", False, " Hello world, see you to", 6, "morr"),  # inside one token
    ("morr", True, " Hello world, see you tomorr", 6, "morr"),
    (" Hello", False, "", 1, " Hello"),  # the very first token
    (["tomorrow", "world"], False, " Hello ", 2, "world"),  # the first to occur wins, not the first listed
    (["tomorrow", "world"], True, " Hello world", 2, "world"),
])
def test_stop_string_ends_the_text_where_it_occurs(scripted, tokenizer, stop, include, text, num_tokens, stop_reason):
    out = run(scripted, tokenizer, stop=stop, include_stop_str_in_output=include)
    # the deltas join to the final text: no character a stop string took back was ever released
    assert out.text == text
    assert out.tokens == scripted[2][:num_tokens]
    assert out.finish_reason == "stop" and out.stop_reason == stop_reason


def test_stop_string_against_max_tokens(scripted, tokenizer):
    # the last token both completes the stop string and reaches max_tokens: the stop string is the reason
    last = run(scripted, tokenizer, stop="!")
    assert (last.text, last.finish_reason, last.stop_reason) == (SENTENCE[:-1], "stop", "!")
    # one token fewer: the stop string never comes
    short = run(scripted, tokenizer, stop="!", max_tokens=len(PIECES) - 1)
    assert (short.text, short.finish_reason, short.stop_reason) == (SENTENCE[:-1], "length", None)
    assert short.tokens == scripted[2][:-1]


def test_a_possible_stop_string_is_held_back_until_the_text_rules_it_out(scripted, tokenizer):
    out = run(scripted, tokenizer, stop="you there")
    # " you" might begin "you there": its "you" waits for the next token, which shows it does not
    assert out.deltas == [" Hello", " world", ",", " see", " ", "you tomorrow", "!"]
    assert out.finish_reason == "length" and out.text == SENTENCE
    # still held back when max_tokens ends the request: released with its last delta
    tail = run(scripted, tokenizer, stop="tomorrow?", max_tokens=len(PIECES) - 1)
    assert tail.text == SENTENCE[:-1] and tail.finish_reason == "length"
