"""BatchingRouter: gathers incoming requests into batches and sends each batch to an attention replica in one call.

The window adapts: with nothing in flight (replicas idle) a request leaves at once; while replicas are busy,
requests wait at most `max_wait_ms` for company, and a full batch leaves at once. Each request's tokens stream
back on their own: the replica's batch stream is split per request here.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from gptoss_serve.deployments.messages import EngineRequest, StreamItem
from gptoss_serve.deployments.metrics import RouterMetrics


@dataclass
class _Waiting:
    request: EngineRequest
    items: asyncio.Queue = field(default_factory=asyncio.Queue)
    queued_at: float = field(default_factory=time.monotonic)
    replica: str | None = None  # set once its batch reaches a replica
    done: bool = False


class BatchingRouter:
    def __init__(self, replicas, *, model_name: str, max_batch_size: int = 64, max_wait_ms: float = 5.0,
                 replica_id: str = "router") -> None:
        """`replicas`: a DeploymentHandle to AttentionReplica (anything with the same two methods in tests)."""
        self.replicas = replicas
        self.replica_streams = replicas.options(stream=True)
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_ms / 1000
        self.pending: list[_Waiting] = []
        self.requests: dict[str, _Waiting] = {}
        self.in_flight = 0  # requests sent to replicas and not finished
        self.wake = asyncio.Event()
        self.batcher: asyncio.Task | None = None
        self.metrics = RouterMetrics(model=model_name, replica=replica_id)

    async def generate(self, request: EngineRequest):
        """Streams lists of StreamItems for one request (several when they pile up: fewer messages)."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        waiting = _Waiting(request)
        self.requests[request.request_id] = waiting
        self.pending.append(waiting)
        self._start_batcher()
        self.wake.set()
        try:
            while not waiting.done:
                items = [await waiting.items.get()]
                while not waiting.items.empty():
                    items.append(waiting.items.get_nowait())
                waiting.done = any(item.is_last for item in items)
                yield items
        finally:
            self.requests.pop(request.request_id, None)
            if not waiting.done:  # the client left: drop it here, or stop it on its replica
                if waiting in self.pending:
                    self.pending.remove(waiting)
                elif waiting.replica is not None:
                    asyncio.get_running_loop().create_task(self._abort(waiting))

    # ---- batching -------------------------------------------------------------------------------------------
    def _start_batcher(self) -> None:
        if self.batcher is None or self.batcher.done():
            self.batcher = asyncio.get_running_loop().create_task(self._batch_loop())

    async def _batch_loop(self) -> None:
        while True:
            if not self.pending:
                self.wake.clear()
                await self.wake.wait()
                continue
            if self.in_flight > 0 and len(self.pending) < self.max_batch_size:
                # replicas are busy: a short wait lets more requests share this batch
                deadline = self.pending[0].queued_at + self.max_wait_s
                while len(self.pending) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), left)
                    except TimeoutError:
                        break
            batch, self.pending = self.pending[: self.max_batch_size], self.pending[self.max_batch_size:]
            if batch:
                asyncio.get_running_loop().create_task(self._run_batch(batch))

    async def _run_batch(self, batch: list[_Waiting]) -> None:
        now = time.monotonic()
        tags = self.metrics.tags
        self.metrics.batch_size.observe(len(batch), tags=tags)
        for waiting in batch:
            self.metrics.batch_wait.observe(now - waiting.queued_at, tags=tags)
        self.in_flight += len(batch)
        open_requests = {w.request.request_id: w for w in batch}
        try:
            stream = self.replica_streams.generate_batch.remote([w.request for w in batch])
            replica = None
            async for chunk in stream:
                if replica is None:  # the replica names itself first
                    replica = chunk
                    for waiting in batch:
                        waiting.replica = replica
                    continue
                for item in chunk:
                    waiting = open_requests.get(item.request_id)
                    if waiting is None:
                        continue
                    waiting.items.put_nowait(item)
                    if item.is_last:
                        del open_requests[item.request_id]
                        self.in_flight -= 1
            error = "the attention replica ended the stream early"
        except Exception as e:  # noqa: BLE001 - a lost replica fails its requests, never hangs them
            error = f"the attention replica failed: {type(e).__name__}: {e}"
        for request_id, waiting in open_requests.items():
            waiting.items.put_nowait(StreamItem(request_id, error=error, status=503))
        self.in_flight -= len(open_requests)

    async def _abort(self, waiting: _Waiting) -> None:
        try:
            await self.replicas.abort.remote([waiting.request.request_id], target_replica=waiting.replica)
        except Exception:  # noqa: BLE001 - best effort: a dead replica has freed everything anyway
            pass
