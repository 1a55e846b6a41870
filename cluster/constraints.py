"""What a request may generate, as an llguidance grammar: OpenAI's `response_format` and chat's `tool_choice`.

    completion_constraint(response_format)                -> the whole output (/v1/completions)
    harmony_constraint(response_format, tools, tool_choice) -> the final channel or the tool call (chat, harmony)

Grammars are llguidance's Lark syntax: harmony's special tokens are written as themselves (`<|channel|>`), JSON
schemas are inlined with `%json {...}`. On harmony the reasoning stays free: the grammar covers the whole generated
text, but the analysis message is any text without a special token, so only what follows it is held to the format.
The prompt ends with `<|start|>assistant` (render_chat), so the output opens with `<|channel|>`:

    <|channel|>analysis<|message|>...free...<|end|><|start|>assistant<|channel|>final<|message|>JSON<|return|>
    <|channel|>commentary to=functions.NAME <|constrain|>json<|message|>ARGUMENTS<|call|>

(the tool call in the form OpenAI's harmony guide shows the model writing; HarmonyStreamParser reads it as a call).
Both functions raise ValueError naming the offending field, which the ingress answers with a 400. No torch here: the
CPU-only ingress imports this; the engine core compiles the grammars it makes (cluster/grammar.py).

A schema is refused here when no request could follow it, so that a bad one is the client's 400 before admission and
never an engine failure (a 503) mid-output: llguidance's own check (validate_grammar), what it compiles but cannot
enforce (schema_checks.py: $ref cycles, counted repetitions past its lexer's budget), and a compile against the
tokenizer that takes the first mask (and, for patterns, a few steps) as the engine would. The tokenizer's view is
built once per process (ll_tokenizer: about a second and 140 MB), and each schema's verdict is kept, so a schema sent
again costs nothing. The functions block for that long: the ingress calls them on a worker thread (llguidance lets go
of the GIL while it compiles and masks).
"""

from __future__ import annotations

import functools
import json
import random
import re
import threading
from typing import Any

from llguidance import LLMatcher, LLParserLimits, LLTokenizer
from llguidance.tiktoken import lltokenizer_from_encoding

from gptoss_serve.cluster.sampling_params import StructuredOutput
from gptoss_serve.cluster.schema_checks import schema_problem
from gptoss_serve.model.tokenizer import Tokenizer, load_tokenizer

__all__ = ["JSON_FORMAT", "completion_constraint", "harmony_constraint", "ll_tokenizer"]

# JSON as OpenAI's structured outputs and harmony's tool calls write it: compact, a space allowed after ',' and ':'
# (json.dumps' default). llguidance's default, any whitespace anywhere, lets a model pad a document without end (a
# known failure of unbounded whitespace in constrained decoding); pretty-printed JSON is the trade-off given up.
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ?", "key_separator": ": ?"}
_RESPONSE_FORMATS = ("text", "json_object", "json_schema")
_TOOL_CHOICES = ("none", "auto", "required")
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# any text without special tokens: llguidance's terminals match bytes, which a special token never is
_FREE_TEXT = "TEXT: /(?s:.*)/"
_ANALYSIS = 'analysis: <|channel|> "analysis" <|message|> TEXT <|end|> <|start|> "assistant"'


def completion_constraint(response_format: dict | None) -> StructuredOutput | None:
    """The whole output follows response_format; None for text (or no response_format)."""
    answer = _response_body(response_format)
    if answer is None:
        return None
    body, description = answer
    return _checked(f"start: {body}", description)


def harmony_constraint(response_format: dict | None, tools: list[dict] | None,
                       tool_choice: str | dict | None) -> StructuredOutput | None:
    """A harmony answer's final channel follows response_format, and tool_choice decides whether it may, must or
    must not be a call of one of `tools` (chat's shape) with arguments valid for its parameters. None: free.

    A tool's parameters are compiled only where a call of it is held to them: a free request (tool_choice auto, no
    response_format) is never refused for a schema the grammar could not enforce."""
    functions = _functions(tools)
    choice = _tool_choice(tool_choice, functions)
    answer = _response_body(response_format)
    if choice == "auto" and answer is None:
        return None
    if choice == "none" and answer is None and not functions:
        return None  # nothing to forbid: no function is defined
    callable_ = [] if choice == "none" else list(functions) if choice in ("auto", "required") else [choice]
    arguments = {name: _arguments(tools, functions[name]) for name in callable_}
    rules = [_ANALYSIS]
    descriptions = []
    alternatives = []
    if choice in ("none", "auto"):
        body, description = answer if answer is not None else ("TEXT", "text")
        rules.append(f'final: <|channel|> "final" <|message|> {body} <|return|>')
        alternatives.append("final")
        descriptions.append(description)
    for i, name in enumerate(callable_):
        rules.append(f'call_{i}: <|channel|> {_lark_string(f"commentary to=functions.{name} ")} <|constrain|> "json" '
                     f'<|message|> {arguments[name]} <|call|>')
        alternatives.append(f"call_{i}")
    if choice == "none":
        descriptions.append("tool_choice none")
    elif choice == "required":
        descriptions.append("tool_choice required")
    elif choice != "auto":
        descriptions.append(f"tool_choice function {choice!r}")
    grammar = "\n".join([f"start: analysis? ({' | '.join(alternatives)})", *rules, _FREE_TEXT])
    return _checked(grammar, ", ".join(descriptions))


# ---- response_format -----------------------------------------------------------------------------------------------

def _response_body(response_format: Any) -> tuple[str, str] | None:
    """-> (a Lark expression for the answer, its description), or None where the answer is free text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError("response_format: must be an object")
    kind = response_format.get("type")
    if kind not in _RESPONSE_FORMATS:
        raise ValueError(f"response_format.type: must be one of {', '.join(map(repr, _RESPONSE_FORMATS))}, "
                         f"got {kind!r}")
    _no_other_keys(response_format, ("type", "json_schema") if kind == "json_schema" else ("type",),
                   "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return _json({"type": "object"}, strict=False, where="response_format"), "json_object"
    spec = response_format.get("json_schema")
    where = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: required for type 'json_schema', as an object with name and schema")
    _no_other_keys(spec, ("name", "description", "schema", "strict"), where)
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise ValueError(f"{where}.name: must be 1 to 64 letters, digits, '_' or '-', got {name!r}")
    if not isinstance(spec.get("description", ""), str):
        raise ValueError(f"{where}.description: must be a string")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ValueError(f"{where}.strict: must be a bool or null, got {strict!r}")
    if "schema" not in spec:
        raise ValueError(f"{where}.schema: required (a JSON schema object)")
    return _json(spec["schema"], strict=bool(strict), where=f"{where}.schema"), f"json_schema {name!r}"


def _json(schema: Any, *, strict: bool, where: str) -> str:
    """`%json {...}` for a JSON schema, checked. strict: keywords llguidance does not support are an error (a 400);
    otherwise they are ignored (the output may then not meet them), as a non-strict schema is a hint to OpenAI."""
    if not isinstance(schema, dict):
        raise ValueError(f"{where}: must be a JSON schema object, got {type(schema).__name__}")
    # llguidance reads its options from the schema's top level; a client's own x-guidance is not honoured
    options = {**JSON_FORMAT, "lenient": not strict}
    body = {key: value for key, value in schema.items() if key != "x-guidance"} | {"x-guidance": options}
    try:
        text = json.dumps(body, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    error = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(text))
    if error:
        raise ValueError(f"{where}: {error.strip()}")
    problem = schema_problem(body) or _probe(text)
    if problem:
        raise ValueError(f"{where}: {problem}")
    return f"%json {text}"


# ---- tools ---------------------------------------------------------------------------------------------------------

def _functions(tools: Any) -> dict[str, list[int]]:
    """Function name -> where in `tools` it is defined (more than once is an error only for a call held to it)."""
    if tools is None:
        return {}
    if not isinstance(tools, list):
        raise ValueError("tools: must be a list")
    functions: dict[str, list[int]] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict):
            raise ValueError(f"{where}: must be {{'type': 'function', 'function': {{...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
            raise ValueError(f"{where}.function.name: must be 1 to 64 letters, digits, '_' or '-', got {name!r}")
        functions.setdefault(name, []).append(i)
    return functions


def _arguments(tools: list[dict], where_defined: list[int]) -> str:
    """`%json {...}` of a function's parameters (any JSON object where none are given)."""
    i, *others = where_defined
    function = tools[i]["function"]
    if others:
        raise ValueError(f"tools[{others[0]}].function.name: {function['name']!r} is defined twice")
    parameters = function.get("parameters")
    return _json({"type": "object"} if parameters is None else parameters, strict=function.get("strict") is True,
                 where=f"tools[{i}].function.parameters")


def _tool_choice(tool_choice: Any, functions: dict[str, list[int]]) -> str:
    """-> "none", "auto", "required", or the name of the one function to call."""
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, str):
        if tool_choice not in _TOOL_CHOICES:
            raise ValueError(f"tool_choice: must be one of {', '.join(map(repr, _TOOL_CHOICES))} or "
                             f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}")
        if tool_choice == "required" and not functions:
            raise ValueError("tool_choice: 'required' needs at least one function in tools")
        return tool_choice
    if not isinstance(tool_choice, dict):
        raise ValueError(f"tool_choice: must be a string or an object, got {type(tool_choice).__name__}")
    if tool_choice.get("type") != "function":
        raise ValueError(f"tool_choice.type: must be 'function', got {tool_choice.get('type')!r}")
    _no_other_keys(tool_choice, ("type", "function"), "tool_choice")
    function = tool_choice.get("function")
    if not isinstance(function, dict):
        raise ValueError("tool_choice.function: must be an object with a name")
    _no_other_keys(function, ("name",), "tool_choice.function")
    name = function.get("name")
    if not isinstance(name, str):
        raise ValueError(f"tool_choice.function.name: must be a string, got {name!r}")
    if name not in functions:
        defined = ", ".join(map(repr, functions)) or "none"
        raise ValueError(f"tool_choice.function.name: no function {name!r} in tools (defined: {defined})")
    return name


# ---- helpers -------------------------------------------------------------------------------------------------------

def _no_other_keys(value: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in value:
        if key not in allowed:
            raise ValueError(f"{where}.{key}: unknown field (expected {', '.join(allowed)})")


def _lark_string(text: str) -> str:
    return json.dumps(text)  # Lark's string literals take JSON's escapes


def _checked(grammar: str, description: str) -> StructuredOutput:
    error = LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(grammar))
    if error:  # the pieces were checked one by one: a failure here is ours, not the request's
        raise RuntimeError(f"the grammar built for {description} is invalid: {error}")
    return StructuredOutput(grammar=grammar, description=description)


# ---- the tokenizer's view, and a compile against it ------------------------------------------------------------------

_tokenizer_lock = threading.Lock()


def ll_tokenizer(tokenizer: Tokenizer) -> LLTokenizer:
    """llguidance's view of the o200k_harmony vocabulary, harmony's special tokens (200000-201087) among its special
    tokens, so grammars may name them. About a second and 140 MB to build: once per process (threads wait for the
    one build). Its EOS is <|return|>, a stop token: where a grammar may end but could go on (a top-level JSON
    number), <|return|> is allowed, ends the request as any stop token does, and completes the grammar; harmony's
    grammars name <|return|> themselves."""
    with _tokenizer_lock:
        return _ll_tokenizer(tokenizer)


@functools.lru_cache(maxsize=2)
def _ll_tokenizer(tokenizer: Tokenizer) -> LLTokenizer:
    return lltokenizer_from_encoding(tokenizer.encoding, n_vocab=tokenizer.vocab_size,
                                     eos_token=tokenizer.return_token_id)


# the engine compiles with llguidance's default limits (cluster/grammar.py): the probe uses the same, without the
# parser's state and the grammar in its errors (they are the client's message)
_LIMITS = dict(verbose_errors=False)
# a schema with patterns is walked a few steps on a few samples: a lexer that runs out of fuel mostly does so early
PROBE_WALKS, PROBE_STEPS = 3, 8
_PATTERN_KEYS = ('"pattern"', '"patternProperties"')
_VERDICTS_KEPT = 1024


def _probe(text: str) -> str | None:
    """Compiles `%json text` against the tokenizer as the engine will, takes the first mask and, for a schema with
    patterns, a few steps on PROBE_WALKS samples -> why llguidance failed, or None. Deterministic; kept per text."""
    return _walks(text) or None


@functools.lru_cache(maxsize=_VERDICTS_KEPT)  # a schema's JSON -> why it cannot be followed ("": it can)
def _walks(text: str) -> str:
    tokenizer = ll_tokenizer(load_tokenizer())
    grammar = LLMatcher.grammar_from_lark(f"start: %json {text}")
    patterns = any(key in text for key in _PATTERN_KEYS)
    walks, steps = (PROBE_WALKS, PROBE_STEPS) if patterns else (1, 1)
    for walk in range(walks):
        # a fresh compile each time: its lexer starts cold, as the engine's first request with this schema does
        matcher = LLMatcher(tokenizer, grammar, log_level=0, limits=LLParserLimits(**_LIMITS))
        rng = random.Random(walk)
        for _ in range(steps):
            mask = matcher.compute_bitmask()
            if matcher.is_error():
                return _failure(matcher.get_error())
            token = _sample(mask, rng, tokenizer.eos_token, tokenizer.vocab_size)
            if token is None:  # only the end is allowed: the document is complete
                break
            if not matcher.consume_token(token):
                return _failure(matcher.get_error())
            if matcher.is_stopped():
                break
    return ""


def _sample(mask: bytes, rng: random.Random, eos: int, vocab_size: int) -> int | None:
    """A token the mask allows (bit t % 32 of little-endian word t // 32, so bit t % 8 of byte t // 8), not EOS."""
    allowed = bytearray(mask)
    allowed[eos // 8] &= ~(1 << eos % 8) & 0xFF
    nonzero = [i for i, byte in enumerate(allowed) if byte]
    while nonzero:
        i = rng.choice(nonzero)
        token = 8 * i + rng.choice([bit for bit in range(8) if allowed[i] >> bit & 1])
        if token < vocab_size:
            return token
        nonzero.remove(i)
    return None


def _failure(error: str) -> str:
    """llguidance's error as the client's reason: what it means, not the parser's state."""
    first = error.strip().splitlines()[0] if error.strip() else "error"
    if "NoExtension" in first:
        return "no JSON value matches this schema (its grammar allows no output)"
    if any(word in first for word in ("too many", "fuel", "TooComplex", "lexer", "limit")):
        return (f"too complex to enforce: compiling it ran past llguidance's limits ({first}); simplify its patterns "
                "or split the schema")
    return f"cannot be enforced: {first}"
