"""Serve request router for AttentionReplica: a batch goes where its prompts' prefixes are cached, unless that
replica is overloaded, when it goes where there is most room (MostRoomRouter's choice).

Each replica has its own prefix cache, so the next turn of a conversation is cheap only on the replica that served
the last one. This router remembers (PrefixTable) which block-aligned prefixes it sent where, and scores each
candidate by the prompt tokens of the batch it would find cached. The rule, in `choose_by_prefix`:

  - the candidates that hold some prefix are tried from the most matched tokens down; the first that is not
    overloaded wins ("prefix");
  - a replica is overloaded when its free KV fraction is more than `max_free_gap` below the roomiest candidate's,
    or it holds more than `max_held_ratio` x the least-held candidate's requests + `held_slack`;
  - if every holder is overloaded the roomiest wins ("load"); if none holds a prefix, likewise ("no_match").

Every caller process (each BatchingRouter replica) has its own table, filled from its own decisions: nothing is
shared, so a restarted router starts empty and relearns, and a replica that leaves is forgotten
(`update_replicas`). The cost: a conversation whose turns pass through different routers is matched on its shared
prefix (the system prompt) only until each router has seen it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

from gptoss_serve.cluster.engine_protocol import EngineRequest, RoutingLoad
from gptoss_serve.deployments.metrics import RoutingMetrics
from gptoss_serve.deployments.most_room_router import MostRoomRouter
from gptoss_serve.deployments.prefix_table import PrefixTable, register

PREFIX, LOAD, NO_MATCH = "prefix", "load", "no_match"  # why a batch went where it went (the metric's `reason`)


@dataclass(frozen=True)
class Candidate:
    replica: str
    matched_tokens: int  # prompt tokens of the batch this router sent it before (its likely prefix-cache hits)
    free_fraction: float
    held: int  # requests it reported holding + those sent since


@dataclass(frozen=True)
class LoadLimit:
    max_free_gap: float = 0.25
    max_held_ratio: float = 1.25
    held_slack: int = 8  # a few requests' difference is noise between reports, not overload

    def overloaded(self, c: Candidate, roomiest: Candidate, least_held: int) -> bool:
        return (c.free_fraction < roomiest.free_fraction - self.max_free_gap
                or c.held > self.max_held_ratio * least_held + self.held_slack)


def choose_by_prefix(candidates: list[Candidate], limit: LoadLimit) -> tuple[Candidate, str]:
    roomiest = max(candidates, key=lambda c: (c.free_fraction, -c.held))
    least_held = min(c.held for c in candidates)
    holders = sorted((c for c in candidates if c.matched_tokens), key=lambda c: -c.matched_tokens)
    for c in holders:
        if not limit.overloaded(c, roomiest, least_held):
            return c, PREFIX
    return roomiest, LOAD if holders else NO_MATCH


class PrefixAwareRouter(MostRoomRouter):
    """Serve's replica choice for AttentionReplica calls (not a deployment: it runs inside each caller)."""

    def initialize_state(self, *, block_size: int = 16, limit: dict | None = None, **kwargs) -> None:
        super().initialize_state(**kwargs)
        self.table = PrefixTable(block_size=block_size)
        register(self._deployment_id.app_name, self._deployment_id.name, self.table)  # for the caller's batching
        self.limit = LoadLimit(**(limit or {}))
        self.metrics = RoutingMetrics(deployment=self._deployment_id.name)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        prompts = self._prompts(pending_request)
        if not candidate_replicas or not prompts:  # an abort, describe(), or nothing to route
            return await super().choose_replicas(candidate_replicas, pending_request)
        matched = self._matched_tokens(prompts)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        chosen, _ = choose_by_prefix([self._candidate(r, matched) for r in candidate_replicas], self.limit)
        # the rest in order of room: Serve tries them if the chosen one turns the call away
        rest = sorted((r for r in candidate_replicas if r.replica_id.unique_id != chosen.replica),
                      key=self.room, reverse=True)
        return [[by_id[chosen.replica]], *([r] for r in rest)]

    def _candidate(self, replica: RunningReplica, matched: dict[str, int]) -> Candidate:
        load = RoutingLoad.from_stats(replica.routing_stats)
        replica_id = replica.replica_id.unique_id
        return Candidate(replica=replica_id, matched_tokens=matched.get(replica_id, 0),
                         free_fraction=load.free_fraction, held=load.queued + self._sent(replica.replica_id, load.time))

    def _matched_tokens(self, prompts: list[list[int]]) -> dict[str, int]:
        total: dict[str, int] = {}
        for hashes in prompts:
            for replica, blocks in self.table.matches(hashes).items():
                total[replica] = total.get(replica, 0) + blocks * self.table.block_size
        return total

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        super().on_request_routed(pending_request, replica_id, result)
        prompts = self._prompts(pending_request)
        if not prompts:
            return
        # the reason is read from where the batch went (Serve may have passed over our first choice)
        matched = self._matched_tokens(prompts)
        replica = replica_id.unique_id
        reason = PREFIX if matched.get(replica) else LOAD if matched else NO_MATCH
        self.metrics.decisions.inc(tags={"deployment": self.metrics.deployment, "reason": reason})
        for hashes in prompts:
            self.table.record(hashes, replica)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.table.forget({r.replica_id.unique_id for r in replicas})

    def _prompts(self, pending_request: PendingRequest | None) -> list[list[int]]:
        """Block hashes of each prompt of a generate_batch call (none for other calls: aborts, describe).
        Hashed again in on_request_routed rather than kept per request: nothing to leak if a call is cancelled."""
        if pending_request is None or pending_request.kwargs.get("target_replica") is not None:
            return []
        requests = pending_request.args[0] if pending_request.args else None
        if not isinstance(requests, list):
            return []
        return [self.table.block_hashes(r.prompt_token_ids) for r in requests if isinstance(r, EngineRequest)]
