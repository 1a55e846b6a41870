"""PrefixAwareRouter on the CPU, without a cluster: its table, its choice between prefix and load, and a simulated
4-replica cluster driven by many multi-turn conversations (issue 32's target: prefix-cache hit rate near one
replica's, load still balanced)."""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from types import SimpleNamespace
from uuid import uuid4

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

from gptoss_serve.cluster.engine_protocol import EngineRequest, RoutingLoad
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.deployments.most_room_router import MostRoomRouter
from gptoss_serve.deployments.prefix_aware_router import (LOAD, NO_MATCH, PREFIX, Candidate, LoadLimit,
                                                          PrefixAwareRouter, choose_by_prefix)
from gptoss_serve.deployments.prefix_table import PrefixTable

BLOCK = 16
DEPLOYMENT = DeploymentID(name="AttentionReplica", app_name="app")


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(200_000) for _ in range(n)]


# -- the table ---------------------------------------------------------------------------------------------------

def test_longest_prefix_wins_and_the_last_token_never_counts():
    table = PrefixTable(block_size=BLOCK)
    system, a, b = tokens(1, 4 * BLOCK), tokens(2, 2 * BLOCK), tokens(3, 2 * BLOCK)
    table.record(table.block_hashes(system + [7]), "r0")  # 4 full blocks (the 65th token is alone)
    table.record(table.block_hashes(system + a + [7]), "r1")
    assert table.matches(table.block_hashes(system + a + b)) == {"r0": 4, "r1": 6}
    assert table.matches(table.block_hashes(system + b + [7])) == {"r0": 4, "r1": 4}
    assert table.matches(table.block_hashes(system)) == {"r0": 3, "r1": 3}  # 64 tokens: the 4th block is not reused
    assert table.matches(table.block_hashes(b + system)) == {}


def test_the_table_is_bounded_and_evicts_the_least_recently_used():
    table = PrefixTable(block_size=BLOCK, max_entries=6)
    old, new = tokens(1, 3 * BLOCK + 1), tokens(2, 3 * BLOCK + 1)
    table.record(table.block_hashes(old), "r0")
    table.record(table.block_hashes(new), "r1")
    assert len(table) == 6
    table.matches(table.block_hashes(old))  # a match keeps `old` fresh
    table.record(table.block_hashes(tokens(3, 2 * BLOCK + 1)), "r2")
    assert len(table) == 6
    assert table.matches(table.block_hashes(old)) == {"r0": 3}
    assert table.matches(table.block_hashes(new)) == {}  # its first block went first: nothing after it matches


def test_replicas_that_leave_are_forgotten():
    table = PrefixTable(block_size=BLOCK)
    prompt = tokens(1, 3 * BLOCK + 1)
    table.record(table.block_hashes(prompt), "r0")
    table.record(table.block_hashes(prompt), "r1")
    table.forget({"r1", "r2"})
    assert table.matches(table.block_hashes(prompt)) == {"r1": 3}
    table.record(table.block_hashes(prompt), "r0")  # r0 back under the same id: it is known again
    table.forget({"r0", "r1"})
    assert table.matches(table.block_hashes(prompt)) == {"r1": 3, "r0": 3}
    table.forget(set())
    assert len(table) == 0 and not table.replicas


# -- the rule ----------------------------------------------------------------------------------------------------

def test_the_prefix_holder_wins_until_it_is_overloaded():
    limit = LoadLimit(max_free_gap=0.25, max_held_ratio=1.25, held_slack=8, min_match_ratio=0.3)
    idle = Candidate("idle", matched_tokens=0, free_fraction=0.9, held=10)
    warm = Candidate("warm", 320, 0.8, 20)
    assert choose_by_prefix([idle, warm], limit, prompt_tokens=400) == (warm, PREFIX)
    # 10 * 1.25 + 8 = 20.5 requests is the most it may hold
    busy = Candidate("warm", 320, 0.8, 21)
    assert choose_by_prefix([idle, busy], limit, prompt_tokens=400) == (idle, LOAD)
    full = Candidate("warm", 320, 0.6, 0)  # KV cache 0.3 less free than the roomiest's
    assert choose_by_prefix([idle, full], limit, prompt_tokens=400) == (idle, LOAD)
    # the next-best holder is tried before falling back to load
    second = Candidate("shared", 128, 0.9, 12)
    assert choose_by_prefix([idle, busy, second], limit, prompt_tokens=400) == (second, PREFIX)
    assert choose_by_prefix([Candidate("a", 0, 0.5, 3), idle], limit, prompt_tokens=400) == (idle, NO_MATCH)


def test_a_short_match_is_no_reason_to_pick_a_replica_and_equals_go_by_room():
    limit = LoadLimit(min_match_ratio=0.3)
    roomy = Candidate("roomy", 0, 0.9, 0)
    header_only = Candidate("header", 64, 0.8, 5)  # the chat template's header: 64 of 400 tokens
    assert choose_by_prefix([roomy, header_only], limit, prompt_tokens=400) == (roomy, NO_MATCH)
    a, b, c = Candidate("a", 64, 0.9, 0), Candidate("b", 128, 0.7, 4), Candidate("c", 64, 0.8, 2)
    assert choose_by_prefix([a, b, c], limit, prompt_tokens=400) == (b, PREFIX)  # 128 >= 0.3 x 400
    assert choose_by_prefix([a, b, c], limit, prompt_tokens=480) == (a, NO_MATCH)  # 128 < 0.3 x 480
    # equal matches go by room, not by the order Serve lists the replicas in
    twin = Candidate("twin", 128, 0.95, 0)
    assert choose_by_prefix([a, b, twin], limit, prompt_tokens=400) == (twin, PREFIX)


# -- the router (Serve's RequestRouter subclass, with replica-like objects) ---------------------------------------

def replica(name: str, *, queued: int = 0, free: float = 1.0, time: float = 1.0):
    stats = RoutingLoad(queued=queued, free_blocks=int(free * 100), num_blocks=100, time=time).as_stats()
    return SimpleNamespace(replica_id=ReplicaID(unique_id=name, deployment_id=DEPLOYMENT), routing_stats=stats)


def call(*prompts: list[int], **kwargs):
    requests = [EngineRequest(request_id=str(i), prompt_token_ids=p, params=SamplingParams())
                for i, p in enumerate(prompts)]
    return SimpleNamespace(args=[requests], kwargs=kwargs, metadata=SimpleNamespace(internal_request_id=uuid4().hex))


def make_router(cls=PrefixAwareRouter, **state):
    router = cls(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(**state)
    return router


def route(router, replicas, pending) -> str:
    ranked = asyncio.run(router.choose_replicas(replicas, pending))
    chosen = ranked[0][0]
    router.on_request_routed(pending, chosen.replica_id, None)
    return chosen.replica_id.unique_id


def test_the_router_follows_the_prefix_and_yields_to_load():
    router = make_router(block_size=BLOCK)
    reasons: list[str] = []
    router.metrics.decisions = SimpleNamespace(inc=lambda tags: reasons.append(tags["reason"]))
    history = tokens(1, 10 * BLOCK)
    replicas = [replica("r0", queued=3), replica("r1", queued=1), replica("r2", queued=2)]
    assert route(router, replicas, call(history)) == "r1"  # no match: most room
    # r1 is now a little busier than r0, but holds the prefix
    replicas = [replica("r0", queued=3, time=2), replica("r1", queued=6, time=2), replica("r2", queued=2, time=2)]
    assert route(router, replicas, call(history + tokens(2, BLOCK))) == "r1"
    replicas = [replica("r0", queued=3, time=3), replica("r1", queued=40, time=3), replica("r2", queued=2, time=3)]
    assert route(router, replicas, call(history + tokens(3, BLOCK))) == "r2"  # r1 overloaded
    assert reasons == [NO_MATCH, PREFIX, LOAD]
    # an abort still reaches its replica; a replica that left is forgotten
    abort = SimpleNamespace(args=[["0"]], kwargs={"target_replica": "r0"})
    assert asyncio.run(router.choose_replicas(replicas, abort)) == [[replicas[0]]]
    router.table.forget({"r0", "r2"})
    assert set(router.table.matches(router.table.block_hashes(history))) == {"r2"}


# -- the simulation: 4 replicas, 64 conversations x 6 turns sharing 4 system prompts -------------------------------

class PrefixCache:
    """A replica's prefix cache as the block manager keeps it: chained block hashes, least recently used out."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity, self.blocks = capacity_blocks, OrderedDict()

    def serve(self, hashes: list[int], generated_hashes: list[int]) -> int:
        """Blocks of the prompt found cached; then the prompt's and the reply's blocks are cached."""
        hits = 0
        while hits < len(hashes) and hashes[hits] in self.blocks:
            hits += 1
        for h in hashes + generated_hashes:
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
        return hits


def simulate(policy: str, *, num_replicas: int = 4, conversations: int = 64, turns: int = 6,
             capacity_blocks: int = 4096, seed: int = 0) -> tuple[float, list[int]]:
    """(prefix-cache hit rate over prompt tokens, requests per replica). Each round every conversation sends its
    next turn, in random order, one call each; a replica's reported load is the requests of this round it holds."""
    rng = random.Random(seed)
    hasher = PrefixTable(block_size=BLOCK)
    header = tokens(999, 4 * BLOCK)  # the chat template's start, the same in every prompt
    systems = [header + tokens(1000 + s, 20 * BLOCK) for s in range(4)]
    history = {c: list(systems[c % 4]) for c in range(conversations)}
    caches = [PrefixCache(capacity_blocks) for _ in range(num_replicas)]
    names = [f"r{i}" for i in range(num_replicas)]
    router = make_router(PrefixAwareRouter if policy == "prefix" else MostRoomRouter, **(
        {"block_size": BLOCK} if policy == "prefix" else {}))
    served, hit_tokens, query_tokens, clock = [0] * num_replicas, 0, 0, 0.0
    for turn in range(turns):
        held = [0] * num_replicas
        order = list(range(conversations))
        rng.shuffle(order)
        for c in order:
            prompt = history[c] + tokens(rng.random(), rng.randrange(20, 60))  # the user's message
            clock += 1
            replicas = [replica(n, queued=held[i], time=clock) for i, n in enumerate(names)]
            i = 0 if policy == "one" else names.index(route(router, replicas, call(prompt)))
            reply = tokens(rng.random(), rng.randrange(30, 90))
            full = hasher.block_hashes(prompt + reply + [0])
            prompt_blocks = hasher.block_hashes(prompt)
            hit_tokens += caches[i].serve(prompt_blocks, full[len(prompt_blocks):]) * BLOCK
            query_tokens += len(prompt)
            held[i] += 1
            served[i] += 1
            history[c] = prompt + reply
    return hit_tokens / query_tokens, served


def test_prefix_aware_routing_keeps_one_replicas_hit_rate_and_balances_load():
    one, _ = simulate("one")
    most_room, most_room_load = simulate("most_room")
    prefix, prefix_load = simulate("prefix")
    mean = sum(prefix_load) / len(prefix_load)
    print(f"\nprefix-cache hit rate: one replica {one:.3f}, most room {most_room:.3f}, prefix-aware {prefix:.3f}; "
          f"requests per replica: most room {most_room_load}, prefix-aware {prefix_load} (max/mean "
          f"{max(prefix_load) / mean:.2f})")
    assert prefix >= 0.9 * one
    assert max(prefix_load) <= 1.5 * mean
    assert prefix > most_room + 0.1  # the table is what buys it


def test_preferred_names_the_deepest_holder_worth_following_without_touching_the_lru_order():
    table = PrefixTable(block_size=BLOCK, min_match_ratio=0.3)
    prompt = tokens(1, 3 * BLOCK + 1)
    table.record(table.block_hashes(prompt[:BLOCK + 1]), "r0")  # its first block only
    table.record(table.block_hashes(prompt), "r1")  # all three
    order = list(table.holders)
    assert table.preferred(table.block_hashes(prompt), len(prompt)) == "r1"
    assert table.preferred(table.block_hashes(tokens(2, 3 * BLOCK + 1)), 3 * BLOCK + 1) is None
    assert list(table.holders) == order
    # a prompt sharing only its first block with what r0 and r1 were sent: 16 of 96 tokens, below the ratio
    new_conversation = prompt[:BLOCK] + tokens(3, 5 * BLOCK)
    assert table.preferred(table.block_hashes(new_conversation), len(new_conversation)) is None
