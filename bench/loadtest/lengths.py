"""Token-length distributions for synthetic requests: fixed, uniform around a length, or ShareGPT-like.

ShareGPT-like: ShareGPT conversations have a heavy right tail (many short turns, a few long ones), which
matters to a server because long prompts and long answers share batches with short ones. We draw from a
lognormal truncated to [4, 5 * mean] (vLLM's ShareGPT sampling also drops turns under 4 tokens), with a
spread of sigma = 1.0 for prompts and 0.8 for answers, and choose its location so that the mean of the
*truncated* distribution is exactly the requested mean: 216 prompt / 200 output tokens unless given.
The medians then come out near 0.7x (prompts) and 0.75x (answers) of the means.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from gptoss_serve.bench.loadtest.config import LengthDist, LoadConfig

SHAREGPT_SIGMA_INPUT = 1.0
SHAREGPT_SIGMA_OUTPUT = 0.8
SHAREGPT_MIN = 4
SHAREGPT_MAX_FACTOR = 5


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def truncated_lognormal_mean(mu: float, sigma: float, low: float, high: float) -> float:
    """E[X | low <= X <= high] for X = exp(N(mu, sigma^2))."""
    a, b = math.log(low), math.log(high)
    mass = _phi((b - mu) / sigma) - _phi((a - mu) / sigma)
    part = _phi((b - mu - sigma**2) / sigma) - _phi((a - mu - sigma**2) / sigma)
    return math.exp(mu + sigma**2 / 2) * part / mass


def solve_lognormal_mu(mean: float, sigma: float, low: float, high: float) -> float:
    """The mu whose truncated mean is `mean` (the truncated mean grows with mu, so bisection finds it)."""
    lo, hi = math.log(low) - 3 * sigma, math.log(high) + 3 * sigma
    for _ in range(200):
        mid = (lo + hi) / 2
        if truncated_lognormal_mean(mid, sigma, low, high) < mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True, slots=True)
class LengthSampler:
    """Draws token lengths in [low, high] whose mean is `mean` (exactly for fixed, in expectation otherwise)."""

    dist: LengthDist
    mean: int
    low: int
    high: int
    sigma: float = 0.0
    mu: float = 0.0

    @classmethod
    def build(cls, *, dist: LengthDist, mean: int, range_ratio: float = 0.0, sigma: float = 1.0) -> LengthSampler:
        if mean < 1:
            raise ValueError(f"a mean length must be >= 1, got {mean}")
        if dist == "fixed":
            return cls(dist, mean, mean, mean)
        if dist == "uniform":
            # vLLM's random dataset bounds: floor below, ceil above, never under one token
            low = max(1, math.floor(mean * (1 - range_ratio)))
            high = max(low, math.ceil(mean * (1 + range_ratio)))
            return cls(dist, mean, low, high)
        if dist == "sharegpt":
            low, high = SHAREGPT_MIN, SHAREGPT_MAX_FACTOR * mean
            if not low < mean < high:
                raise ValueError(f"sharegpt lengths need a mean above {low} tokens, got {mean}")
            return cls(dist, mean, low, high, sigma, solve_lognormal_mu(mean, sigma, low, high))
        raise ValueError(f"unknown length distribution {dist!r}")

    def draw(self, rng: random.Random) -> int:
        if self.dist == "fixed":
            return self.mean
        if self.dist == "uniform":
            return rng.randint(self.low, self.high)
        while True:  # rejection keeps the shape of the truncated lognormal the mean was solved for
            value = rng.lognormvariate(self.mu, self.sigma)
            if self.low <= value <= self.high:
                return min(self.high, max(self.low, round(value)))


def samplers_for(config: LoadConfig) -> tuple[LengthSampler, LengthSampler]:
    """(input, output) length samplers for a run."""
    dist, ratio = config.length_dist, config.range_ratio
    return (
        LengthSampler.build(dist=dist, mean=config.mean_input_len, range_ratio=ratio, sigma=SHAREGPT_SIGMA_INPUT),
        LengthSampler.build(dist=dist, mean=config.mean_output_len, range_ratio=ratio, sigma=SHAREGPT_SIGMA_OUTPUT),
    )
