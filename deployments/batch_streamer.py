"""BatchStreamer: many callers' requests travel downstream together, one streaming call per batch.

The ingress and the BatchingRouter both talk to the next hop through one of these. Callers `submit` requests
with the RequestStream their items go to. Requests gather in a short adaptive window: with nothing in flight
downstream a batch leaves at once; while downstream is busy it waits at most `max_wait_ms` for company, and a full
batch leaves at once. Each message that comes back holds one engine step's items for the whole batch; it is split
among the callers' streams with one put per stream, so no hop carries a message per token per request.

Aborts are gathered too: whatever was asked in one turn of the event loop goes downstream as one call per
downstream replica (the first message of every downstream stream names its replica). A batch whose requests have
all been aborted or finished stops listening: its stream is closed, so no call stays open downstream waiting for
items that will never come.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import defaultdict
from dataclasses import dataclass, field

from gptoss_serve.cluster.engine_protocol import EngineRequest, StreamItem
from gptoss_serve.deployments.request_stream import RequestStream


@dataclass(eq=False)
class _Entry:
    request: EngineRequest
    stream: RequestStream  # the caller's: gets lists of StreamItems
    queued_at: float = field(default_factory=time.monotonic)
    replica: str | None = None  # set once its batch's stream names its replica
    group: object = None  # batches hold requests of one group (BatchStreamer's group_by)
    batch: _Batch | None = None  # set when its batch leaves


@dataclass(eq=False)
class _Batch:
    """Requests that went downstream in one streaming call, and the task that listens to that call."""

    request_ids: list[str]
    listener: asyncio.Task | None = None


class BatchStreamer:
    def __init__(self, downstream, *, max_batch_size: int = 64, max_wait_ms: float = 5.0,
                 on_batch=None, group_by=None) -> None:
        """downstream: a handle with `generate_batch(requests)` (streaming: its replica id, then lists of
        StreamItems) and `abort(request_ids, target_replica=)`. on_batch(batch_size, waits) observes batches.
        group_by(request), when given, is taken once a request is submitted: a batch holds requests of one group
        (the oldest request's), the others leave in the next batches."""
        self.downstream = downstream
        self.streams = downstream.options(stream=True)
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_ms / 1000
        self.on_batch, self.group_by = on_batch, group_by
        self.pending: list[_Entry] = []
        self.sent: dict[str, _Entry] = {}  # request id -> entry, for requests downstream and not finished
        self.to_abort: set[str] = set()  # asked this turn of the event loop; sent together
        self.unplaced_aborts: set[str] = set()  # aborted before their replica was known
        self.wake = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.batcher: asyncio.Task | None = None

    @property
    def in_flight(self) -> int:
        return len(self.sent)

    def submit(self, requests: list[EngineRequest], stream: RequestStream) -> None:
        group = self.group_by or (lambda _: None)
        self.pending += [_Entry(r, stream, group=group(r)) for r in requests]
        if self.batcher is None or self.batcher.done():
            self.batcher = self._spawn(self._batch_loop())
        self.wake.set()

    def abort(self, request_ids: list[str]) -> None:
        """Stops requests wherever they are: not yet sent, they are dropped; sent, their replica is told."""
        ids = set(request_ids)
        self.pending = [e for e in self.pending if e.request.request_id not in ids]
        if not self.to_abort:
            asyncio.get_running_loop().call_soon(self._flush_aborts)
        self.to_abort |= ids & self.sent.keys()

    # ---- inside -------------------------------------------------------------------------------------------
    def _spawn(self, coroutine) -> asyncio.Task:
        # A context of its own: Serve cancels the downstream calls made in a request's context when that request
        # is cancelled, and a batch serves many requests: one client leaving must not cancel the others.
        task = asyncio.get_running_loop().create_task(coroutine, context=contextvars.Context())
        self.tasks.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self.tasks.discard)
        return task

    async def _batch_loop(self) -> None:
        while True:
            if not self.pending:
                self.wake.clear()
                await self.wake.wait()
                continue
            if self.sent and len(self.pending) < self.max_batch_size:
                # downstream is busy: a short wait lets more requests share this batch
                deadline = self.pending[0].queued_at + self.max_wait_s
                while len(self.pending) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), left)
                    except TimeoutError:
                        break
            batch, self.pending = self._take_batch()
            if batch:
                sent = _Batch([entry.request.request_id for entry in batch])
                for entry in batch:
                    self.sent[entry.request.request_id] = entry
                    entry.batch = sent
                if self.on_batch is not None:
                    now = time.monotonic()
                    self.on_batch(len(batch), [now - e.queued_at for e in batch])
                sent.listener = self._spawn(self._run_batch(batch))

    def _take_batch(self) -> tuple[list[_Entry], list[_Entry]]:
        """(the next batch: up to max_batch_size requests of the oldest one's group, oldest first; the rest)."""
        group = self.pending[0].group
        batch, rest = [], []
        for entry in self.pending:
            (batch if entry.group == group and len(batch) < self.max_batch_size else rest).append(entry)
        return batch, rest

    async def _run_batch(self, batch: list[_Entry]) -> None:
        ids = [e.request.request_id for e in batch]
        stream, ended = None, False
        try:
            stream = self.streams.generate_batch.remote([e.request for e in batch])
            async for chunk in stream:
                if batch[0].replica is None:  # the replica names itself first
                    for entry in batch:
                        entry.replica = chunk
                    if waiting := [i for i in ids if i in self.unplaced_aborts]:
                        self.unplaced_aborts.difference_update(waiting)
                        self._spawn(self._abort(chunk, waiting))
                    if not any(i in self.sent for i in ids):
                        break  # every request of it was aborted on the way
                    continue
                by_stream: dict[int, tuple[RequestStream, list[StreamItem]]] = {}
                for item in chunk:
                    entry = self.sent.get(item.request_id)
                    if entry is None:  # aborted meanwhile
                        continue
                    by_stream.setdefault(id(entry.stream), (entry.stream, []))[1].append(item)
                    if item.is_last:
                        del self.sent[item.request_id]
                for caller, items in by_stream.values():
                    caller.put(items)
                if not any(i in self.sent for i in ids):
                    break
            else:
                ended = True
            error = "the serving replica ended the stream early"
        except (Exception, asyncio.CancelledError) as e:  # noqa: BLE001 - its requests fail, never hang
            error = f"the serving replica failed ({type(e).__name__})"
        if stream is not None and not ended:
            # Serve keeps a streaming call running when its caller merely stops reading: cancel it, so that the call
            # downstream ends (and stops whatever of this batch is still running there) instead of staying open
            try:
                stream.cancel()
            except Exception:  # noqa: BLE001 - best effort: a dead replica holds nothing open
                pass
        failed: dict[int, tuple[RequestStream, list[StreamItem]]] = {}
        for request_id in ids:
            entry = self.sent.pop(request_id, None)
            if entry is not None:
                failed.setdefault(id(entry.stream), (entry.stream, []))[1].append(
                    StreamItem(request_id, error=error, status=503))
        for caller, items in failed.values():
            caller.put(items)

    def _flush_aborts(self) -> None:
        by_replica: dict[str, list[str]] = defaultdict(list)
        batches: set[_Batch] = set()
        for request_id in self.to_abort:
            entry = self.sent.pop(request_id, None)
            if entry is None:
                continue
            if entry.replica is None:  # its batch is on the way: aborted as soon as the replica is known
                self.unplaced_aborts.add(request_id)
            else:
                by_replica[entry.replica].append(request_id)
                batches.add(entry.batch)
        self.to_abort.clear()
        for replica, ids in by_replica.items():
            self._spawn(self._abort(replica, ids))
        for batch in batches:
            # Nothing left to hear from this call: stop listening. A call whose every request was aborted may never
            # send again (downstream, a router's call waits for last items that aborted requests never produce), and
            # an open call would hold a task here and a call downstream until shutdown, delaying its drain.
            if batch.listener is not None and not any(i in self.sent for i in batch.request_ids):
                batch.listener.cancel()

    async def _abort(self, replica: str, request_ids: list[str]) -> None:
        try:
            await self.downstream.abort.remote(request_ids, target_replica=replica)
        except Exception:  # noqa: BLE001 - best effort: a dead replica has freed everything anyway
            pass
