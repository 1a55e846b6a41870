"""When timed requests arrive: gamma-distributed gaps, as vLLM's --request-rate and --burstiness.

The gaps have mean 1/rate whatever the burstiness; shape 1 makes them exponential (a Poisson process),
a shape below 1 bunches requests into bursts and above 1 spaces them more evenly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator


def arrival_gaps(*, rate: float, burstiness: float = 1.0, seed: int = 0) -> Iterator[float]:
    """Seconds to wait before each request after the first (which goes at once); all zero at an infinite rate."""
    if not rate > 0 or not burstiness > 0:
        raise ValueError(f"rate and burstiness must be > 0, got {rate} and {burstiness}")
    rng = random.Random(f"arrivals/{seed}")
    scale = 0.0 if math.isinf(rate) else 1.0 / (rate * burstiness)
    while True:
        yield rng.gammavariate(burstiness, scale) if scale else 0.0
