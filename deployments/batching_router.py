"""BatchingRouter: gathers the ingress replicas' batches into larger ones for the attention replicas.

Each call from an ingress is a batch of requests and one stream back; the router merges what arrives from every
ingress into batches for the attention replicas (see BatchStreamer: a short adaptive window, one streaming
call per batch), and relays each engine step's items to the calls they belong to, one message per call per
step. Serve's request router (PrefixAwareRouter by default, MostRoomRouter with attention_routing: most_room) picks
the attention replica of each batch; with PrefixAwareRouter, a batch holds only requests that it would send to the
same replica alone (prefix_table.py), so that no request of a batch is sent away from its cached prefix.
"""

from __future__ import annotations

from gptoss_serve.cluster.engine_protocol import EngineRequest, RoutingLoad
from gptoss_serve.deployments.batch_streamer import BatchStreamer
from gptoss_serve.deployments.metrics import RouterMetrics
from gptoss_serve.deployments.prefix_table import registered
from gptoss_serve.deployments.request_stream import RequestStream, abort_where_they_are


class BatchingRouter:
    def __init__(self, replicas, *, model_name: str, max_batch_size: int = 64, max_wait_ms: float = 5.0,
                 replica_id: str | None = None) -> None:
        """`replicas`: a DeploymentHandle to AttentionReplica (anything with the same two methods in tests)."""
        from gptoss_serve.deployments.replica_context import current_replica_id

        self.replica_id = replica_id or current_replica_id()
        self.metrics = RouterMetrics(model=model_name, replica=self.replica_id)
        self.handle = replicas
        self.replicas = BatchStreamer(replicas, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                                      on_batch=self._observe_batch, group_by=self._preferred_replica)
        self.calls: dict[str, RequestStream] = {}  # request id -> the call it came in

    async def generate_batch(self, requests: list[EngineRequest], *, target_replica: str | None = None):
        """Streams this router's id, then lists of StreamItems of these requests until each has ended."""
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids) or any(i in self.calls for i in ids):
            raise ValueError("request ids must be unique and not already in flight")
        stream = RequestStream(ids, abort=self.replicas.abort)
        self.calls.update(dict.fromkeys(ids, stream))
        self.replicas.submit(requests, stream)
        try:
            yield self.replica_id
            async for items in stream.steps():
                yield items
        finally:  # the caller went away (or every request ended): nothing of this call may keep running
            stream.close()
            for request_id in ids:
                self.calls.pop(request_id, None)

    async def abort(self, request_ids: list[str], *, target_replica: str | None = None) -> None:
        """Stops requests of calls this router serves (their clients left)."""
        abort_where_they_are(self.calls, request_ids)

    def record_routing_stats(self) -> dict:
        """Spreads ingress calls over router replicas: the requests in flight through this one."""
        return RoutingLoad(queued=self.replicas.in_flight + len(self.replicas.pending)).as_stats()

    def _preferred_replica(self, request: EngineRequest) -> str | None:
        """Where the prefix-aware router would send this request alone: the replica whose match it would follow
        (None without one, or when the router routes by room alone)."""
        app, deployment = getattr(self.handle, "app_name", None), getattr(self.handle, "deployment_name", None)
        table = registered(app, deployment) if app is not None and deployment is not None else None
        if table is None:
            return None
        return table.preferred(table.block_hashes(request.prompt_token_ids), len(request.prompt_token_ids))

    def _observe_batch(self, size: int, waits: list[float]) -> None:
        tags = self.metrics.tags
        self.metrics.batch_size.observe(size, tags=tags)
        for wait in waits:
            self.metrics.batch_wait.observe(wait, tags=tags)
