"""Admission: what every generating route of one ingress replica shares (chat, completions, Responses).

The served model's name, the per-request limits checked before anything runs (400 naming the field), the slots
(429 with Retry-After when every one is taken), and the ChoiceStream that carries an admitted request's engine
requests to the router and their items back. A route checks, builds its engine requests, and `open`s them; the
stream holds its slot until it is closed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from gptoss_serve.cluster.engine_protocol import GRAMMAR_FAILED, EngineRequest, StreamItem
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.batch_streamer import BatchStreamer
from gptoss_serve.deployments.protocol import APIError, json_size
from gptoss_serve.deployments.request_stream import RequestStream


# the engine's refusals name their field first ("min_tokens is 60, but ..."); those of these fields are about that
# field (the Responses API has no min_tokens); the others (the prompt's length, its token ids, max_tokens, which the
# Responses API calls max_output_tokens) are reported against the prompt
ENGINE_ERROR_FIELDS = ("min_tokens",)


def raise_if_error(items: list[StreamItem], format_param: str = "response_format") -> None:
    """The first error among a step's items as the APIError the client gets; a grammar that failed is blamed on
    `format_param`, the field of the request's structured output."""
    for item in items:
        if item.error is not None:
            field = item.error.split(" ", 1)[0].rstrip(":")
            param = None
            if item.status == 400:
                param = format_param if field == GRAMMAR_FAILED else field if field in ENGINE_ERROR_FIELDS else "prompt"
            raise APIError(item.status, item.error, param=param, retry_after=1 if item.status == 429 else None)


class ChoiceStream(RequestStream):
    """The engine requests of one HTTP request (its choices, in order), sent together and holding one slot until
    closed; their items come back one engine step at a time, each tagged with its choice's index."""

    def __init__(self, requests: list[EngineRequest], router: BatchStreamer, release_slot) -> None:
        super().__init__([r.request_id for r in requests], abort=router.abort, on_close=release_slot)
        self.choice_of = {request_id: i for i, request_id in enumerate(self.request_ids)}
        router.submit(requests, self)

    async def next_choices(self) -> list[tuple[int, StreamItem]]:
        return [(self.choice_of[item.request_id], item) for item in await self.next()]

    async def choice_steps(self, firsts: list[tuple[int, StreamItem]]) -> AsyncIterator[list[tuple[int, StreamItem]]]:
        """`firsts` (what `Admission.open` returned), then each step's items, until no choice is open; the caller may
        `end` choices in between."""
        items = firsts
        while True:
            yield items
            if not self.open:
                return
            items = await self.next_choices()

    async def first(self) -> list[tuple[int, StreamItem]]:
        """Items up to every choice's first, raising APIError when a choice failed before producing anything."""
        items, started = [], set()
        while len(started) < len(self.choice_of):
            batch = await self.next_choices()
            if not batch and not self.open:
                raise APIError(503, "the request ended before it started; retry shortly", retry_after=1)
            raise_if_error([item for _, item in batch])
            items += batch
            started.update(index for index, _ in batch)
        return items

    def end(self, index: int) -> None:
        """Stops one choice's request (a stop string ended it); its later items, if any, are dropped."""
        self.abort([self.request_ids[index]])


class Admission:
    def __init__(self, router, args: AppArgs) -> None:
        """router: a handle to the BatchingRouter (anything with its two methods in tests)."""
        self.router = BatchStreamer(router, max_batch_size=args.router_max_batch_size,
                                    max_wait_ms=args.router_max_wait_ms)
        self.args = args
        self.in_flight = 0
        self.capacity = args.max_ongoing_requests + args.max_queued_requests

    def check_model(self, model: str) -> None:
        if model != self.args.served_model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                                f"{self.args.served_model_name!r}", param="model", code="model_not_found")

    def check_limits(self, *, stops: Sequence[str] = (), tools: Sequence | None = None,
                     stop_token_ids: Sequence[int] | None = None, formats: dict[str, Any] | None = None) -> None:
        """formats: structured-output formats by the field that holds them (`response_format`, `text.format`);
        they and each tool are bounded in size (max_schema_bytes), which bounds their grammar's compile time."""
        if len(stops) > self.args.max_stop_strings:
            raise APIError(400, f"stop: {len(stops)} stop strings, more than this server's limit of "
                                f"{self.args.max_stop_strings}", param="stop")
        if any(len(s) > self.args.max_stop_length for s in stops):
            raise APIError(400, f"stop: a stop string is longer than this server's limit of "
                                f"{self.args.max_stop_length} characters", param="stop")
        if len(tools or ()) > self.args.max_tools:
            raise APIError(400, f"tools: {len(tools)} tools, more than this server's limit of "
                                f"{self.args.max_tools}", param="tools")
        if len(stop_token_ids or ()) > self.args.max_stop_token_ids:
            raise APIError(400, f"stop_token_ids: {len(stop_token_ids)} token ids, more than this server's limit of "
                                f"{self.args.max_stop_token_ids}", param="stop_token_ids")
        limit = self.args.max_schema_bytes
        sized = [(name, value) for name, value in (formats or {}).items() if value is not None]
        for name, value in sized + [(f"tools.{i}", tool) for i, tool in enumerate(tools or ())]:
            if json_size(value, limit) > limit:
                raise APIError(400, f"{name}: larger than this server's limit of {limit} bytes as JSON",
                               param=name.split(".")[0])

    def check_prompt_length(self, prompts: list[list[int]], param: str) -> None:
        longest = max(map(len, prompts), default=0)
        if longest > self.args.max_prompt_tokens:
            raise APIError(400, f"{param}: the prompt has {longest} tokens, more than this server's limit of "
                                f"{self.args.max_prompt_tokens}", param=param)

    def check_capacity(self) -> None:
        if self.in_flight >= self.capacity:
            raise APIError(429, "the server is at capacity; retry shortly", retry_after=1)

    async def open(self, requests: list[EngineRequest], *,
                   slot_held: bool = False) -> tuple[ChoiceStream, list[tuple[int, StreamItem]]]:
        """Sends the requests holding a slot -> (their stream, its first items). On a failure before the first
        items the stream is closed (its requests aborted, the slot given back) and the error raised.
        slot_held: the caller holds a slot already, in a stream it keeps open (a response that generates again after
        running a tool): no slot is taken, and none is given back when this stream closes."""
        if not slot_held:
            self.check_capacity()
        stream = ChoiceStream(requests, self.router, None if slot_held else self._take_slot())
        try:
            firsts = await stream.first()
        except BaseException:
            stream.close()
            raise
        return stream, firsts

    def _take_slot(self):
        """Counts a request in; the returned callable counts it out (the stream calls it once, when closed)."""
        self.in_flight += 1

        def release() -> None:
            self.in_flight -= 1

        return release
