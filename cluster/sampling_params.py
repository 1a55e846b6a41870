"""Per-request sampling options, with vLLM's names, defaults and ranges, checked when built; among them the grammar
the output must match (`StructuredOutput`).

No torch here: the CPU-only ingress builds these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# harmony ends an assistant turn with <|return|> (final answer) or <|call|> (tool call); the engine fills these in
# where a request leaves stop_token_ids at None
HARMONY_STOP_TOKEN_IDS: tuple[int, ...] = (200002, 200012)

MAX_LOGPROBS = 20

# vLLM's _SAMPLING_EPS: below it a temperature is treated as 0, as dividing by it says nothing that argmax does not
GREEDY_TEMPERATURE = 1e-5

# torch.Generator.manual_seed takes any value a signed or unsigned 64-bit integer can hold
_SEED_RANGE = (-(2**63), 2**64 - 1)


def _fail(key: str, why: str) -> None:
    raise ValueError(f"{key} {why}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match (a grammar), as it travels to the engine core inside SamplingParams.

    Plain, frozen and picklable: the ingress builds it (cluster/constraints.py) and the engine core's process compiles
    its grammar (cluster/grammar.py).

    grammar: llguidance's Lark syntax, over the whole generated text (harmony's special tokens written as
    `<|channel|>` etc., JSON schemas inlined as `%json {...}`). description: a few words for errors, logs and
    metrics, e.g. "json_schema 'weather'" or "tool_choice required"."""

    grammar: str
    description: str

    def __post_init__(self) -> None:
        if not isinstance(self.grammar, str) or not self.grammar.strip():
            raise ValueError("structured_output.grammar must be a non-empty string")
        if not isinstance(self.description, str):
            raise ValueError("structured_output.description must be a string")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: until the context is full
    min_tokens: int = 0  # stop tokens are suppressed until this many tokens are out
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()  # a str or a list of str is accepted and kept as a tuple
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's defaults (HARMONY_STOP_TOKEN_IDS)
    ignore_eos: bool = False  # generate max_tokens whatever stop tokens come out
    logprobs: int | None = None  # how many top alternatives come with each sampled token's logprob
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # a grammar the output must follow (constrained decoding); None: free
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        self._check_lengths()
        self._check_floats()
        self._check_ints()
        self._normalize_stops()
        for key in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                _fail(key, f"must be a bool, got {type(value).__name__}")
        spec = self.structured_output
        if spec is not None and not isinstance(spec, StructuredOutput):
            _fail("structured_output", f"must be a StructuredOutput or None, got {type(spec).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def _check_lengths(self) -> None:
        if self.max_tokens is not None:
            if not _is_int(self.max_tokens):
                _fail("max_tokens", f"must be an int or None, got {type(self.max_tokens).__name__}")
            if self.max_tokens < 1:
                _fail("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not _is_int(self.min_tokens):
            _fail("min_tokens", f"must be an int, got {type(self.min_tokens).__name__}")
        if self.min_tokens < 0:
            _fail("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _fail("min_tokens", f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")

    def _check_floats(self) -> None:
        # (key, lowest, highest, lowest allowed itself, the range as the message spells it)
        ranges = (
            ("temperature", 0.0, math.inf, True, ">= 0"),
            ("top_p", 0.0, 1.0, False, "in (0, 1]"),
            ("min_p", 0.0, 1.0, True, "in [0, 1]"),
            ("presence_penalty", -2.0, 2.0, True, "in [-2, 2]"),
            ("frequency_penalty", -2.0, 2.0, True, "in [-2, 2]"),
            ("repetition_penalty", 0.0, math.inf, False, "> 0"),
        )
        for key, low, high, low_ok, spelled in ranges:
            value = getattr(self, key)
            if not _is_number(value):
                _fail(key, f"must be a number, got {type(value).__name__}")
            # NaN fails every comparison, and an infinite temperature or penalty leaves no distribution to sample
            if not math.isfinite(value) or not (value >= low if low_ok else value > low) or value > high:
                _fail(key, f"must be {spelled}, got {value!r}")
            object.__setattr__(self, key, float(value))

    def _check_ints(self) -> None:
        if not _is_int(self.top_k):
            _fail("top_k", f"must be an int, got {type(self.top_k).__name__}")
        if self.top_k < -1:
            _fail("top_k", f"must be -1 or 0 (off) or >= 1, got {self.top_k}")
        if self.seed is not None and not (_is_int(self.seed) and _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1]):
            _fail("seed", f"must be a 64-bit int or None, got {self.seed!r}")
        if self.logprobs is not None:
            if not _is_int(self.logprobs):
                _fail("logprobs", f"must be an int or None, got {type(self.logprobs).__name__}")
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                _fail("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    def _normalize_stops(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)):
            _fail("stop", f"must be a string or a list of strings, got {type(stop).__name__}")
        for s in stop:
            if not isinstance(s, str):
                kinds = f"a {type(stop).__name__} holding {type(s).__name__}"
                _fail("stop", f"must be a string or a list of strings, got {kinds}")
        # an empty stop string matches before any text, ending every request at once
        if any(s == "" for s in stop):
            _fail("stop", "must not contain empty strings")
        object.__setattr__(self, "stop", tuple(stop))

        ids = self.stop_token_ids
        if ids is not None:
            if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
                _fail("stop_token_ids", f"must be a list of non-negative ints, got {ids!r}")
            object.__setattr__(self, "stop_token_ids", tuple(ids))
