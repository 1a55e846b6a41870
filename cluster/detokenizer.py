"""Streams a request's text as tokens arrive, and ends it at a stop string.

Text that might be the beginning of a stop string is held back until the next tokens tell, so a client never
receives characters that a stop string later takes back.
"""

from __future__ import annotations

from dataclasses import replace

from gptoss_serve.model.tokenizer import IncrementalDecoder, Tokenizer


class StreamingText:
    def __init__(self, tokenizer: Tokenizer, *, stop: tuple[str, ...] = (), include_stop: bool = False,
                 skip_special: bool = True) -> None:
        self.decoder = IncrementalDecoder(tokenizer, skip_special=skip_special)
        self.stop, self.include_stop = tuple(s for s in stop if s), include_stop
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` already released
        self.stopped = False
        self.stop_hit: str | None = None  # the stop string that ended the text

    def feed(self, token_id: int) -> str:
        """Decodes one token; returns the text that is now safe to release ('' while held back)."""
        if self.stopped:
            return ""
        self.text += self.decoder.feed(token_id)
        if self.stop:
            hit = self._find_stop()
            if hit is not None:
                self.stopped = True
                self.text = self.text[:hit]
                return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        """At the end of the request: whatever is still held back (an unfinished stop-string prefix, bytes)."""
        if not self.stopped:
            self.text += self.decoder.flush()
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        delta, self.sent = self.text[self.sent:upto], upto
        return delta

    def _find_stop(self) -> int | None:
        """End of the kept text if a stop string now occurs in the unreleased part, else None."""
        start = max(0, self.sent - max(map(len, self.stop)) + 1)
        found = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not found:
            return None
        i, self.stop_hit = min(found)
        return i + len(self.stop_hit) if self.include_stop else i

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        for n in range(min(len(self.text), max(map(len, self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stop):
                return n
        return 0


class TextStreams:
    """The text of many requests, and the stop strings that end them, fed one step's outputs at a time.

    Whoever holds the request's outputs first runs this once: the engine itself offline, or, in serving, the
    replica beside its engine core, so that decoding stays off the engine's critical path. A stop string
    ends an output early (finish_reason "stop"); the caller then stops the request in the engine.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.texts: dict[str, StreamingText] = {}

    def add(self, request_id: str, params) -> None:
        """params: the request's SamplingParams (stop, include_stop_str_in_output, skip_special_tokens)."""
        self.texts[request_id] = StreamingText(self.tokenizer, stop=params.stop,
                                               include_stop=params.include_stop_str_in_output,
                                               skip_special=params.skip_special_tokens)

    def remove(self, request_id: str) -> None:
        self.texts.pop(request_id, None)

    def process(self, out):
        """A RequestOutput with its new_text filled in; finished at a stop string (which also wins over a
        length limit reached by the same token). The request is forgotten once its output is finished."""
        text = self.texts.get(out.request_id)
        if text is None:
            return out
        delta = "".join(text.feed(token) for token in out.new_token_ids)
        if text.stopped and (not out.finished or out.finish_reason == "length"):
            out = replace(out, finished=True, finish_reason="stop", stop_reason=text.stop_hit)
        if out.finished:
            delta += text.flush()
            del self.texts[out.request_id]
        return replace(out, new_text=delta)
