"""Turns a request's tokens into the text a client sees: decoded as they arrive, and ended at a stop string.

Every path that shows text uses this module, so stop strings behave the same everywhere:

    StopStringMatcher  text in, text safe to show out: ends the text at the first stop string and holds back only
                       a tail that could still become one (chat runs it over its final channel only, in
                       deployments/completion_bodies.py)
    StreamingText      one request's tokens -> text: the incremental decoder, then the matcher
    TextStreams        many requests' StreamingTexts, fed one engine step's RequestOutputs at a time (the engine
                       offline, LLMEngine(detokenize=True); the attention replica when serving; completions get
                       their text this way)

A client never receives characters that a stop string later takes back, and never waits for characters that no
stop string can begin with.

Torch-free on purpose: the HTTP ingress imports the matcher (through completion_bodies) and must not load torch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from gptoss_serve.model.tokenizer import IncrementalDecoder, Tokenizer

if TYPE_CHECKING:
    from gptoss_serve.cluster.engine_protocol import RequestOutput
    from gptoss_serve.cluster.sampling_params import SamplingParams


class StopStringMatcher:
    """Finds the first stop string in a stream of text pieces, however the pieces split it.

    Only the unreleased tail (`pending`) is kept: a character is released once no stop string can start at it, so
    a stop string can never begin inside released text, and searching the tail is enough.
    """

    def __init__(self, stop: tuple[str, ...] = (), *, include_stop: bool = False) -> None:
        """include_stop: the released text ends with the stop string instead of just before it."""
        self.stop = tuple(s for s in stop if s)  # an empty string would match before any text
        self.include_stop = include_stop
        self.pending = ""  # text fed but not released: each of its tails is a proper prefix of a stop string
        self.stopped = False
        self.stop_hit: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        """Adds a piece of text; returns what can be released now ('' while everything is held back or after the
        stop). After a stop string, `stopped` is set and the text released ends at it."""
        if self.stopped:
            return ""
        if not self.stop:
            return text
        self.pending += text
        found = [(i, s) for s in self.stop if (i := self.pending.find(s)) >= 0]
        if found:  # the one that starts first wins, not the first listed
            i, self.stop_hit = min(found)
            self.stopped = True
            released = self.pending[:i + len(self.stop_hit) if self.include_stop else i]
            self.pending = ""
            return released
        keep = self._could_become_stop()
        released, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return released

    def flush(self) -> str:
        """At the end of the text: the held-back tail, which no stop string completed."""
        released, self.pending = self.pending, ""
        return released

    def _could_become_stop(self) -> int:
        """Length of the longest tail of `pending` that is a proper prefix of some stop string (0: release it all).
        Text that no stop string starts with is released at once, however long the stop strings are."""
        for n in range(min(len(self.pending), max(map(len, self.stop)) - 1), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0


class StreamingText:
    """One request's text: tokens decoded as they arrive (characters split across tokens wait for their last byte),
    then cut at the request's stop strings."""

    def __init__(self, tokenizer: Tokenizer, *, stop: tuple[str, ...] = (), include_stop: bool = False,
                 skip_special: bool = True) -> None:
        self.decoder = IncrementalDecoder(tokenizer, skip_special=skip_special)
        self.matcher = StopStringMatcher(stop, include_stop=include_stop)

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    @property
    def stop_hit(self) -> str | None:
        return self.matcher.stop_hit

    def feed(self, token_id: int) -> str:
        """Decodes one token; returns the text that is now safe to release ('' while held back)."""
        if self.stopped:
            return ""
        return self.matcher.feed(self.decoder.feed(token_id))

    def flush(self) -> str:
        """At the end of the request: whatever is still held back (an unfinished stop-string prefix, a dangling
        partial character, which comes out as U+FFFD and is matched like any other text)."""
        if self.stopped:
            return ""
        return self.matcher.feed(self.decoder.flush()) + self.matcher.flush()


class TextStreams:
    """The text of many requests, and the stop strings that end them, fed one step's outputs at a time.

    Whoever holds the request's outputs first runs this once: the engine itself offline, or, in serving, the
    replica beside its engine core, so that decoding stays off the engine's critical path. A stop string
    ends an output early (finish_reason "stop"); the caller then stops the request in the engine.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.texts: dict[str, StreamingText] = {}

    def add(self, request_id: str, params: SamplingParams) -> None:
        self.texts[request_id] = StreamingText(self.tokenizer, stop=params.stop,
                                               include_stop=params.include_stop_str_in_output,
                                               skip_special=params.skip_special_tokens)

    def remove(self, request_id: str) -> None:
        self.texts.pop(request_id, None)

    def process(self, out: RequestOutput) -> RequestOutput:
        """The output with its new_text filled in (in place: a step's outputs are its own, and a copy each would
        cost the engine's loop ~5 µs a sequence a step); a stop string finishes it, in a copy, so the caller can
        tell (it also wins over a length limit reached by the same token). The request is forgotten once its
        output is finished."""
        text = self.texts.get(out.request_id)
        if text is None:
            return out
        delta = "".join(text.feed(token) for token in out.new_token_ids)
        if out.finished:
            delta += text.flush()
        out.new_text = delta
        if text.stopped and (not out.finished or out.finish_reason == "length"):
            out = replace(out, finished=True, finish_reason="stop", stop_reason=text.stop_hit)
        if out.finished:
            del self.texts[out.request_id]
        return out
