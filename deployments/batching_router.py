"""BatchingRouter: gathers the ingress replicas' batches into larger ones for the attention replicas.

Each call from an ingress is a batch of requests and one stream back; the router merges what arrives from every
ingress into batches for the attention replicas (see BatchStreamer: a short adaptive window, one streaming
call per batch), and relays each engine step's items to the calls they belong to, one message per call per
step. Serve's MostRoomRouter picks the attention replica with the most room for each batch.
"""

from __future__ import annotations

import asyncio
import time

from gptoss_serve.deployments.batch_streamer import BatchStreamer
from gptoss_serve.deployments.messages import EngineRequest
from gptoss_serve.deployments.metrics import RouterMetrics


class BatchingRouter:
    def __init__(self, replicas, *, model_name: str, max_batch_size: int = 64, max_wait_ms: float = 5.0,
                 replica_id: str | None = None) -> None:
        """`replicas`: a DeploymentHandle to AttentionReplica (anything with the same two methods in tests)."""
        from gptoss_serve.deployments.replica_context import current_replica_id

        self.replica_id = replica_id or current_replica_id()
        self.metrics = RouterMetrics(model=model_name, replica=self.replica_id)
        self.replicas = BatchStreamer(replicas, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                      on_batch=self._observe_batch)

    async def generate_batch(self, requests: list[EngineRequest], *, target_replica: str | None = None):
        """Streams this router's id, then lists of StreamItems of these requests until each has ended."""
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids) or any(i in self.replicas.sent for i in ids):
            raise ValueError("request ids must be unique and not already in flight")
        sink: asyncio.Queue = asyncio.Queue()
        self.replicas.submit(requests, sink)
        open_ids = set(ids)
        try:
            yield self.replica_id
            while open_ids:
                items = await sink.get()
                while not sink.empty():
                    items += sink.get_nowait()
                open_ids.difference_update(item.request_id for item in items if item.is_last)
                yield items
        finally:  # the caller went away: nothing of this call may keep running
            if open_ids:
                self.replicas.abort(list(open_ids))

    async def abort(self, request_ids: list[str], *, target_replica: str | None = None) -> None:
        self.replicas.abort(request_ids)

    def record_routing_stats(self) -> dict:
        """Spreads ingress calls over router replicas (MostRoomRouter reads `running`)."""
        return {"running": self.replicas.in_flight + len(self.replicas.pending), "time": time.time()}

    def _observe_batch(self, size: int, waits: list[float]) -> None:
        tags = self.metrics.tags
        self.metrics.batch_size.observe(size, tags=tags)
        for wait in waits:
            self.metrics.batch_wait.observe(wait, tags=tags)
