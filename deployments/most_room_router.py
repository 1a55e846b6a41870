"""Serve request router for AttentionReplica: a batch goes to the replica with the most room.

Room is read from the load each replica reports (RoutingLoad: free KV blocks, requests held), corrected by the
requests this router sent since that report, so a burst does not pile onto one replica between reports.
A call naming `target_replica` (an abort) goes to that replica.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from gptoss_serve.cluster.engine_protocol import RoutingLoad


class MostRoomRouter(RequestRouter):
    """Serve's replica choice for AttentionReplica calls (not a deployment: it runs inside each caller)."""

    def initialize_state(self, **kwargs) -> None:
        self.sent_since_report: dict[ReplicaID, tuple[float, int]] = {}  # report time -> requests sent since

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        target = pending_request.kwargs.get("target_replica") if pending_request is not None else None
        if target is not None:
            chosen = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            if chosen:
                return [chosen]
        ranked = sorted(candidate_replicas, key=self.room, reverse=True)
        return [[r] for r in ranked]

    def room(self, replica: RunningReplica) -> tuple[float, float]:
        """(free KV fraction, -(requests held + sent since the last report)); more is roomier."""
        load = RoutingLoad.from_stats(replica.routing_stats)
        return load.free_fraction, -(load.queued + self._sent(replica.replica_id, load.time))

    def _sent(self, replica_id: ReplicaID, report_time: float) -> int:
        seen_time, sent = self.sent_since_report.get(replica_id, (report_time, 0))
        if seen_time != report_time:  # a fresh report already counts what was sent before it
            sent = 0
            self.sent_since_report[replica_id] = (report_time, 0)
        return sent

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        requests = pending_request.args[0] if pending_request.args else []
        if pending_request.kwargs.get("target_replica") is None and isinstance(requests, list):
            seen_time, sent = self.sent_since_report.get(replica_id, (0.0, 0))
            self.sent_since_report[replica_id] = (seen_time, sent + len(requests))
