"""What the capacity planner (capacity_planner.py) plans for: a workload (prompt and output length distributions, a
concurrency or a request rate, latency limits) and the engine settings the prediction assumes. Pure Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gptoss_serve.cluster.capacity_profile import ProfileError
from gptoss_serve.cluster.engine_config import EngineConfig


@dataclass(frozen=True)
class Lengths:
    """A length distribution: values with weights (a fixed length is one value)."""
    values: list[float]
    weights: list[float] | None = None

    def __post_init__(self) -> None:
        if not self.values or any(not math.isfinite(v) or v < 1 for v in self.values):
            raise ProfileError("lengths must be at least 1 token")
        if self.weights is not None and (len(self.weights) != len(self.values) or any(w < 0 for w in self.weights)
                                         or sum(self.weights) <= 0):
            raise ProfileError("length weights: one non-negative weight per value, not all zero")

    def items(self) -> list[tuple[float, float]]:
        weights = self.weights or [1.0] * len(self.values)
        total = sum(weights)
        return [(v, w / total) for v, w in zip(self.values, weights)]

    @property
    def mean(self) -> float:
        return sum(v * p for v, p in self.items())

    @classmethod
    def fixed(cls, n: float) -> Lengths:
        return cls([float(n)])

    @classmethod
    def uniform(cls, low: int, high: int, points: int = 16) -> Lengths:
        """Uniform over [low, high], as `points` evenly spaced values (enough for means and KV blocks)."""
        if low > high:
            raise ProfileError(f"length range {low}-{high}: low above high")
        if low == high:
            return cls.fixed(low)
        return cls([low + (high - low) * i / (points - 1) for i in range(points)])


@dataclass(frozen=True)
class Workload:
    prompt: Lengths
    output: Lengths
    concurrency: float | None = None     # requests in flight (closed loop, or a burst of this many)
    request_rate: float | None = None    # requests a second (open loop)
    tpot_limit_s: float | None = None
    ttft_limit_s: float | None = None
    burst: bool = False                  # all `concurrency` requests arrive at once (bench.disaggregated's bursts)

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.request_rate is None):
            raise ProfileError("give a concurrency or a request rate (one of them)")
        if self.concurrency is not None and not self.concurrency > 0:
            raise ProfileError("concurrency must be positive")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ProfileError("request rate must be positive")
        if self.burst and self.concurrency is None:
            raise ProfileError("a burst needs a concurrency")
        for name in ("tpot_limit_s", "ttft_limit_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ProfileError(f"{name}: must be positive")


@dataclass(frozen=True)
class EngineLimits:
    """The engine settings the prediction assumes (EngineConfig's names)."""
    gpu_memory_utilization: float = EngineConfig.model_fields["gpu_memory_utilization"].default
    max_num_seqs: int = EngineConfig.model_fields["max_num_seqs"].default
    max_num_batched_tokens: int = EngineConfig.model_fields["max_num_batched_tokens"].default
