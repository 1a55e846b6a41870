"""What the server's own metrics say about a run (--metrics-url): the prefix cache's hit rate, overall and per
attention replica, and the router's decisions by reason, from the change in the app's Prometheus counters between a
scrape before the run and one after it.

The counters are the app's (deployments/metrics.py, as Ray exports them: `ray_` prefix, `_total` suffix). Ray adds
labels of its own (node, worker, session); samples are summed over everything but the label that matters here, so a
scrape of several nodes' exporters, or one node's with several processes, adds up. Other servers export none of
these: their figures are then absent, not zero.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

PREFIX_QUERIES = "ray_gptoss_prefix_cache_queries_total"  # prompt tokens looked up, label `replica`
PREFIX_HITS = "ray_gptoss_prefix_cache_hits_total"  # of those, found in the cache
ROUTING_DECISIONS = "ray_gptoss_routing_decisions_total"  # batches routed, label `reason`


class MetricsScrapeError(RuntimeError):
    """The metrics URL could not be read or parsed; the message names the URL and the problem."""


@dataclass(frozen=True)
class ServerCounters:
    prefix_queries: Mapping[str, float] = field(default_factory=dict)  # replica -> prompt tokens
    prefix_hits: Mapping[str, float] = field(default_factory=dict)
    routing: Mapping[str, float] = field(default_factory=dict)  # reason -> batches

    @classmethod
    def parse(cls, text: str) -> ServerCounters:
        sums: dict[str, dict[str, float]] = {PREFIX_QUERIES: defaultdict(float), PREFIX_HITS: defaultdict(float),
                                             ROUTING_DECISIONS: defaultdict(float)}
        key = {PREFIX_QUERIES: "replica", PREFIX_HITS: "replica", ROUTING_DECISIONS: "reason"}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in sums:
                    sums[sample.name][sample.labels.get(key[sample.name], "")] += sample.value
        return cls(prefix_queries=dict(sums[PREFIX_QUERIES]), prefix_hits=dict(sums[PREFIX_HITS]),
                   routing=dict(sums[ROUTING_DECISIONS]))

    def since(self, before: ServerCounters) -> ServerCounters:
        """The counts added between `before` and this scrape (a replica that restarted counts from zero again)."""
        def minus(now: Mapping[str, float], then: Mapping[str, float]) -> dict[str, float]:
            return {k: v - then.get(k, 0.0) if v >= then.get(k, 0.0) else v for k, v in now.items()}
        return ServerCounters(prefix_queries=minus(self.prefix_queries, before.prefix_queries),
                              prefix_hits=minus(self.prefix_hits, before.prefix_hits),
                              routing=minus(self.routing, before.routing))

    @property
    def hit_rate(self) -> float | None:
        """Prompt tokens found in the prefix cache over those looked up, all replicas; None when none was."""
        queries = sum(self.prefix_queries.values())
        return sum(self.prefix_hits.values()) / queries if queries else None

    @property
    def hit_rate_by_replica(self) -> dict[str, float]:
        return {r: self.prefix_hits.get(r, 0.0) / q for r, q in sorted(self.prefix_queries.items()) if q}

    def to_json_dict(self) -> dict[str, Any]:
        return {"prefix_cache_hit_rate": self.hit_rate, "prefix_cache_hit_rate_by_replica": self.hit_rate_by_replica,
                "prefix_cache_queries_by_replica": dict(self.prefix_queries),
                "routing_decisions": dict(sorted(self.routing.items()))}


async def scrape(url: str, *, timeout: float = 10.0) -> ServerCounters:
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.get(url)
            response.raise_for_status()
        return ServerCounters.parse(response.text)
    except httpx.HTTPError as e:
        raise MetricsScrapeError(f"--metrics-url {url}: {type(e).__name__}: {e}") from None
    except ValueError as e:  # the parser's complaint about a line
        raise MetricsScrapeError(f"--metrics-url {url}: not Prometheus text: {e}") from None
