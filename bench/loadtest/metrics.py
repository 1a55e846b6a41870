"""Figures of a run, computed from its request records the way `vllm bench serve` computes them."""

from __future__ import annotations

import datetime
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gptoss_serve.bench.loadtest.config import LoadConfig
from gptoss_serve.bench.loadtest.record import RequestRecord
from gptoss_serve.bench.loadtest.server_metrics import ServerCounters

LATENCIES = ("ttft", "tpot", "itl", "e2el")
# Above this share of one core, the load generator's own event loop delays the chunks it timestamps.
CPU_BOUND = 0.8


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Milliseconds; None when no request gave a sample. std is numpy's (population), as vLLM's."""

    count: int = 0
    mean: float | None = None
    median: float | None = None
    std: float | None = None
    p90: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, seconds: Iterable[float]) -> LatencyStats:
        values = np.asarray(list(seconds), dtype=float) * 1000.0
        if values.size == 0:
            return cls()
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        return cls(int(values.size), float(values.mean()), float(p50), float(values.std()), float(p90), float(p99))


@dataclass(frozen=True, kw_only=True)
class LoadResult:
    config: LoadConfig
    model: str
    records: Sequence[RequestRecord]
    duration: float  # seconds from the first send to the end of the last request
    max_concurrent_requests: int  # the most requests that were in flight at once
    client_cpu: float = 0.0  # the load generator's CPU seconds per second of the run (a single event loop)
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    total_input_tokens: int = 0  # the server's usage.prompt_tokens over completed requests
    total_output_tokens: int = 0  # the server's usage.completion_tokens over completed requests
    request_throughput: float = 0.0
    output_throughput: float = 0.0
    total_token_throughput: float = 0.0
    request_goodput: float | None = None  # None without --goodput targets
    ttft: LatencyStats = field(default_factory=LatencyStats)
    tpot: LatencyStats = field(default_factory=LatencyStats)
    itl: LatencyStats = field(default_factory=LatencyStats)
    e2el: LatencyStats = field(default_factory=LatencyStats)
    # the conversation workload: turn -> the TTFT of that turn's completed requests, whose context grows with the turn
    ttft_by_turn: Mapping[int, LatencyStats] = field(default_factory=dict)
    input_tokens_by_turn: Mapping[int, float] = field(default_factory=dict)  # turn -> mean usage.prompt_tokens
    # turn -> the share of its prompt tokens the server's prefix cache held (usage's cached_tokens), where it says
    cached_share_by_turn: Mapping[int, float] = field(default_factory=dict)
    errors_by_status: Mapping[str, int] = field(default_factory=dict)  # HTTP status or failure reason -> count
    error_examples: Mapping[str, str] = field(default_factory=dict)  # one detail per reason, for the table
    server: ServerCounters | None = None  # what the app's own counters say of the run (--metrics-url)

    @classmethod
    def from_records(cls, config: LoadConfig, *, model: str, records: Sequence[RequestRecord], duration: float,
                     max_concurrent_requests: int, client_cpu: float = 0.0) -> LoadResult:
        ok = [r for r in records if r.ok]
        failed = [r for r in records if r.failed]
        duration = max(duration, 1e-9)
        total_in = sum(r.prompt_tokens or 0 for r in ok)
        total_out = sum(r.completion_tokens or 0 for r in ok)
        examples: dict[str, str] = {}
        for r in failed:
            examples.setdefault(str(r.error), r.detail)
        by_turn: dict[int, list[RequestRecord]] = {}
        for r in sorted((r for r in ok if r.turn is not None), key=lambda r: r.turn):
            by_turn.setdefault(r.turn, []).append(r)
        return cls(
            config=config, model=model, records=records, duration=duration,
            max_concurrent_requests=max_concurrent_requests, client_cpu=client_cpu,
            completed=len(ok), failed=len(failed), cancelled=sum(r.cancelled for r in records),
            total_input_tokens=total_in, total_output_tokens=total_out,
            request_throughput=len(ok) / duration,
            output_throughput=total_out / duration,
            total_token_throughput=(total_in + total_out) / duration,
            request_goodput=_goodput(ok, config.goodput, duration),
            ttft=LatencyStats.of(r.ttft for r in ok if r.ttft is not None),
            # as vLLM: one-token answers have no time per output token
            tpot=LatencyStats.of(r.tpot for r in ok if r.tpot is not None and (r.completion_tokens or 0) > 1),
            itl=LatencyStats.of(gap for r in ok for gap in r.itl),
            e2el=LatencyStats.of(r.latency for r in ok if r.latency is not None),
            ttft_by_turn={turn: LatencyStats.of(r.ttft for r in rs if r.ttft is not None)
                          for turn, rs in by_turn.items()},
            input_tokens_by_turn={turn: float(np.mean([r.prompt_tokens or 0 for r in rs]))
                                  for turn, rs in by_turn.items()},
            cached_share_by_turn={turn: share for turn, rs in by_turn.items()
                                  if (share := _cached_share(rs)) is not None},
            errors_by_status=dict(sorted(Counter(str(r.error) for r in failed).items())),
            error_examples=examples,
        )

    @property
    def num_prompts(self) -> int:
        return len(self.records)

    @property
    def client_bound(self) -> bool:
        """True when the figures may measure this load generator rather than the server."""
        return self.client_cpu >= CPU_BOUND

    @property
    def label(self) -> str:
        return self.config.label or self.model

    def to_json_dict(self, *, detailed: bool = False) -> dict[str, Any]:
        """vLLM bench serve's keys where they mean the same, plus ours (p90_*, errors_by_status, ...)."""
        c = self.config
        rate = c.effective_rate
        out: dict[str, Any] = {
            "date": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
            "backend": "openai-chat" if c.endpoint == "chat" else "openai",
            "endpoint": c.endpoint,
            "url": c.url,
            "label": self.label,
            "model_id": self.model,
            "num_prompts": self.num_prompts,
            "request_rate": rate if math.isfinite(rate) else "inf",  # as vLLM writes it: JSON has no infinity
            "burstiness": c.burstiness,
            "max_concurrency": c.concurrency,
            "input_len": c.mean_input_len,
            "output_len": c.mean_output_len,
            "workload": c.workload,
            "length_dist": c.length_dist,
            "range_ratio": c.range_ratio,
            "seed": c.seed,
            "duration": self.duration,
            "completed": self.completed,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "request_goodput": self.request_goodput,
            "goodput_targets_ms": dict(c.goodput),
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "max_concurrent_requests": self.max_concurrent_requests,
            "errors_by_status": dict(self.errors_by_status),
            "load_generator_cpu": self.client_cpu,
            "server_metrics": self.server.to_json_dict() if self.server is not None else None,
        }
        for name in LATENCIES:
            stats: LatencyStats = getattr(self, name)
            for stat in ("mean", "median", "std", "p90", "p99"):
                out[f"{stat}_{name}_ms"] = getattr(stats, stat)
        if c.workload == "conversation":
            out |= {"system_prompt_len": c.system_prompt_len, "turns": c.turns, "system_prompts": c.system_prompts,
                    "think_time": c.think_time,
                    "by_turn": [{"turn": turn, "completed": stats.count,
                                 "mean_input_tokens": self.input_tokens_by_turn[turn],
                                 "cached_token_share": self.cached_share_by_turn.get(turn),
                                 "median_ttft_ms": stats.median, "p99_ttft_ms": stats.p99}
                                for turn, stats in self.ttft_by_turn.items()]}
        if detailed:
            done = [r for r in self.records if r.finished]
            out |= {
                "input_lens": [r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in done],
                "output_lens": [r.completion_tokens or 0 for r in done],
                "ttfts": [r.ttft or 0.0 for r in done],
                "itls": [r.itl for r in done],
                "e2els": [r.latency or 0.0 for r in done],
                "errors": [r.error or "" for r in done],
                "error_details": [r.detail for r in done],
            }
        return out


def _goodput(ok: Sequence[RequestRecord], targets: Mapping[str, float], duration: float) -> float | None:
    """Requests per second that met every latency target (vLLM's definition: targets in ms, limits inclusive)."""
    if not targets:
        return None
    good = 0
    for r in ok:
        measured = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.latency}
        if all(measured[k] is not None and measured[k] * 1000.0 <= limit for k, limit in targets.items()):
            good += 1
    return good / duration


def _cached_share(records: Sequence[RequestRecord]) -> float | None:
    """Cached prompt tokens over prompt tokens, of the records whose usage said how many were cached."""
    told = [r for r in records if r.cached_tokens is not None and r.prompt_tokens]
    return sum(r.cached_tokens for r in told) / sum(r.prompt_tokens for r in told) if told else None
