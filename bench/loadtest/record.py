"""What happened to one request: its timings, the server's token counts, and why it failed if it did."""

from __future__ import annotations

from dataclasses import dataclass, field

# Failure reasons that are not HTTP status codes (those are recorded as "429", "500", ...).
TIMEOUT = "timeout"  # the request ran past --timeout, or the connection timed out
CONNECTION = "connection"  # refused, reset, or closed mid-stream
MALFORMED_SSE = "malformed_sse"  # a line that is not SSE, or data that is not a JSON object
MISSING_DONE = "missing_done"  # the stream ended without "data: [DONE]"
MISSING_USAGE = "missing_usage"  # no chunk carried usage, though stream_options.include_usage was asked
STREAM_ERROR = "stream_error"  # the server sent an {"error": ...} object inside the stream
EMPTY_OUTPUT = "empty_output"  # no text came back, or usage says zero completion tokens
TOKEN_MISMATCH = "token_mismatch"  # usage.completion_tokens differs from the tokens asked for
CHUNK_MISMATCH = "chunk_mismatch"  # more text chunks than completion tokens: the usage cannot be right
CLIENT_ERROR = "client_error"  # the load generator itself failed on this request (worth a bug report)
CANCELLED = "cancelled"  # still running when the grace period after --duration ran out (not a failure)


@dataclass(slots=True, kw_only=True)
class RequestRecord:
    index: int
    prompt_len: int  # our count of the prompt text's tokens
    output_len: int  # tokens asked for
    turn: int | None = None  # the conversation workload: 1 for a conversation's first request
    start: float = 0.0  # time.monotonic() when the request was sent
    ttft: float | None = None  # seconds from send to the first text chunk
    latency: float | None = None  # seconds from send to the end of the stream
    itl: list[float] = field(default_factory=list)  # seconds between consecutive text chunks
    chunks: int = 0  # chunks that carried text (content or reasoning)
    output_chars: int = 0
    prompt_tokens: int | None = None  # the server's usage: the input length we report
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # the server's usage: prompt tokens its prefix cache held
    error: str | None = None  # a reason above or an HTTP status code; None if it succeeded
    detail: str = ""  # a short human-readable account of the failure
    finished: bool = False  # False while in flight, and for requests cancelled at the end

    @property
    def ok(self) -> bool:
        return self.finished and self.error is None

    @property
    def cancelled(self) -> bool:
        return self.error == CANCELLED

    @property
    def failed(self) -> bool:
        return self.finished and self.error is not None and not self.cancelled

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first, as vLLM computes it (0 for one-token answers)."""
        if not self.ok or self.ttft is None or self.latency is None or not self.completion_tokens:
            return None
        if self.completion_tokens == 1:
            return 0.0
        return (self.latency - self.ttft) / (self.completion_tokens - 1)

    def fail(self, reason: str, detail: str = "") -> None:
        if self.error is None:  # the first fault is the cause; what follows from it is noise
            self.error, self.detail = reason, detail[:300]
        self.finished = True
