"""ResponseRun: one response in flight, from its admitted engine request to its stored end.

Its engine stream's outputs become output items and, when streaming, numbered server-sent events (output.py). A
response that calls the server's tools generates in rounds (tool_loop.py): each later round is an engine request of
its own, in the slot the first one took (held, with its stream, until the response ends), its prompt the whole
conversation rendered again (prompt.py), checked against the prompt limit as the first was, and its output budget what
`max_output_tokens` leaves. Its end is stored as the request asked: a foreground response unless it failed (or
`store: false`), a background one always (as its running entry's end, background.py), with the whole conversation
that a later `previous_response_id` goes on from.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from typing import TYPE_CHECKING

from gptoss_serve.cluster.engine_protocol import EngineRequest, StreamItem
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.deployments.admission import ChoiceStream, raise_if_error
from gptoss_serve.deployments.protocol import APIError
from gptoss_serve.deployments.responses.output import ResponseOutput, new_id
from gptoss_serve.deployments.responses.prompt import render_prompt
from gptoss_serve.deployments.responses.protocol import ResponsesRequest
from gptoss_serve.deployments.responses.requested_tools import RequestedTools
from gptoss_serve.deployments.responses.tool_loop import ToolLoop

if TYPE_CHECKING:
    from gptoss_serve.deployments.responses.api import ResponsesAPI

_ITEM_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


class ResponseRun:
    """One response in flight: its engine streams (one a round), what it has output so far, and how it ends."""

    def __init__(self, api: ResponsesAPI, body: ResponsesRequest, response_id: str, created_at: int,
                 conversation: list[dict], *, tools: RequestedTools, params: SamplingParams) -> None:
        self.api, self.body, self.id = api, body, response_id
        self.streams: list[ChoiceStream] = []  # a round's each, once admitted; the first holds the slot
        self.conversation = conversation
        self.tools, self.params = tools, params
        self.loop = ToolLoop(tools)
        self.input_items = [listed_input_item(item) for item in body.items]  # ids kept from start to end
        self.output = ResponseOutput(server_namespaces=tools.namespaces, container_id=tools.container_id)
        self.opening_events = self._listings()  # sent first, when streaming
        self.numbers = itertools.count()  # the events' sequence numbers
        self.stored_end = False  # a background response's end was stored (it was not cancelled meanwhile)
        self.header = {"id": response_id, "object": "response", "created_at": created_at,
                       "model": api.admission.args.served_model_name}

    @property
    def stream(self) -> ChoiceStream | None:
        """The stream of the round generating now."""
        return self.streams[-1] if self.streams else None

    @stream.setter
    def stream(self, stream: ChoiceStream) -> None:
        self.streams.append(stream)

    def response(self, status: str, *, error: dict | None = None) -> dict:
        done = status in ("completed", "incomplete", "failed")
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {**self.header, "status": status, "error": error, "incomplete_details": incomplete,
                **self.body.echo(), "output": [dict(item) for item in self.output.items] if done else [],
                "usage": self.output.usage() if done else None,
                **({"completed_at": int(time.time())} if status == "completed" else {})}

    async def whole(self, firsts) -> dict:
        try:
            async for _ in self._steps(firsts):
                pass
        except _EngineFailure as e:
            raise_if_error([e.item], format_param="text")
        finally:
            self.close()
        return await self.finish()

    async def finish(self, error: dict | None = None) -> dict:
        """The response as it ended, stored: a foreground one unless it failed (or store: false), a background one
        always (as its running entry's end)."""
        response = self.response("failed" if error else self.output.status, error=error)
        entry = {"response": response, "input_items": self.input_items}
        if error is None:
            entry["conversation"] = self.conversation + self.output.conversation_items()
        if self.body.background:
            self.stored_end = await self.api.background_runs.store_end(response, entry)
        elif error is None and self.body.store is not False:
            await self.api.save(response, entry)
        return response

    def sse(self, event: dict) -> str:
        event = {"type": event["type"], "sequence_number": next(self.numbers)} | event
        return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"

    async def events(self, firsts):
        """Server-sent events, each numbered; one write per engine step (and per step of a tool call)."""
        sse = self.sse
        try:
            yield "".join(map(sse, [{"type": "response.created", "response": self.response("in_progress")},
                                    {"type": "response.in_progress", "response": self.response("in_progress")},
                                    *self.opening_events]))
            try:
                async for events in self._steps(firsts):
                    if events:
                        yield "".join(map(sse, events))
            except _EngineFailure as e:
                response = await self.finish({"code": "server_error", "message": e.item.error})
                yield sse({"type": "response.failed", "response": response})
                return
            except APIError as e:  # a later round's prompt refused (past the prompt limit)
                response = await self.finish(error_object(e))
                yield sse({"type": "response.failed", "response": response})
                return
            response = await self.finish()
            yield sse({"type": f"response.{response['status']}", "response": response})
        finally:  # also when the client disconnects: stop the engine request, free the slot
            self.close()

    def close(self) -> None:
        """Stops what is still running (idempotent): the engine requests, the slot, the tool sessions."""
        for stream in self.streams:
            stream.close()
        self.loop.close()

    async def _steps(self, firsts):
        """Each engine step's events, round after round: a round that ends in a server call runs it (its events
        too), and the next round generates with its result."""
        items = firsts
        while True:
            async for step in self.stream.choice_steps(items):
                events = []
                for _, item in step:
                    if item.error is not None:
                        yield events
                        raise _EngineFailure(item)
                    if item.output is not None:
                        events += self.output.feed(item.output)
                yield events
            call = self.output.pending
            if call is None:
                return
            yield call.running()
            yield self.output.call_done(call, await self.loop.run(call))
            if self.loop.over:
                return
            items = await self._next_round()
            if items is None:
                return

    async def _next_round(self) -> list | None:
        """Opens the next round -> its first items; None when no output budget is left (the response is then
        incomplete)."""
        budget = self.body.max_output_tokens
        if budget is not None and budget - self.output.total_output_tokens <= 0:
            self.output.cut_short()
            return None
        conversation = self.conversation + self.output.conversation_items()
        try:
            prompt = await render_prompt(self.api.admission, conversation, self.body, self.tools.harmony())
        except APIError as e:
            raise APIError(e.status, f"{e.message} (the prompt with the results of this response's tool calls)",
                           param=e.param) from None
        self.output.next_round()
        params = dataclasses.replace(self.params, max_tokens=None if budget is None else
                                     budget - self.output.total_output_tokens)
        request = EngineRequest(f"{self.id}.{len(self.streams)}", prompt, params, arrival_time=time.time())
        self.stream, firsts = await self.api.admission.open([request], slot_held=True)
        return firsts

    def _listings(self) -> list[dict]:
        """The events of the MCP servers' tool listings, each an `mcp_list_tools` item: for a server this
        conversation has not listed yet (or that failed to list now)."""
        listed = {item["server_label"] for item in self.conversation if item["type"] == "mcp_list_tools"}
        events = []
        for label, grant in self.tools.mcp.items():
            if label not in listed or grant.error:
                tools = None if grant.error else [tool.listed() for tool in grant.tools]
                events += self.output.add_listing(label, tools, grant.error)
        return events


class _EngineFailure(Exception):
    """An engine item that carries an error: the response fails."""

    def __init__(self, item: StreamItem) -> None:
        super().__init__(item.error)
        self.item = item


def error_object(e: APIError) -> dict:
    """An APIError as a failed response's `error`, with one of OpenAI's codes for it."""
    code = "rate_limit_exceeded" if e.status == 429 else "invalid_prompt" if e.status < 500 else "server_error"
    return {"code": code, "message": e.message}


def listed_input_item(item: dict) -> dict:
    """A normalized input item as GET /v1/responses/{id}/input_items lists it: with an id and a status (an assistant
    message's text as output_text with its annotations, as in an output item)."""
    listed = {"id": new_id(_ITEM_ID_PREFIX[item["type"]]), **item}
    if item["type"] == "reasoning":
        return listed | {"summary": []}
    if item["type"] == "message" and item["role"] == "assistant":
        listed["content"] = [{**part, "annotations": []} for part in item["content"]]
    return listed | {"status": "completed"}
