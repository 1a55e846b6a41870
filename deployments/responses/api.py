"""The Responses API of one ingress replica: POST /v1/responses, GET and DELETE /v1/responses/{id}, GET
/v1/responses/{id}/input_items, and POST /v1/responses/{id}/cancel.

A request becomes chat messages (its input after the stored conversation of `previous_response_id`), is rendered
with harmony as chat is (prompt.py), and runs as one engine request through the ingress's Admission (admission.py):
the same slots (429 when full), limits, error shapes, and abort when the client goes. Its web search, code interpreter
and mcp tools are run by this server through the app's MCP tool servers (requested_tools.py, tool_loop.py): a call
of one is followed by another engine request, in the same slot, with its result in the prompt. The engine's outputs
become output items and, when streaming, typed server-sent events (output.py). A stored response keeps its whole
conversation, so that a later request can continue it on any ingress replica (store.py).

`background: true` responses run on a task of this replica (background.py); `ResponseRun` (run.py) is one
response in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import weakref
from typing import Literal

from fastapi import Query
from fastapi.responses import Response, StreamingResponse

from gptoss_serve.cluster.engine_protocol import EngineRequest
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.deployments.admission import Admission
from gptoss_serve.deployments.off_loop import off_loop_if
from gptoss_serve.deployments.protocol import APIError
# SHUT_DOWN: what a background response stopped by its replica's shutdown says (tests read it from here)
from gptoss_serve.deployments.responses.background import SHUT_DOWN, BackgroundResponses  # noqa: F401
from gptoss_serve.deployments.responses.store import StoreClient, store_unavailable
from gptoss_serve.deployments.responses.conversation import (chat_response_format, chat_tool_choice, chat_tools,
                                                             check_call_ids)
from gptoss_serve.deployments.responses.output import new_id
from gptoss_serve.deployments.responses.prompt import render_prompt
from gptoss_serve.deployments.responses.protocol import ResponsesRequest
from gptoss_serve.deployments.responses.requested_tools import RequestedTools, requested_tools
from gptoss_serve.deployments.responses.run import ResponseRun
from gptoss_serve.deployments.responses.tool_servers import ToolServers
from gptoss_serve.cluster.constraints import harmony_constraint

logger = logging.getLogger("ray.serve")
# harmony_constraint names chat's fields; a Responses client sent these
_CHAT_FIELDS = [(re.compile(r"^response_format\.json_schema"), "text.format"),
                (re.compile(r"^response_format"), "text.format"),
                (re.compile(r"^tools\[(\d+)\]\.function"), r"tools.\1"),
                (re.compile(r"^tools\[(\d+)\]"), r"tools.\1"),
                (re.compile(r"^tool_choice\.function"), "tool_choice")]
_CHAT_TOOL = re.compile(r"^tools\[(\d+)\]")


class ResponsesAPI:
    def __init__(self, admission: Admission, store: StoreClient) -> None:
        """admission: the ingress's, whose router, slots and checks the responses share."""
        self.admission, self.store = admission, store
        self.background_runs = BackgroundResponses(admission, store)
        self.tool_servers = ToolServers(admission.args)
        self.background = self.background_runs.tasks  # the background responses this replica runs, by id

    # ---- routes ---------------------------------------------------------------------------------------------
    async def create(self, body: ResponsesRequest):
        admission = self.admission
        admission.check_model(body.model)
        admission.check_limits(tools=body.tools, formats={"text.format": body.format.echo()})
        tools = self._requested_tools(body)
        earlier = await self._conversation(body.previous_response_id)
        try:
            check_call_ids(earlier, body.items)
        except ValueError as e:
            raise _bad_request(e) from None
        conversation = earlier + body.items
        if not conversation:
            raise APIError(400, "input: must not be empty", param="input")
        await tools.list_mcp_tools()  # before the prompt, which declares them; a server that fails offers nothing
        prompt = await render_prompt(admission, conversation, body, tools.harmony())
        # a grammar compiles on a thread (llguidance lets go of the GIL): 0.3 s for a schema of 2,000 properties
        params = await off_loop_if(bool(body.tools or (body.text and body.text.format)), self._sampling_params, body)
        response_id, now = new_id("resp"), time.time()
        request = EngineRequest(response_id, prompt, params, arrival_time=now)
        run = ResponseRun(self, body, response_id, int(now), conversation, tools=tools, params=params)
        if body.background:
            return await self.background_runs.start(run, request)
        run.stream, firsts = await admission.open([request])
        if body.stream:
            events = run.events(firsts)
            # a stream dropped before it starts never runs its `finally`: stop it (and free its slot) when collected
            weakref.finalize(events, run.close)
            return StreamingResponse(events, media_type="text/event-stream")
        return await run.whole(firsts)

    async def retrieve(self, response_id: str, stream: bool = False, starting_after: int | None = None) -> Response:
        """The stored response's JSON as the store holds it: nothing is decoded or encoded again per request."""
        if stream or starting_after is not None:  # OpenAI resumes a background stream so; its events are not kept
            param = "stream" if stream else "starting_after"
            raise APIError(400, f"{param}: resuming a response's event stream is not supported by this server; GET "
                                "the response without `stream` (poll it until it ends)", param=param)
        try:
            raw = await self.store.get_raw(response_id, ["response"])
        except Exception as e:  # noqa: BLE001 - the store's actor failed
            raise store_unavailable(e) from None
        if raw is None:
            raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id",
                           code="not_found")
        return Response(raw["response"], media_type="application/json")

    async def input_items(self, response_id: str, limit: int = Query(20, ge=1, le=100),
                          order: Literal["asc", "desc"] = "desc", after: str | None = None) -> dict:
        """The items of a stored response's own input (not the earlier turns it continued), as OpenAI lists them:
        newest first unless order=asc, `limit` a page, the next page after the id of the last item seen."""
        entry = await self._entry(response_id, "input_items")
        if entry is None:
            raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id",
                           code="not_found")
        items = entry["input_items"] if order == "asc" else entry["input_items"][::-1]
        if after is not None:
            position = next((i for i, item in enumerate(items) if item["id"] == after), None)
            if position is None:
                raise APIError(400, f"after: no input item '{after}' in response '{response_id}'", param="after")
            items = items[position + 1:]
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    async def cancel(self, response_id: str) -> Response:
        """Cancels a background response still running (it is `cancelled` from now on, its generation stopped);
        one that ended is answered as it is. As OpenAI: only a background response can be cancelled."""
        try:
            raw = await self.store.cancel(response_id)
        except Exception as e:  # noqa: BLE001 - the store's actor failed
            raise store_unavailable(e) from None
        if raw is None:
            raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id",
                           code="not_found")
        if not json.loads(raw).get("background"):
            raise APIError(400, "Cannot cancel a synchronous response: only a response created with background: "
                                "true can be cancelled.", param="response_id")
        task = self.background.get(response_id)
        if task is not None:  # it runs here: stop it now (another replica's stops at its next poll)
            task.cancel()
            await asyncio.wait([task])  # its engine request aborted, its slot given back, before the answer
        return Response(raw, media_type="application/json")

    async def shutdown(self) -> None:
        """The replica is going: its background responses are stopped and stored as failed, not left running."""
        await self.background_runs.shutdown()

    async def delete(self, response_id: str) -> dict:
        try:
            deleted = await self.store.delete(response_id)
        except Exception as e:  # noqa: BLE001 - the store's actor failed
            raise store_unavailable(e) from None
        if not deleted:
            raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id",
                           code="not_found")
        return {"id": response_id, "object": "response", "deleted": True}  # as OpenAI answers

    # ---- plumbing -----------------------------------------------------------------------------------------------
    def _requested_tools(self, body: ResponsesRequest) -> RequestedTools:
        """The request's server tools, checked against the app's tool servers (a 400 naming the field)."""
        tools = requested_tools(body.tools, self.tool_servers, max_tool_calls=body.max_tool_calls,
                                tool_choice=body.tool_choice)
        if tools.namespaces and body.format.type != "text":
            # the format's grammar holds the output to an answer (or a function call): no call of a server tool fits
            raise APIError(400, "text.format: a json format cannot be combined with web search, code interpreter or "
                                "mcp tools on this server (its grammar leaves the model no room to call them)",
                           param="text")
        return tools

    async def _entry(self, response_id: str, part: str) -> dict | None:
        """The one part of a stored entry a route needs, decoded (None: no such entry)."""
        try:
            return await self.store.get(response_id, [part])
        except Exception as e:  # noqa: BLE001 - the store's actor failed
            raise store_unavailable(e) from None

    async def _conversation(self, previous_response_id: str | None) -> list[dict]:
        if previous_response_id is None:
            return []
        entry = await self._entry(previous_response_id, "conversation")
        if entry is None:
            raise APIError(404, f"Previous response with id '{previous_response_id}' not found (it was not stored, "
                                "or has expired).", param="previous_response_id", code="previous_response_not_found")
        if "conversation" not in entry:  # a background response that has not completed: nothing to go on from
            raise APIError(400, f"previous_response_id: response '{previous_response_id}' cannot be continued: it is "
                                "still in progress, or it failed or was cancelled", param="previous_response_id")
        return entry["conversation"]

    def _sampling_params(self, body: ResponsesRequest) -> SamplingParams:
        try:
            constraint = harmony_constraint(chat_response_format(body.format.echo()), chat_tools(body.tools),
                                            chat_tool_choice(body.tool_choice))
        except ValueError as e:
            # chat's tools are the function tools alone: the index of one there is not its index in `tools`
            functions = [i for i, tool in enumerate(body.tools or []) if tool.get("type") == "function"]
            message = _CHAT_TOOL.sub(lambda m: f"tools[{functions[int(m.group(1))]}]", str(e), count=1)
            raise _bad_request(ValueError(message), renames=_CHAT_FIELDS) from None
        fields = {"max_tokens": body.max_output_tokens, "structured_output": constraint}
        fields |= {name: getattr(body, name) for name in ("temperature", "top_p") if getattr(body, name) is not None}
        try:
            return SamplingParams(**fields)
        except ValueError as e:  # SamplingParams names the field first
            raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None

    async def save(self, response: dict, entry: dict) -> None:
        """Best effort: a store that fails leaves the response unstored (logged), not the client without it. A
        response too large to store (response_store_max_entry_bytes) is not kept, and says so: `store: false`, as
        one whose client asked not to store it (GET and previous_response_id then answer 404 alike)."""
        try:
            stored = await self.store.put(response["id"], entry)
        except Exception as e:  # noqa: BLE001
            logger.warning("response %s not stored: %s: %s", response["id"], type(e).__name__, e)
            return
        if not stored:
            response["store"] = False


def _bad_request(e: ValueError, *, renames=()) -> APIError:
    message = str(e)
    for pattern, name in renames:
        message = pattern.sub(name, message, count=1)
    field = re.match(r"[A-Za-z_]+", message)
    return APIError(400, message, param=field.group(0) if field else None)
