"""Synthetic requests: random-word prompts of an exact token count under the real tokenizer.

Prompts are made of ordinary vocabulary tokens of the form " word" (a space and lowercase ASCII letters).
The tokenizer's pre-split cuts text before each such word, so decoding a list of them and encoding the text
again gives the same ids back almost always; we still re-encode and trim or pad until the count is exact.
Every request draws from its own generator seeded by (seed, index), so request i is the same whatever order
or number of requests a run makes, and two runs with one seed send the same workload.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

from gptoss_serve.bench.loadtest.config import LoadConfig
from gptoss_serve.bench.loadtest.lengths import LengthSampler, samplers_for
from gptoss_serve.model.tokenizer import Tokenizer, load_tokenizer

_WORD_TOKEN = re.compile(rb"^ [a-z]{2,12}$")
_ORDINARY_IDS = 199_998  # ids below this are BPE tokens; from here on they are special or reserved
_MAX_FIX_ROUNDS = 16


@dataclass(frozen=True, slots=True)
class RequestSpec:
    index: int
    prompt: str
    prompt_len: int  # tokens of `prompt` alone; a chat server adds its template around it
    output_len: int  # tokens asked for


@functools.lru_cache(maxsize=4)
def word_token_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Ids of the " word" tokens prompts are built from (about 47k of o200k's 200k)."""
    return tuple(i for i in range(_ORDINARY_IDS) if _WORD_TOKEN.match(tokenizer.decode_bytes([i])))


def make_prompt(tokenizer: Tokenizer, length: int, rng: random.Random) -> str:
    """Random text that encodes to exactly `length` tokens."""
    pool = word_token_ids(tokenizer)
    ids = rng.choices(pool, k=length)
    for _ in range(_MAX_FIX_ROUNDS):
        text = tokenizer.decode(ids)
        encoded = tokenizer.encode(text)
        if len(encoded) == length:
            return text
        # cut the surplus or pad the shortfall with fresh words, then check again
        ids = encoded[:length] + rng.choices(pool, k=max(0, length - len(encoded)))
    raise RuntimeError(f"could not build a prompt of exactly {length} tokens")


class Workload:
    """The requests of a run, built on demand (request i is always the same); `prepare` keeps the first few."""

    def __init__(self, *, tokenizer: Tokenizer, input_lengths: LengthSampler, output_lengths: LengthSampler,
                 seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.input_lengths = input_lengths
        self.output_lengths = output_lengths
        self.seed = seed
        self._specs: dict[int, RequestSpec] = {}

    @classmethod
    def from_config(cls, config: LoadConfig, *, tokenizer: Tokenizer | None = None) -> Workload:
        input_lengths, output_lengths = samplers_for(config)
        return cls(tokenizer=tokenizer or load_tokenizer(), input_lengths=input_lengths,
                   output_lengths=output_lengths, seed=config.seed)

    def spec(self, index: int) -> RequestSpec:
        if (cached := self._specs.get(index)) is not None:
            return cached
        rng = random.Random(f"{self.seed}/{index}")  # a str seed is hashed, so (seed, index) pairs never collide
        prompt_len = self.input_lengths.draw(rng)
        output_len = self.output_lengths.draw(rng)
        return RequestSpec(index, make_prompt(self.tokenizer, prompt_len, rng), prompt_len, output_len)

    def prepare(self, count: int) -> None:
        """Builds the first `count` requests now, so that building them does not delay sends later."""
        # only these are kept: a long --duration run would otherwise hold every prompt it ever sent
        for index in range(len(self._specs), count):
            self._specs[index] = self.spec(index)
