"""Serve request router for AttentionReplica: a batch goes where its prompts' prefixes are cached, unless that
replica is overloaded, when it goes where there is most room (MostRoomRouter's choice).

Each replica has its own prefix cache, so the next turn of a conversation is cheap only on the replica that served
the last one. This router remembers (PrefixTable) which block-aligned prefixes it sent where, and scores each
candidate by the prompt tokens of the batch it would find cached. The rule, in `choose_by_prefix`:

  - a candidate holds the batch's prefix when it would find cached at least `min_match_ratio` of the batch's prompt
    tokens (prefix_table.worth_following: the chat template's header, seen on one replica first, is no reason to
    send every new conversation there);
  - holders are tried from the most matched tokens down, equals by room; the first that is not overloaded wins
    ("prefix");
  - a replica is overloaded when its free KV fraction is more than `max_free_gap` below the roomiest candidate's,
    or it holds more than `max_held_ratio` x the least-held candidate's requests + `held_slack`;
  - if every holder is overloaded the roomiest wins ("load"); if none holds a prefix, likewise ("no_match").

Every caller process (each BatchingRouter replica) has its own table, filled from its own decisions: nothing is
shared, so a restarted router starts empty and relearns, and a replica that leaves is forgotten
(`update_replicas`). The cost: a conversation whose turns pass through different routers is matched on its shared
prefix (the system prompt) only until each router has seen it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

from gptoss_serve.cluster.engine_protocol import EngineRequest, RoutingLoad
from gptoss_serve.deployments.metrics import RoutingMetrics
from gptoss_serve.deployments.most_room_router import MostRoomRouter
from gptoss_serve.deployments.prefix_table import MIN_MATCH_RATIO, PrefixTable, register, worth_following

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
    min_match_ratio: float = MIN_MATCH_RATIO

    def overloaded(self, c: Candidate, roomiest: Candidate, least_held: int) -> bool:
        return (c.free_fraction < roomiest.free_fraction - self.max_free_gap
                or c.held > self.max_held_ratio * least_held + self.held_slack)


def room(c: Candidate) -> tuple[float, int]:
    return c.free_fraction, -c.held


def choose_by_prefix(candidates: list[Candidate], limit: LoadLimit, prompt_tokens: int) -> tuple[Candidate, str]:
    """The candidate for a batch of `prompt_tokens` prompt tokens, and why (module docstring)."""
    roomiest = max(candidates, key=room)
    least_held = min(c.held for c in candidates)
    worth = worth_following({c.replica: c.matched_tokens for c in candidates}, prompt_tokens, limit.min_match_ratio)
    holders = sorted((c for c in candidates if c.replica in worth), key=lambda c: (c.matched_tokens, *room(c)),
                     reverse=True)
    for c in holders:
        if not limit.overloaded(c, roomiest, least_held):
            return c, PREFIX
    return roomiest, LOAD if holders else NO_MATCH


@dataclass(frozen=True)
class Choice:
    replica: str
    reason: str
    prompts: list[list[int]]  # the batch's prompts' block hashes


MAX_PENDING_CHOICES = 4096


def _key(pending_request: PendingRequest) -> str:
    return pending_request.metadata.internal_request_id


class PrefixAwareRouter(MostRoomRouter):
    """Serve's replica choice for AttentionReplica calls (not a deployment: it runs inside each caller)."""

    def initialize_state(self, *, block_size: int = 16, limit: dict | None = None, **kwargs) -> None:
        super().initialize_state(**kwargs)
        self.limit = LoadLimit(**(limit or {}))
        self.table = PrefixTable(block_size=block_size, min_match_ratio=self.limit.min_match_ratio)
        register(self._deployment_id.app_name, self._deployment_id.name, self.table)  # for the caller's batching
        self.metrics = RoutingMetrics(deployment=self._deployment_id.name)
        self.choices: OrderedDict[str, Choice] = OrderedDict()  # a call's routing, until Serve says where it went

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        prompts = self._prompts(pending_request)
        if not candidate_replicas or not prompts:  # an abort, describe(), or nothing to route
            return await super().choose_replicas(candidate_replicas, pending_request)
        matched = self._matched_tokens(prompts)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        prompt_tokens = sum(len(r.prompt_token_ids) for r in pending_request.args[0] if isinstance(r, EngineRequest))
        chosen, reason = choose_by_prefix([self._candidate(r, matched) for r in candidate_replicas], self.limit,
                                          prompt_tokens)
        self._remember(pending_request, Choice(chosen.replica, reason, prompts))
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
        choice = self.choices.pop(_key(pending_request), None)
        if choice is None:  # an abort, describe(), nothing to route, or a choice forgotten under a flood
            prompts = self._prompts(pending_request)
            if not prompts:
                return
            choice = Choice(replica_id.unique_id, LOAD, prompts)
        replica = replica_id.unique_id
        # Serve passes over our first choice when that replica turns the call away: the rest went by room
        reason = choice.reason if choice.replica == replica else LOAD
        self.metrics.decisions.inc(tags={"deployment": self.metrics.deployment, "reason": reason})
        for hashes in choice.prompts:
            self.table.record(hashes, replica)

    def _remember(self, pending_request: PendingRequest, choice: Choice) -> None:
        """Kept from choose_replicas to on_request_routed (the prompts hashed once); bounded, so calls cancelled in
        between cannot grow it."""
        self.choices[_key(pending_request)] = choice
        while len(self.choices) > MAX_PENDING_CHOICES:
            self.choices.popitem(last=False)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.table.forget({r.replica_id.unique_id for r in replicas})

    def _prompts(self, pending_request: PendingRequest | None) -> list[list[int]]:
        """Block hashes of each prompt of a generate_batch call (none for other calls: aborts, describe)."""
        if pending_request is None or pending_request.kwargs.get("target_replica") is not None:
            return []
        requests = pending_request.args[0] if pending_request.args else None
        if not isinstance(requests, list):
            return []
        return [self.table.block_hashes(r.prompt_token_ids) for r in requests if isinstance(r, EngineRequest)]
