"""Reading an OpenAI-style streaming response: SSE `data:` lines of JSON chunks, ended by `data: [DONE]`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gptoss_serve.bench.loadtest.record import MALFORMED_SSE, STREAM_ERROR

DONE = object()  # the [DONE] sentinel


class StreamFault(Exception):
    """The stream broke the protocol; `reason` is the failure reason recorded for the request."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_line(line: str) -> dict[str, Any] | object | None:
    """One SSE line -> a JSON chunk, DONE, or None for lines that carry nothing (blank, comment, event, id)."""
    if not line or line.startswith(":"):
        return None
    name, sep, value = line.partition(":")
    if not sep:
        raise StreamFault(MALFORMED_SSE, f"not an SSE field: {line[:120]!r}")
    if name in ("event", "id", "retry"):
        return None
    if name != "data":
        raise StreamFault(MALFORMED_SSE, f"unknown SSE field {name[:40]!r}")
    value = value.removeprefix(" ")
    if value.strip() == "[DONE]":
        return DONE
    try:
        chunk = json.loads(value)
    except json.JSONDecodeError as exc:
        raise StreamFault(MALFORMED_SSE, f"data is not JSON ({exc.msg}): {value[:120]!r}") from None
    if not isinstance(chunk, dict):
        raise StreamFault(MALFORMED_SSE, f"data is not a JSON object: {value[:120]!r}")
    if chunk.get("error") is not None:
        raise StreamFault(STREAM_ERROR, _describe_error(chunk["error"]))
    return chunk


def _describe_error(error: Any) -> str:
    if isinstance(error, dict):
        return " ".join(str(error[k]) for k in ("code", "type", "message") if error.get(k) is not None) or str(error)
    return str(error)


def chunk_text(chunk: dict[str, Any], *, chat: bool) -> str:
    """The text a chunk adds: choices[0].text for completions; delta.content plus the reasoning a reasoning
    model streams beside it (`reasoning` in newer vLLM, `reasoning_content` in older servers; a server that sends
    both, as this one does for older clients, counts once) for chat."""
    choices = chunk.get("choices")
    if not choices:
        return ""
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise StreamFault(MALFORMED_SSE, f"choices is not a list of objects: {str(choices)[:120]}")
    choice = choices[0]
    if not chat:
        return _text(choice.get("text"))
    delta = choice.get("delta") or {}
    if not isinstance(delta, dict):
        raise StreamFault(MALFORMED_SSE, f"delta is not an object: {str(delta)[:120]}")
    reasoning = delta.get("reasoning") if "reasoning" in delta else delta.get("reasoning_content")
    return _text(reasoning) + _text(delta.get("content"))


def _text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise StreamFault(MALFORMED_SSE, f"text is not a string: {str(value)[:120]}")
    return value


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None  # of the prompt's, found in the server's prefix cache (when it says)


def chunk_usage(chunk: dict[str, Any]) -> Usage | None:
    usage = chunk.get("usage")
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise StreamFault(MALFORMED_SSE, f"usage is not an object: {str(usage)[:120]}")
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not (_count(prompt) and _count(completion)):
        raise StreamFault(MALFORMED_SSE, f"usage lacks integer token counts: {str(usage)[:120]}")
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(prompt, completion, cached if _count(cached) else None)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
