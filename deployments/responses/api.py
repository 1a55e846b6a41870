"""The Responses API of one ingress replica: POST /v1/responses, GET and DELETE /v1/responses/{id}, GET
/v1/responses/{id}/input_items, and POST /v1/responses/{id}/cancel.

A request becomes chat messages (its input after the stored conversation of `previous_response_id`), is rendered
with harmony as chat is, and runs as one engine request through the ingress's Admission (admission.py): the same
slots (429 when full), limits, error shapes, and abort when the client goes. The engine's outputs become output
items and, when streaming, typed server-sent events (output.py). A stored response keeps its whole conversation, so
that a later request can continue it on any ingress replica (store.py).

`background: true`: the request is admitted (a slot, or a 429) and stored `in_progress`, and the create call answers
at once; an asyncio task of this replica then generates it, holding the slot as a foreground request does, and
stores its end (`completed`, `incomplete`, `failed` with an error; `cancelled` is written by the cancel). With
`stream: true` the create call streams its events too, but a client that leaves only stops reading: the response goes
on. Its events are not kept, so a stream cannot be resumed (GET ?stream=true is a 400): poll GET instead.
Cancel reaches the task wherever it runs: the store marks the response `cancelled` (store.py), the replica asked
stops it at once if it runs it, and any other replica running it stops it at its next poll of the store (every
CANCEL_POLL_S); the engine request is aborted as a client's disconnect aborts it, freeing its slot and KV blocks. A
replica shutting down fails its running ones; one that dies leaves them to the store, which fails them once their
lease lapses.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
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
from gptoss_serve.deployments.admission import Admission, ChoiceStream, raise_if_error
from gptoss_serve.deployments.off_loop import QUICK_CHARS, check_prompt_size, message_texts, off_loop_if
from gptoss_serve.deployments.protocol import APIError
from gptoss_serve.deployments.responses.store import StoreClient
from gptoss_serve.deployments.responses.conversation import (chat_response_format, chat_tool_choice, chat_tools,
                                                             check_call_ids, to_chat_messages)
from gptoss_serve.deployments.responses.output import ResponseOutput, new_id
from gptoss_serve.deployments.responses.protocol import ResponsesRequest
from gptoss_serve.model import harmony
from gptoss_serve.cluster.constraints import harmony_constraint

logger = logging.getLogger("ray.serve")
CANCEL_POLL_S = 0.1  # how soon a cancel sent to another replica stops a background response (one store call)
SHUT_DOWN = {"code": "server_error", "message": "the server replica running this background response shut down"}
# harmony_constraint names chat's fields; a Responses client sent these
_CHAT_FIELDS = [(re.compile(r"^response_format\.json_schema"), "text.format"),
                (re.compile(r"^response_format"), "text.format"),
                (re.compile(r"^tools\[(\d+)\]\.function"), r"tools.\1"),
                (re.compile(r"^tools\[(\d+)\]"), r"tools.\1"),
                (re.compile(r"^tool_choice\.function"), "tool_choice")]


class ResponsesAPI:
    def __init__(self, admission: Admission, store: StoreClient) -> None:
        """admission: the ingress's, whose router, slots and checks the responses share."""
        self.admission, self.store = admission, store
        self.background: dict[str, asyncio.Task] = {}  # the background responses this replica runs, by id
        self._poller: asyncio.Task | None = None

    # ---- routes ---------------------------------------------------------------------------------------------
    async def create(self, body: ResponsesRequest):
        admission = self.admission
        admission.check_model(body.model)
        admission.check_limits(tools=body.tools, formats={"text.format": body.format.echo()})
        earlier = await self._conversation(body.previous_response_id)
        try:
            check_call_ids(earlier, body.items)
        except ValueError as e:
            raise _bad_request(e) from None
        conversation = earlier + body.items
        if not conversation:
            raise APIError(400, "input: must not be empty", param="input")
        try:
            messages = to_chat_messages(conversation, instructions=body.instructions)
            # a prompt that cannot fit is refused before it is rendered; a long one renders on a thread (its long texts
            # are encoded by tiktoken, which lets go of the GIL)
            texts = message_texts(messages)
            await check_prompt_size(texts, admission.args.max_prompt_tokens, "input")
            prompt = await off_loop_if(sum(map(len, texts)) > QUICK_CHARS, functools.partial(
                harmony.render_chat, messages, reasoning_effort=body.effort, tools=chat_tools(body.tools)))
        except harmony.RenderError as e:  # harmony refused the whole: blamed on the tools or the input
            param = "tools" if e.param == "tools" else "input"
            raise APIError(400, f"{param}: {e.reason}", param=param) from None
        except ValueError as e:  # the items were checked: what is left is harmony's complaint about the whole
            raise APIError(400, f"input: {e}", param="input") from None
        admission.check_prompt_length([prompt], "input")
        # a grammar compiles on a thread (llguidance lets go of the GIL): 0.3 s for a schema of 2,000 properties
        params = await off_loop_if(bool(body.tools or (body.text and body.text.format)), self._sampling_params, body)
        response_id, now = new_id("resp"), time.time()
        request = EngineRequest(response_id, prompt, params, arrival_time=now)
        run = _Run(self, body, response_id, int(now), conversation)
        if body.background:
            return await self._start_background(run, request)
        run.stream, firsts = await admission.open([request])
        if body.stream:
            events = run.events(firsts)
            # a stream dropped before it starts never runs its `finally`: stop it (and free its slot) when collected
            weakref.finalize(events, run.stream.close)
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
            raise _store_unavailable(e) from None
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
            raise _store_unavailable(e) from None
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
        tasks = list(self.background.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)

    async def delete(self, response_id: str) -> dict:
        try:
            deleted = await self.store.delete(response_id)
        except Exception as e:  # noqa: BLE001 - the store's actor failed
            raise _store_unavailable(e) from None
        if not deleted:
            raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id",
                           code="not_found")
        return {"id": response_id, "object": "response", "deleted": True}  # as OpenAI answers

    # ---- plumbing -----------------------------------------------------------------------------------------------
    async def _entry(self, response_id: str, part: str) -> dict | None:
        """The one part of a stored entry a route needs, decoded (None: no such entry)."""
        try:
            return await self.store.get(response_id, [part])
        except Exception as e:  # noqa: BLE001 - the store's actor failed
            raise _store_unavailable(e) from None

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
            raise _bad_request(e, renames=_CHAT_FIELDS) from None
        fields = {"max_tokens": body.max_output_tokens, "structured_output": constraint}
        fields |= {name: getattr(body, name) for name in ("temperature", "top_p") if getattr(body, name) is not None}
        try:
            return SamplingParams(**fields)
        except ValueError as e:  # SamplingParams names the field first
            raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None

    async def _save(self, response: dict, entry: dict) -> None:
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

    # ---- background responses -----------------------------------------------------------------------------------
    async def _start_background(self, run: _Run, request: EngineRequest):
        """Admits and stores a background response, starts its task -> the response `in_progress` (or, with
        `stream`, its events as they come)."""
        self.admission.check_capacity()  # a 429 now, as in the foreground, before anything is stored
        response = run.response("in_progress")
        try:
            stored = await self.store.put(run.id, {"response": response, "input_items": run.input_items},
                                          running=True)
        except Exception as e:  # noqa: BLE001 - the store's actor failed: a background response could not be polled
            raise _store_unavailable(e) from None
        if not stored:
            raise APIError(400, "background: this request is too large to store (response_store_max_entry_bytes), "
                                "and a background response must be stored", param="background")
        opening = asyncio.ensure_future(self.admission.open([request]))
        # open() takes the slot (or refuses) before its first await: let it, so that the slot is held (or the 429
        # given, when the store's await let another request take the last one) before this call answers
        await asyncio.sleep(0)
        if opening.done() and opening.exception() is not None:
            await self.store.delete(run.id)
            raise opening.exception()
        sink = _Sink() if run.body.stream else None
        self.background[run.id] = asyncio.create_task(self._in_background(run, opening, sink))
        # let it start: a task cancelled before its first step never runs its `try`, which alone ends it cleanly
        await asyncio.sleep(0)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_stops())
        if sink is not None:
            return StreamingResponse(sink.chunks(), media_type="text/event-stream")
        return response

    async def _in_background(self, run: _Run, opening: asyncio.Future, sink: _Sink | None) -> None:
        """A background response's generation, to its stored end; its stream is closed on every way out."""
        try:
            run.stream, firsts = await opening
            if sink is None:
                await run.whole(firsts)
            else:
                async for chunk in run.events(firsts):
                    sink.send(chunk)
        except APIError as e:  # the engine refused or failed it
            await run.fail(_error_object(e), sink)
        except asyncio.CancelledError:  # cancelled (the store keeps it `cancelled`: this end is refused), or shut down
            await run.fail(SHUT_DOWN, sink)
            raise
        except Exception as e:  # noqa: BLE001 - a failure of this server: the response must still end
            logger.exception("background response %s failed", run.id)
            await run.fail({"code": "server_error", "message": f"{type(e).__name__}: {e}"}, sink)
        finally:
            # stopped before it was admitted (cancelled at once): admission.open closes what it opened when cancelled
            opening.cancel()
            if opening.done() and not opening.cancelled() and opening.exception() is None:
                opening.result()[0].close()  # idempotent: its slot is given back once
            if sink is not None:
                sink.end()
            del self.background[run.id]

    async def _store_end(self, response: dict, entry: dict) -> bool:
        """A background response's end, replacing its running entry unless it was cancelled (or is gone) -> stored.
        An end too large to store is stored as failed, without its output: the client must not poll for ever."""
        try:
            outcome = await self.store.update(response["id"], entry)
            if outcome == "too_large":
                error = {"code": "server_error", "message": "the response is larger than this server stores "
                                                            "(response_store_max_entry_bytes)"}
                failed = {**response, "status": "failed", "error": error, "output": [], "usage": None}
                failed.pop("completed_at", None)
                outcome = await self.store.update(response["id"], {"response": failed,
                                                                   "input_items": entry["input_items"]})
        except Exception as e:  # noqa: BLE001 - the store's actor failed; its lease will fail it there
            logger.warning("background response %s: its end not stored: %s: %s", response["id"],
                           type(e).__name__, e)
            return False
        return outcome == "stored"

    async def _poll_stops(self) -> None:
        """While this replica runs background responses: stops those cancelled through another replica (or given up
        by the store). One store call for all of them, which also renews their leases."""
        while self.background:
            await asyncio.sleep(CANCEL_POLL_S)
            try:
                stops = await self.store.poll(list(self.background))
            except Exception as e:  # noqa: BLE001 - the store's actor failed: try again at the next poll
                logger.warning("response store poll failed: %s: %s", type(e).__name__, e)
                continue
            for response_id in stops:
                if (task := self.background.get(response_id)) is not None:
                    task.cancel()


class _Run:
    """One response in flight: its engine stream, what it has output so far, and how it ends."""

    def __init__(self, api: ResponsesAPI, body: ResponsesRequest, response_id: str, created_at: int,
                 conversation: list[dict]) -> None:
        self.api, self.body, self.id = api, body, response_id
        self.stream: ChoiceStream | None = None  # once admitted
        self.conversation = conversation
        self.input_items = [listed_input_item(item) for item in body.items]  # ids kept from start to end
        self.output = ResponseOutput()
        self.numbers = itertools.count()  # the events' sequence numbers
        self.stored_end = False  # a background response's end was stored (it was not cancelled meanwhile)
        self.header = {"id": response_id, "object": "response", "created_at": created_at,
                       "model": api.admission.args.served_model_name}

    def response(self, status: str, *, error: dict | None = None) -> dict:
        done = status in ("completed", "incomplete", "failed")
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {**self.header, "status": status, "error": error, "incomplete_details": incomplete,
                **self.body.echo(), "output": [dict(item) for item in self.output.items] if done else [],
                "usage": self.output.usage() if done else None,
                **({"completed_at": int(time.time())} if status == "completed" else {})}

    async def whole(self, firsts) -> dict:
        try:
            async for items in self.stream.choice_steps(firsts):
                raise_if_error([item for _, item in items], format_param="text")
                for _, item in items:
                    if item.output is not None:
                        self.output.feed(item.output)
        finally:
            self.stream.close()
        return await self._finish()

    async def _finish(self, error: dict | None = None) -> dict:
        """The response as it ended, stored: a foreground one unless it failed (or store: false), a background one
        always (as its running entry's end)."""
        response = self.response("failed" if error else self.output.status, error=error)
        entry = {"response": response, "input_items": self.input_items}
        if error is None:
            entry["conversation"] = self.conversation + [_conversation_item(i) for i in self.output.items]
        if self.body.background:
            self.stored_end = await self.api._store_end(response, entry)
        elif error is None and self.body.store is not False:
            await self.api._save(response, entry)
        return response

    async def fail(self, error: dict, sink: _Sink | None) -> None:
        """A background response failed (or was stopped) outside its events: stored as failed unless it was
        cancelled; its stream, if any, is told when so."""
        response = await self._finish(error)
        if self.stored_end and sink is not None:
            sink.send(self.sse({"type": "response.failed", "response": response}))

    def sse(self, event: dict) -> str:
        event = {"type": event["type"], "sequence_number": next(self.numbers)} | event
        return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"

    async def events(self, firsts):
        """Server-sent events, each numbered; one write per engine step."""
        sse = self.sse
        try:
            yield sse({"type": "response.created", "response": self.response("in_progress")}) + sse(
                {"type": "response.in_progress", "response": self.response("in_progress")})
            async for items in self.stream.choice_steps(firsts):
                events = []
                for _, item in items:
                    if item.error is not None:
                        response = await self._finish({"code": "server_error", "message": item.error})
                        yield "".join(map(sse, events)) + sse({"type": "response.failed", "response": response})
                        return
                    events += self.output.feed(item.output)
                if events:
                    yield "".join(map(sse, events))
            response = await self._finish()
            yield sse({"type": f"response.{response['status']}", "response": response})
        finally:  # also when the client disconnects: stop the engine request, free the slot
            self.stream.close()


class _Sink:
    """The events of a streamed background response, for the client that created it. A client that leaves only
    stops reading: the response goes on, and its later events are dropped."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.reading = True

    def send(self, chunk: str) -> None:
        if self.reading:
            self.queue.put_nowait(chunk)

    def end(self) -> None:
        self.queue.put_nowait(None)

    async def chunks(self):
        try:
            while (chunk := await self.queue.get()) is not None:
                yield chunk
        finally:
            self.reading = False


_ITEM_ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def listed_input_item(item: dict) -> dict:
    """A normalized input item as GET /v1/responses/{id}/input_items lists it: with an id and a status (an assistant
    message's text as output_text with its annotations, as in an output item)."""
    listed = {"id": new_id(_ITEM_ID_PREFIX[item["type"]]), **item}
    if item["type"] == "reasoning":
        return listed | {"summary": []}
    if item["type"] == "message" and item["role"] == "assistant":
        listed["content"] = [{**part, "annotations": []} for part in item["content"]]
    return listed | {"status": "completed"}


def _conversation_item(item: dict) -> dict:
    """An output item as the conversation keeps it (what the next turn's prompt needs)."""
    if item["type"] == "function_call":
        return {k: item[k] for k in ("type", "call_id", "name", "arguments")}
    if item["type"] == "reasoning":
        return {"type": "reasoning", "content": [{"type": "reasoning_text", "text": item["content"][0]["text"]}]}
    return {"type": "message", "role": "assistant", "content": [{"type": "output_text",
                                                                  "text": item["content"][0]["text"]}]}


def _bad_request(e: ValueError, *, renames=()) -> APIError:
    message = str(e)
    for pattern, name in renames:
        message = pattern.sub(name, message, count=1)
    field = re.match(r"[A-Za-z_]+", message)
    return APIError(400, message, param=field.group(0) if field else None)


def _error_object(e: APIError) -> dict:
    """An APIError as a failed response's `error`, with one of OpenAI's codes for it."""
    code = "rate_limit_exceeded" if e.status == 429 else "invalid_prompt" if e.status < 500 else "server_error"
    return {"code": code, "message": e.message}


def _store_unavailable(e: Exception) -> APIError:
    logger.warning("response store failed: %s: %s", type(e).__name__, e)
    return APIError(503, "the response store is unavailable; retry shortly")
