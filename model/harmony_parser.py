"""gpt-oss's generated ids back into what the APIs send: reasoning, content and tool-call deltas as they stream
(``HarmonyStreamParser``), or a whole completion at once (``parse_completion``); the rendering side is harmony.py."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Literal

from openai_harmony import Role, StreamableParser

from gptoss_serve.model.harmony import FUNCTIONS_PREFIX, load_encoding, stop_token_ids
from gptoss_serve.model.harmony_tools import SERVER_CALL_CHANNELS, SERVER_CALL_CONTENT_TYPE, SERVER_CALL_RECIPIENT
from gptoss_serve.model.tokenizer import IncrementalDecoder, load_tokenizer

__all__ = ["HarmonyDelta", "HarmonyOutput", "HarmonyStreamParser", "ToolCall", "parse_completion"]

log = logging.getLogger(__name__)

_Kind = Literal["reasoning", "content", "tool_call", "server_call"]


@dataclass(frozen=True, slots=True)
class HarmonyDelta:
    """A piece of streamed output.  For tool calls ``arguments`` is the same delta as ``text``; the first delta of
    each call has ``text == ""`` and announces its id and name.  A server call (a message to a tool of one of the
    parser's ``server_namespaces``) is announced the same way, its ``name`` the whole recipient (``browser.search``,
    ``python``), with the ``channel`` and ``content_type`` of its header, so that it can be rendered back as it was."""

    kind: _Kind
    text: str
    tool_index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str | None = None
    channel: str | None = None
    content_type: str | None = None


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

    def __init__(self, *, max_header_tokens: int = MAX_HEADER_TOKENS,
                 server_namespaces: frozenset[str] = frozenset()) -> None:
        """server_namespaces: those whose tools a server runs (browser, python, an MCP server's label): a message to
        one of their tools is a server call; to any other recipient, reasoning or content as before."""
        encoding = load_encoding()
        self._parser: StreamableParser | None = StreamableParser(encoding, role=Role.ASSISTANT)
        self._tokenizer = load_tokenizer()
        self._vocab_size = self._tokenizer.vocab_size
        self._stops = frozenset(stop_token_ids())  # <|return|>, <|call|>: the engine's, never text
        self._message_ends = frozenset(encoding.stop_tokens())  # <|end|>, <|return|>, <|call|>
        self._max_header = max_header_tokens
        self._server_namespaces = server_namespaces
        # server calls, kept apart from function calls (the server's to run): id, recipient, channel, content type
        self._server_calls: list[tuple[str, str, str | None, str | None]] = []
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
        if recipient and recipient.startswith(FUNCTIONS_PREFIX):
            self._kind = "tool_call"
            self._calls.append(("call_" + secrets.token_hex(12), recipient[len(FUNCTIONS_PREFIX) :], []))
            return [self._delta("")]
        if (recipient and recipient.split(".", 1)[0] in self._server_namespaces
                and SERVER_CALL_RECIPIENT.fullmatch(recipient)):
            # kept so that it renders back as the model wrote it, where harmony can render it at all
            content_type = self._parser.current_content_type
            self._kind = "server_call"
            self._server_calls.append((
                "call_" + secrets.token_hex(12), recipient,
                channel if channel in SERVER_CALL_CHANNELS else "commentary",
                content_type if content_type and SERVER_CALL_CONTENT_TYPE.fullmatch(content_type) else None))
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
        if self._kind == "server_call":
            call_id, name, channel, content_type = self._server_calls[-1]
            return HarmonyDelta("server_call", text, id=call_id, name=name, arguments=text, channel=channel,
                                content_type=content_type)
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
