"""Background responses (`background: true`) of one ingress replica: started, run to their stored end, stopped.

The request is admitted (a slot, or a 429) and stored `in_progress`, and the create call answers at once; an asyncio
task of this replica then generates it, holding the slot as a foreground request does, and stores its end
(`completed`, `incomplete`, `failed` with an error; `cancelled` is written by the cancel). With `stream: true` the
create call streams its events too, but a client that leaves only stops reading: the response goes on. Its events are
not kept, so a stream cannot be resumed (GET ?stream=true is a 400): poll GET instead.
Cancel reaches the task wherever it runs: the store marks the response `cancelled` (store.py), the replica asked
stops it at once if it runs it, and any other replica running it stops it at its next poll of the store (every
CANCEL_POLL_S); the engine request is aborted as a client's disconnect aborts it, freeing its slot and KV blocks. A
replica shutting down fails its running ones; one that dies leaves them to the store, which fails them once their
lease lapses.
"""

from __future__ import annotations

import asyncio
import logging
from fastapi.responses import StreamingResponse

from gptoss_serve.cluster.engine_protocol import EngineRequest
from gptoss_serve.deployments.admission import Admission
from gptoss_serve.deployments.protocol import APIError
from gptoss_serve.deployments.responses.run import ResponseRun, error_object
from gptoss_serve.deployments.responses.store import StoreClient, store_unavailable

logger = logging.getLogger("ray.serve")
CANCEL_POLL_S = 0.1  # how soon a cancel sent to another replica stops a background response (one store call)
SHUT_DOWN = {"code": "server_error", "message": "the server replica running this background response shut down"}


class BackgroundResponses:
    """The background responses this replica runs, by id (`tasks`), and the poll that stops those cancelled
    elsewhere."""

    def __init__(self, admission: Admission, store: StoreClient) -> None:
        self.admission, self.store = admission, store
        self.tasks: dict[str, asyncio.Task] = {}
        self._poller: asyncio.Task | None = None

    async def start(self, run: ResponseRun, request: EngineRequest):
        """Admits and stores a background response, starts its task -> the response `in_progress` (or, with
        `stream`, its events as they come)."""
        self.admission.check_capacity()  # a 429 now, as in the foreground, before anything is stored
        response = run.response("in_progress")
        try:
            stored = await self.store.put(run.id, {"response": response, "input_items": run.input_items},
                                          running=True)
        except Exception as e:  # noqa: BLE001 - the store's actor failed: a background response could not be polled
            raise store_unavailable(e) from None
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
        sink = Sink() if run.body.stream else None
        self.tasks[run.id] = asyncio.create_task(self._generate(run, opening, sink))
        # let it start: a task cancelled before its first step never runs its `try`, which alone ends it cleanly
        await asyncio.sleep(0)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_stops())
        if sink is not None:
            return StreamingResponse(sink.chunks(), media_type="text/event-stream")
        return response

    async def shutdown(self) -> None:
        """The replica is going: its background responses are stopped and stored as failed, not left running."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)

    async def _generate(self, run: ResponseRun, opening: asyncio.Future, sink: Sink | None) -> None:
        """A background response's generation, to its stored end; its stream is closed on every way out."""
        try:
            run.stream, firsts = await opening
            if sink is None:
                await run.whole(firsts)
            else:
                async for chunk in run.events(firsts):
                    sink.send(chunk)
        except APIError as e:  # the engine refused or failed it
            await self._fail(run, error_object(e), sink)
        except asyncio.CancelledError:  # cancelled (the store keeps it `cancelled`: this end is refused), or shut down
            await self._fail(run, SHUT_DOWN, sink)
            raise
        except Exception as e:  # noqa: BLE001 - a failure of this server: the response must still end
            logger.exception("background response %s failed", run.id)
            await self._fail(run, {"code": "server_error", "message": f"{type(e).__name__}: {e}"}, sink)
        finally:
            # stopped before it was admitted (cancelled at once): admission.open closes what it opened when cancelled
            opening.cancel()
            if opening.done() and not opening.cancelled() and opening.exception() is None:
                opening.result()[0].close()  # idempotent: its slot is given back once
            if sink is not None:
                sink.end()
            del self.tasks[run.id]

    async def _fail(self, run: ResponseRun, error: dict, sink: Sink | None) -> None:
        """A background response failed (or was stopped) outside its events: stored as failed unless it was
        cancelled; its stream, if any, is told when so."""
        response = await run.finish(error)
        if run.stored_end and sink is not None:
            sink.send(run.sse({"type": "response.failed", "response": response}))

    async def store_end(self, response: dict, entry: dict) -> bool:
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
        while self.tasks:
            await asyncio.sleep(CANCEL_POLL_S)
            try:
                stops = await self.store.poll(list(self.tasks))
            except Exception as e:  # noqa: BLE001 - the store's actor failed: try again at the next poll
                logger.warning("response store poll failed: %s: %s", type(e).__name__, e)
                continue
            for response_id in stops:
                if (task := self.tasks.get(response_id)) is not None:
                    task.cancel()


class Sink:
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
