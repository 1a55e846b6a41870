"""Sending one streaming request and checking what comes back; every fault ends up in the record."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import httpx

from gptoss_serve.bench.loadtest.config import Endpoint
from gptoss_serve.bench.loadtest.conversation import Turn
from gptoss_serve.bench.loadtest.record import (CHUNK_MISMATCH, CONNECTION, EMPTY_OUTPUT, MALFORMED_SSE, MISSING_DONE,
                                                MISSING_USAGE, STREAM_ERROR, TIMEOUT, TOKEN_MISMATCH, RequestRecord)
from gptoss_serve.bench.loadtest.sse import DONE, StreamFault, Usage, chunk_text, chunk_usage, parse_line
from gptoss_serve.bench.loadtest.workload import RequestSpec

PATHS: dict[Endpoint, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
                               "responses": "/v1/responses"}
# Responses stream events whose delta is output: reasoning counts, as a chat stream's reasoning does
RESPONSE_TEXT_EVENTS = ("response.output_text.delta", "response.reasoning_text.delta")
RESPONSE_ENDS = ("response.completed", "response.incomplete")


def build_payload(spec: RequestSpec | Turn, *, endpoint: Endpoint, model: str, temperature: float, ignore_eos: bool,
                  extra_body: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A random prompt (as the user's message for chat), or a conversation's turn (its messages for chat, its
    transcript for completions, its new message after the previous response for responses)."""
    if endpoint == "responses":
        assert isinstance(spec, Turn), "the responses endpoint carries conversation turns only"
        return _responses_payload(spec, model=model, temperature=temperature) | dict(extra_body or {})
    body: dict[str, Any] = {"model": model}
    if isinstance(spec, Turn):
        body |= {"messages": spec.messages} if endpoint == "chat" else {"prompt": spec.transcript}
    elif endpoint == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    body |= {
        "max_tokens": spec.output_len,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        # vLLM's extra fields: without them a model may stop early and output lengths stop being controlled
        body |= {"ignore_eos": True, "min_tokens": spec.output_len}
    return body | dict(extra_body or {})


def _responses_payload(turn: Turn, *, model: str, temperature: float) -> dict[str, Any]:
    """The turn's new message; the server holds the rest under `previous_response_id`. Instructions go with every
    turn: a response does not inherit them (OpenAI's rule), and the same instructions keep the same prompt prefix."""
    body: dict[str, Any] = {"model": model, "input": turn.messages[-1]["content"], "max_output_tokens": turn.output_len,
                            "temperature": temperature, "stream": True, "store": True}
    if turn.instructions is not None:
        body["instructions"] = turn.instructions
    if turn.previous_response_id is not None:
        body["previous_response_id"] = turn.previous_response_id
    return body


class ServerError(RuntimeError):
    """The server could not tell us which model it serves (the run has not started)."""


async def fetch_model(client: httpx.AsyncClient) -> str:
    """The first model id the server lists under GET /v1/models."""
    try:
        response = await client.get("/v1/models")
        response.raise_for_status()
        models = response.json()["data"]
        return str(models[0]["id"])
    except httpx.HTTPError as exc:
        raise ServerError(f"GET /v1/models failed ({type(exc).__name__}: {exc}); is the server up?") from None
    except (ValueError, LookupError, TypeError, AttributeError):
        raise ServerError("GET /v1/models lists no model id; pass --model") from None


async def send_request(client: httpx.AsyncClient, record: RequestRecord, *, endpoint: Endpoint,
                       payload: dict[str, Any], timeout: float, ignore_eos: bool,
                       text: list[str] | None = None, ids: list[str] | None = None) -> None:
    """Sends one request and fills `record`; never raises for a failed request (cancellation goes through).
    `text`, if given, receives the streamed text chunk by chunk (a conversation appends the answer); `ids`, the
    response's id (responses endpoint)."""
    record.start = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", PATHS[endpoint], json=payload) as response:
                if not response.is_success:
                    body = await response.aread()
                    record.fail(str(response.status_code), body.decode("utf-8", errors="replace"))
                    return
                if endpoint == "responses":
                    usage = await _read_response_events(response, record, text=text, ids=ids)
                else:
                    usage = await _read_stream(response, record, chat=endpoint == "chat", text=text)
    except StreamFault as fault:
        record.fail(fault.reason, fault.detail)
        return
    except (TimeoutError, httpx.TimeoutException) as exc:  # before TransportError: timeouts are transport errors too
        record.fail(TIMEOUT, f"no complete answer within {timeout:g} s ({type(exc).__name__})")
        return
    except httpx.TransportError as exc:
        record.fail(CONNECTION, f"{type(exc).__name__}: {exc}")
        return
    except (httpx.HTTPError, UnicodeDecodeError) as exc:  # e.g. a body that does not decode
        record.fail(MALFORMED_SSE, f"{type(exc).__name__}: {exc}")
        return
    _check(record, usage, ignore_eos=ignore_eos)
    record.finished = True


async def _read_stream(response: httpx.Response, record: RequestRecord, *, chat: bool,
                       text: list[str] | None) -> Usage:
    usage: Usage | None = None
    done = False
    last = record.start
    async for line in response.aiter_lines():
        now = time.monotonic()  # taken first: parsing time must not count as server latency
        event = parse_line(line)
        if event is None:
            continue
        if done:
            raise StreamFault(MALFORMED_SSE, "data after [DONE]")
        if event is DONE:
            done = True
            continue
        assert isinstance(event, dict)
        if chunk := chunk_text(event, chat=chat):
            last = _take_chunk(record, chunk, now, last, text)
        if (found := chunk_usage(event)) is not None:
            usage = found
    record.latency = time.monotonic() - record.start  # before the connection goes back to the pool
    if not done:
        raise StreamFault(MISSING_DONE, "the stream ended without data: [DONE]")
    if usage is None:
        raise StreamFault(MISSING_USAGE, "no chunk carried usage (stream_options.include_usage was asked)")
    return usage


async def _read_response_events(response: httpx.Response, record: RequestRecord, *, text: list[str] | None,
                                ids: list[str] | None) -> Usage:
    """A /v1/responses stream: typed events, no [DONE]; it ends with response.completed (or .incomplete), whose
    response carries the id and the usage."""
    end: dict[str, Any] | None = None
    last = record.start
    async for line in response.aiter_lines():
        now = time.monotonic()
        event = parse_line(line)
        if event is None:
            continue
        if event is DONE or end is not None:
            raise StreamFault(MALFORMED_SSE, f"data after {end and end.get('type')}")
        assert isinstance(event, dict)
        kind = event.get("type")
        if kind in ("error", "response.failed"):
            raise StreamFault(STREAM_ERROR, str(event.get("message") or event.get("response", {}).get("error")))
        if kind in RESPONSE_TEXT_EVENTS and (chunk := event.get("delta")):
            last = _take_chunk(record, chunk, now, last, text)
        if kind in RESPONSE_ENDS:
            end = event
    record.latency = time.monotonic() - record.start
    if end is None:
        raise StreamFault(MISSING_DONE, "the stream ended without response.completed")
    body = end.get("response") or {}
    usage = body.get("usage")
    if not isinstance(usage, dict):
        raise StreamFault(MISSING_USAGE, f"{end.get('type')} carried no usage")
    found = chunk_usage({"usage": {"prompt_tokens": usage.get("input_tokens"),
                                   "completion_tokens": usage.get("output_tokens"),
                                   "prompt_tokens_details": usage.get("input_tokens_details")}})
    if ids is not None and isinstance(body.get("id"), str):
        ids.append(body["id"])
    return found


def _take_chunk(record: RequestRecord, chunk: str, now: float, last: float, text: list[str] | None) -> float:
    """Times and counts a text chunk that arrived at `now` (the one before it at `last`) -> now, the next `last`."""
    if record.ttft is None:
        record.ttft = now - record.start
    else:
        record.itl.append(now - last)
    record.chunks += 1
    record.output_chars += len(chunk)
    if text is not None:
        text.append(chunk)
    return now


def _check(record: RequestRecord, usage: Usage, *, ignore_eos: bool) -> None:
    record.prompt_tokens, record.completion_tokens = usage.prompt_tokens, usage.completion_tokens
    record.cached_tokens = usage.cached_tokens
    got, asked = usage.completion_tokens, record.output_len
    if record.chunks == 0 or got == 0:
        record.fail(EMPTY_OUTPUT, f"{record.chunks} text chunks, usage.completion_tokens={got}")
    elif (got != asked) if ignore_eos else (got > asked):
        record.fail(TOKEN_MISMATCH, f"usage.completion_tokens={got}, asked for {asked}")
    elif record.chunks > got:
        # a chunk may carry several tokens (or none, for control tokens), but never less than one
        record.fail(CHUNK_MISMATCH, f"{record.chunks} text chunks but usage.completion_tokens={got}")
