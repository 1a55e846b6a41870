"""The harmony chat format of gpt-oss, through OpenAI's ``openai_harmony`` package.

``render_chat`` turns an OpenAI chat-completions request into prompt token ids;
``HarmonyStreamParser`` turns generated ids back into reasoning / content / tool-call deltas.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from openai_harmony import (Author, Conversation, DeveloperContent, HarmonyEncoding, HarmonyEncodingName, HarmonyError,
                            Message, ReasoningEffort, RenderConversationConfig, Role, StreamableParser, SystemContent,
                            ToolDescription, load_harmony_encoding)

from gptoss_serve.model.harmony_splice import Splice
from gptoss_serve.model.tokenizer import IncrementalDecoder, check_whitespace_runs, load_tokenizer, resolve_vocab_file

__all__ = ["HarmonyDelta", "HarmonyOutput", "HarmonyStreamParser", "RenderError", "ToolCall", "load_encoding",
           "parse_completion", "render_chat", "stop_token_ids"]

log = logging.getLogger(__name__)

_EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
_Kind = Literal["reasoning", "content", "tool_call"]
# OpenAI's rule for function names; anything else could break the "to=functions.NAME" header.
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_FUNCTIONS = "functions."
_env_lock = threading.Lock()


@functools.cache
def load_encoding() -> HarmonyEncoding:
    """harmony's gpt-oss encoding, loaded from the local vocabulary (never downloaded)."""
    vocab_dir = str(resolve_vocab_file().parent)
    # The Rust loader only looks at $TIKTOKEN_ENCODINGS_BASE (else it downloads); set it just for the load so the
    # rest of the process keeps whatever the user configured.
    with _env_lock:
        previous = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = vocab_dir
        try:
            return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
        finally:
            if previous is None:
                del os.environ["TIKTOKEN_ENCODINGS_BASE"]
            else:
                os.environ["TIKTOKEN_ENCODINGS_BASE"] = previous


def stop_token_ids() -> list[int]:
    """Ids that end an assistant turn: <|return|> and <|call|>."""
    # harmony returns them from a Rust HashSet, in a different order per process.
    return sorted(load_encoding().stop_tokens_for_assistant_actions())


# --------------------------------------------------------------------------- rendering


def _text(value: Any, where: str, *, allow_none: bool = False) -> str | None:
    """Content as a string or a list of {type: text, text} parts -> one string."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return check_whitespace_runs(value, where)
    if isinstance(value, list):
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError(f"{where}[{j}].type: only text parts are supported")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{where}[{j}].text: must be a string")
        return check_whitespace_runs("".join(part["text"] for part in value), where)
    raise ValueError(f"{where}: must be a string or a list of text parts")


def _function_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _TOOL_NAME.fullmatch(value):
        raise ValueError(f"{where}: must match {_TOOL_NAME.pattern}")
    return value


def _tool_descriptions(tools: list[dict]) -> list[ToolDescription]:
    if not isinstance(tools, list):
        raise ValueError("tools: must be a list")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ValueError(f"tools[{i}].type: must be 'function'")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"tools[{i}].function: must be an object")
        name = _function_name(fn.get("name"), f"tools[{i}].function.name")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise ValueError(f"tools[{i}].function.description: must be a string")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters: must be a JSON schema object")
        out.append(ToolDescription.new(name, description, params))
    return out


def _assistant_messages(msg: dict, where: str, call_names: dict[str, str], splice: Splice) -> list[Message]:
    out = []
    reasoning = msg.get("reasoning_content", msg.get("reasoning"))
    if reasoning is not None:
        text = _text(reasoning, f"{where}.reasoning_content")
        # kept or left out by _drop_past_reasoning, once the whole conversation is known
        out.append(Message.from_role_and_content(Role.ASSISTANT, splice.content(text)).with_channel("analysis"))
    content = _text(msg.get("content"), f"{where}.content", allow_none=True)
    calls = msg.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ValueError(f"{where}.tool_calls: must be a list")
    if content is None and not calls and reasoning is None:
        raise ValueError(f"{where}.content: an assistant message needs content or tool_calls")
    if content is not None:
        # Text next to tool calls is a preamble, which harmony puts on the commentary channel: not a final answer, so
        # it ends no turn and drops no reasoning.
        channel = "commentary" if calls else "final"
        out.append(Message.from_role_and_content(Role.ASSISTANT, splice.content(content)).with_channel(channel))
    for j, call in enumerate(calls):
        cw = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise ValueError(f"{cw}.type: must be 'function'")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"{cw}.function: must be an object")
        name = _function_name(fn.get("name"), f"{cw}.function.name")
        args = fn.get("arguments", "")
        if isinstance(args, dict):  # some clients send parsed arguments
            args = json.dumps(args)
        if not isinstance(args, str):
            raise ValueError(f"{cw}.function.arguments: must be a JSON string")
        if isinstance(call.get("id"), str):
            call_names[call["id"]] = name
        call_msg = Message.from_role_and_content(Role.ASSISTANT, splice.content(args)).with_channel("commentary")
        out.append(call_msg.with_recipient(_FUNCTIONS + name).with_content_type("<|constrain|>json"))
    return out


def _drop_past_reasoning(turns: list[Message]) -> list[Message]:
    """The turns without the analysis that came before the last final answer.

    gpt-oss was trained to see the chain of thought of past turns dropped once they ended in a final answer, and the
    reasoning of the turn in progress (between its tool calls and their results) kept. harmony's own auto_drop_analysis
    misses the tool loop: it drops only while the latest assistant message is a final one, and only the analysis before
    the first final answer. So the rule is applied here, and harmony is told to keep all it is given (_render).
    """
    finals = [i for i, msg in enumerate(turns) if msg.author.role == Role.ASSISTANT and msg.channel == "final"]
    if not finals:
        return turns
    # a dropped text that was spliced simply has no marker in harmony's output (Splice.apply skips it)
    return [msg for i, msg in enumerate(turns) if i > finals[-1] or msg.channel != "analysis"]


def render_chat(
    messages: list[dict],
    *,
    reasoning_effort: str = "medium",
    tools: list[dict] | None = None,
    model_identity: str | None = None,
    conversation_start_date: str | None = None,  # "Current date: ..." line; left out when None
    knowledge_cutoff: str | None = None,  # None keeps harmony's default, 2024-06
) -> list[int]:
    """Prompt ids for the next assistant turn of an OpenAI-style chat.

    system and developer texts all become the instructions of harmony's one developer message, as OpenAI's gpt-oss
    guide does: harmony's own system message carries identity, reasoning effort, dates and channels. Assistant
    reasoning before the last final answer is left out (_drop_past_reasoning).
    """
    if reasoning_effort not in _EFFORTS:
        raise ValueError(f"reasoning_effort: must be one of {sorted(_EFFORTS)}")
    if not isinstance(messages, list):
        raise ValueError("messages: must be a list")
    system = SystemContent.new().with_reasoning_effort(_EFFORTS[reasoning_effort])
    if model_identity is not None:
        system = system.with_model_identity(model_identity)
    if conversation_start_date is not None:
        system = system.with_conversation_start_date(conversation_start_date)
    if knowledge_cutoff is not None:
        system = system.with_knowledge_cutoff(knowledge_cutoff)

    splice = Splice()  # long texts are encoded by tiktoken, not by harmony (see harmony_splice)
    instructions: list[str] = []
    turns: list[Message] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, for tool results
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ValueError(f"{where}: must be an object")
        role = msg.get("role")
        if role in ("system", "developer"):
            instructions.append(_text(msg.get("content"), f"{where}.content") or "")
        elif role == "user":
            turns.append(Message.from_role_and_content(Role.USER, splice.content(_text(msg.get("content"),
                                                                                        f"{where}.content"))))
        elif role == "assistant":
            turns += _assistant_messages(msg, where, call_names, splice)
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in call_names:
                raise ValueError(f"{where}.tool_call_id: no earlier assistant tool call has the id {call_id!r}")
            result = Message.from_author_and_content(
                Author.new(Role.TOOL, _FUNCTIONS + call_names[call_id]),
                splice.content(_text(msg.get("content"), f"{where}.content")))
            turns.append(result.with_channel("commentary").with_recipient("assistant"))
        else:
            raise ValueError(f"{where}.role: unknown role {role!r}")
    turns = _drop_past_reasoning(turns)

    head = [Message.from_role_and_content(Role.SYSTEM, system)]
    function_tools = _tool_descriptions(tools) if tools else []
    instruction_text = splice.instructions("\n\n".join(instructions), "messages") if instructions else ""
    if instructions or function_tools:
        developer = DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions(instruction_text)
        if function_tools:
            developer = developer.with_function_tools(function_tools)
        head.append(Message.from_role_and_content(Role.DEVELOPER, developer))
    try:
        return splice.apply(_render(head + turns))
    except _RENDER_FAILURES as e:
        # what harmony itself refuses (its own words name JSON columns of its own document, not the request's fields):
        # the tools are to blame when the conversation renders without them
        param = "messages"
        if function_tools:
            without = head[:1] + ([Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new()
                                                                  .with_instructions(instruction_text))]
                                  if instructions else [])
            try:
                _render(without + turns)
                param = "tools"
            except _RENDER_FAILURES:
                pass
        log.info("harmony could not render a conversation (%s): %s: %s", param, type(e).__name__, e)
        raise RenderError(param, _render_failure(e)) from None


class RenderError(ValueError):
    """harmony could not render a conversation whose fields each passed: `param` is the one to blame ("messages" or
    "tools"), and the message names it first, as every ValueError of render_chat names its field."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param, self.reason = param, reason


# harmony raises ValueError for the JSON it is handed, HarmonyError when rendering, RecursionError (json.dumps) for a
# value nested past Python's recursion limit
_RENDER_FAILURES = (ValueError, RecursionError, HarmonyError)


# which analysis stays is _drop_past_reasoning's call alone: harmony renders every message it is given
_KEEP_ALL = RenderConversationConfig(auto_drop_analysis=False)


def _render(messages: list[Message]) -> list[int]:
    conversation = Conversation.from_messages(messages)
    return list(load_encoding().render_conversation_for_completion(conversation, Role.ASSISTANT, _KEEP_ALL))


def _render_failure(error: Exception) -> str:
    text = str(error).lower()
    if isinstance(error, RecursionError) or "recursion" in text:
        why = "a value is nested too deeply"
    elif isinstance(error, UnicodeError) or "escape" in text or "surrogate" in text or "unicode" in text:
        why = "its text is not valid Unicode"
    else:
        why = "harmony refused it"
    return f"cannot be rendered in harmony's chat format: {why}"


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True, slots=True)
class HarmonyDelta:
    """A piece of streamed output.  For tool calls ``arguments`` is the same delta as ``text``; the first delta of
    each call has ``text == ""`` and announces its id and name."""

    kind: _Kind
    text: str
    tool_index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class HarmonyOutput:
    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    # Why harmony parsing gave up, if it did (the rest of the output then became content).
    parse_error: str | None = None


class HarmonyStreamParser:
    """Feeds generated ids to harmony's StreamableParser and yields typed deltas.

    It never raises on a malformed sequence (random weights produce plenty): from the first harmony error on, the
    not-yet-surfaced tokens and everything after are decoded as content.  A header longer than ``max_header_tokens``
    counts as such an error, so garbage output still streams instead of piling up in a header that never ends.
    Token ids outside the vocabulary are a caller bug and raise ValueError.
    """

    # gpt-oss's longest headers (a tool call: role, channel, recipient, constraint) take about 20 tokens; beyond
    # this many a "header" is garbage, and holding it back would stall a stream
    MAX_HEADER_TOKENS = 32

    def __init__(self, *, max_header_tokens: int = MAX_HEADER_TOKENS) -> None:
        encoding = load_encoding()
        self._parser: StreamableParser | None = StreamableParser(encoding, role=Role.ASSISTANT)
        self._tokenizer = load_tokenizer()
        self._vocab_size = self._tokenizer.vocab_size
        self._stops = frozenset(stop_token_ids())  # <|return|>, <|call|>: the engine's, never text
        self._message_ends = frozenset(encoding.stop_tokens())  # <|end|>, <|return|>, <|call|>
        self._max_header = max_header_tokens
        # harmony's own parser.state serialises every content token of the message to JSON, so reading it per
        # token is quadratic; we follow its three states ourselves (a test checks that we agree).
        self._state: Literal["expect_start", "header", "content"] = "header"
        self._pending: list[int] = []  # header tokens not surfaced in any delta yet
        self._kind: _Kind | None = None  # of the message being streamed
        self._parts: dict[str, list[str]] = {}  # kind -> texts, for finish()
        self._calls: list[tuple[str, str, list[str]]] = []  # id, name, argument pieces
        self._fallback: IncrementalDecoder | None = None
        self._error: str | None = None
        self._finished: HarmonyOutput | None = None
        self._closed = False

    def feed(self, token_id: int) -> list[HarmonyDelta]:
        """Adds one generated id; returns the deltas it completed (often none, e.g. inside a header)."""
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token id {token_id} outside the vocabulary [0, {self._vocab_size})")
        if self._closed:
            raise RuntimeError("HarmonyStreamParser.feed() after flush()")
        if self._parser is None:
            return self._fallback_feed([token_id])
        try:
            self._parser.process(token_id)
            if self._state == "header" and token_id != self._tokenizer.message_token_id:
                if len(self._pending) >= self._max_header:
                    raise ValueError(f"message header longer than {self._max_header} tokens")
        except Exception as exc:  # HarmonyError or ours; harmony's state is unusable now
            return self._fall_back(exc, [*self._pending, token_id])
        if self._state == "content":
            if token_id in self._message_ends:
                self._state, self._kind = "expect_start", None
                return []
            delta = self._parser.last_content_delta  # None while a character is still incomplete
            return [self._delta(delta)] if delta else []
        if self._state == "expect_start":  # so harmony accepted it as <|start|>
            self._state, self._pending = "header", [token_id]
            return []
        if token_id == self._tokenizer.message_token_id:
            self._state, self._pending = "content", []
            return self._open_message()
        self._pending.append(token_id)
        return []

    def flush(self) -> list[HarmonyDelta]:
        """Ends the stream; returns the last deltas (a trailing partial header or character)."""
        self._closed = True
        if self._parser is not None:
            try:
                # At the very start harmony would call an empty completion an error; it is not.
                if self._pending or self._state != "header":
                    self._parser.process_eos()
            except Exception as exc:  # e.g. the output stopped inside a message header
                return self._fall_back(exc, self._pending) + self.flush()
            self._parser = None
            return []
        if self._fallback is not None and (text := self._fallback.flush()):
            return [self._delta(text)]
        return []

    def finish(self) -> HarmonyOutput:
        """Ends the stream (if flush() was not called) and returns the whole output."""
        if self._finished is None:
            self.flush()
            joined = {kind: "".join(parts) for kind, parts in self._parts.items()}
            calls = [ToolCall(call_id, name, "".join(args)) for call_id, name, args in self._calls]
            self._finished = HarmonyOutput(joined.get("reasoning"), joined.get("content"), calls, self._error)
        return self._finished

    # -- internals

    def _open_message(self) -> list[HarmonyDelta]:
        assert self._parser is not None
        channel, recipient = self._parser.current_channel, self._parser.current_recipient
        if recipient and recipient.startswith(_FUNCTIONS):
            self._kind = "tool_call"
            self._calls.append(("call_" + secrets.token_hex(12), recipient[len(_FUNCTIONS) :], []))
            return [self._delta("")]
        # analysis -> reasoning; final and commentary preambles (and anything odd) -> content
        self._kind = "reasoning" if channel == "analysis" else "content"
        self._parts.setdefault(self._kind, [])
        return []

    def _delta(self, text: str) -> HarmonyDelta:
        if self._kind == "tool_call":
            call_id, name, args = self._calls[-1]
            args.append(text)
            return HarmonyDelta("tool_call", text, tool_index=len(self._calls) - 1, id=call_id, name=name, arguments=text)
        kind = self._kind or "content"
        self._parts.setdefault(kind, []).append(text)
        return HarmonyDelta(kind, text)

    def _fall_back(self, exc: Exception, unsurfaced: list[int]) -> list[HarmonyDelta]:
        log.debug("harmony parse error, rest of the output is content: %s", exc)
        self._error = str(exc) or type(exc).__name__
        self._parser, self._kind, self._pending = None, "content", []
        self._fallback = IncrementalDecoder(self._tokenizer)
        return self._fallback_feed(unsurfaced)

    def _fallback_feed(self, ids: list[int]) -> list[HarmonyDelta]:
        assert self._fallback is not None
        # Stop tokens are the engine's business, not text for the user.
        text = "".join(self._fallback.feed(t) for t in ids if t not in self._stops)
        return [self._delta(text)] if text else []


def parse_completion(token_ids: list[int]) -> HarmonyOutput:
    """Parses a whole completion (the ids generated after the prompt)."""
    parser = HarmonyStreamParser()
    for token_id in token_ids:
        parser.feed(token_id)
    return parser.finish()
