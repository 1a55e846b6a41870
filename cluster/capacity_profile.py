"""What the capacity planner (capacity_planner.py) plans from: a profile of measured times on one card (attention
step by batch and context, the MoE layer by tokens per worker, the exchange by tokens and workers, memory), kept as
JSON so that one card's measurements plan layouts and GPU counts elsewhere; and the interpolation between its
points. Pure Python (no torch, no Ray).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, field


class ProfileError(ValueError):
    """A profile or workload that cannot be planned with; the message names the field."""


# ---------------------------------------------------------------------------------------------------------------
# Interpolation. Piecewise linear (times grow about linearly with work between measured points). Below the first
# point the first value holds (a step never gets cheaper than its smallest measured size: fixed launch costs);
# beyond the last the last segment's slope continues (more tokens, proportionally more work).


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    if len(xs) == 1 or x <= xs[0]:
        return ys[0]
    i = bisect.bisect_right(xs, x)
    if i >= len(xs):
        i = len(xs) - 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def _increasing(values: list[float], what: str) -> None:
    if not values:
        raise ProfileError(f"{what}: empty")
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0 for v in values):
        raise ProfileError(f"{what}: every value must be a finite non-negative number")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ProfileError(f"{what}: must be strictly increasing")


@dataclass(frozen=True)
class Curve:
    """Seconds against a token count (one MoE layer on a worker, or one exchange round trip)."""
    tokens: list[float]
    seconds: list[float]

    def __post_init__(self) -> None:
        _increasing(self.tokens, "tokens")
        if len(self.seconds) != len(self.tokens):
            raise ProfileError("seconds: one value per token count")
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for v in self.seconds):
            raise ProfileError("seconds: every value must be a finite non-negative number")

    def at(self, tokens: float) -> float:
        return interpolate(self.tokens, self.seconds, tokens)

    @classmethod
    def from_pairs(cls, pairs: list, what: str) -> Curve:
        try:
            tokens, seconds = zip(*((float(t), float(s)) for t, s in pairs))
        except (TypeError, ValueError):
            raise ProfileError(f"{what}: expected a list of [tokens, seconds] pairs") from None
        try:
            return cls(list(tokens), list(seconds))
        except ProfileError as e:
            raise ProfileError(f"{what}: {e}") from None

    def pairs(self) -> list[list[float]]:
        return [[t, s] for t, s in zip(self.tokens, self.seconds)]


@dataclass(frozen=True)
class AttentionTable:
    """The attention side of one whole step, seconds, by tokens in the step (the batch, for decode) and context.
    seconds[i][j] is at contexts[i], batches[j]; bilinear in between."""
    batches: list[float]
    contexts: list[float]
    seconds: list[list[float]]

    def __post_init__(self) -> None:
        _increasing(self.batches, "attention_step.batches")
        _increasing(self.contexts, "attention_step.contexts")
        if len(self.seconds) != len(self.contexts) or any(len(r) != len(self.batches) for r in self.seconds):
            raise ProfileError("attention_step.seconds: one row per context, one value per batch in each")
        for row in self.seconds:
            if any(not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for v in row):
                raise ProfileError("attention_step.seconds: every value must be a finite non-negative number")

    def at(self, batch: float, context: float) -> float:
        by_context = [interpolate(self.batches, row, batch) for row in self.seconds]
        return interpolate(self.contexts, by_context, context)


# ---------------------------------------------------------------------------------------------------------------
# The profile: what was measured (or derived) on one card for one model.


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    experts: int
    top_k: int = 4
    block_size: int = 16            # the engine's KV block (engine.block_size)
    sliding_window: int = 0         # tokens; 0: every layer full attention

    def sequence_tokens(self, length: float) -> float:
        """KV tokens (blocks x block_size, as the engine counts its cache) one sequence of `length` holds: full-
        attention blocks for the whole length, and the sliding window's blocks plus the one it is filling."""
        full = math.ceil(length / self.block_size)
        window = min(full, math.ceil(self.sliding_window / self.block_size) + 1) if self.sliding_window else 0
        return (full + window) * self.block_size


@dataclass(frozen=True)
class Profile:
    name: str
    card: str
    model: ModelShape
    card_memory_bytes: float          # what torch reports as the card's total memory
    reserved_bytes: float             # activations, graphs, workspace: kept out of the KV cache on every GPU
    attention_weights_bytes: float    # everything but the experts (embedding, attention, router, unembedding)
    expert_weights_bytes: float       # every layer's experts
    kv_bytes_per_token: float         # KV cache bytes per engine token (blocks x block_size)
    attention_step: AttentionTable
    expert_layer: dict[int, Curve]    # workers N -> one worker's MoE layer time by the step's tokens
    exchange_layer: dict[int, Curve] = field(default_factory=dict)  # workers N -> round trip per layer
    source: str = ""
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("card_memory_bytes", "reserved_bytes", "attention_weights_bytes", "expert_weights_bytes",
                     "kv_bytes_per_token"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ProfileError(f"memory.{name}: must be a finite non-negative number")
        if self.kv_bytes_per_token <= 0 or self.card_memory_bytes <= 0:
            raise ProfileError("memory: card_bytes and kv_bytes_per_token must be positive")
        if 1 not in self.expert_layer:
            raise ProfileError("expert_layer: needs the table for 1 worker (the whole layer, as colocated runs it)")

    # -- lookups with the fallbacks the docs name

    def experts_time(self, tokens: float, workers: int) -> float:
        """One MoE layer on one of `workers` workers, the step having `tokens` tokens. Measured per worker count
        where the profile has it; else assumed: the whole layer's time split evenly (1/N of the weights and of the
        pairs), never below the whole layer at one token (a layer's fixed cost: launches, the smallest reads)."""
        if workers in self.expert_layer:
            return self.expert_layer[workers].at(tokens)
        whole = self.expert_layer[1]
        return max(whole.at(tokens) / workers, whole.at(1))

    def exchange_time(self, tokens: float, workers: int) -> float | None:
        """The exchange's round trip per layer; the nearest measured worker count stands in for one not measured
        (assumed: the round trip depends on tokens far more than on workers). None without any exchange data."""
        if not self.exchange_layer:
            return None
        nearest = min(self.exchange_layer, key=lambda n: (abs(n - workers), n))
        return self.exchange_layer[nearest].at(tokens)

    # -- JSON

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        if not isinstance(d, dict):
            raise ProfileError("a profile is a JSON object")
        try:
            m, mem, att = d["model"], d["memory"], d["attention_step"]
            model = ModelShape(**{k: m[k] for k in ("name", "layers", "experts")},
                               **{k: m[k] for k in ("top_k", "block_size", "sliding_window") if k in m})
            if model.layers < 1 or model.experts < 1 or model.block_size < 1:
                raise ProfileError("model: layers, experts and block_size must be positive")
            table = AttentionTable([float(b) for b in att["batches"]], [float(c) for c in att["contexts"]],
                                   [[float(s) for s in row] for row in att["seconds"]])
            experts = {int(n): Curve.from_pairs(p, f"expert_layer[{n}]") for n, p in d["expert_layer"].items()}
            exchange = {int(n): Curve.from_pairs(p, f"exchange_layer[{n}]")
                        for n, p in d.get("exchange_layer", {}).items()}
            return cls(name=str(d.get("name", "")), card=str(d.get("card", "")), model=model,
                       card_memory_bytes=mem["card_bytes"], reserved_bytes=mem.get("reserved_bytes", 0.0),
                       attention_weights_bytes=mem["attention_weights_bytes"],
                       expert_weights_bytes=mem["expert_weights_bytes"],
                       kv_bytes_per_token=mem["kv_bytes_per_token"], attention_step=table, expert_layer=experts,
                       exchange_layer=exchange, source=str(d.get("source", "")), notes=dict(d.get("notes", {})))
        except KeyError as e:
            raise ProfileError(f"missing field {e.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as e:
            if isinstance(e, ProfileError):
                raise
            raise ProfileError(f"malformed profile: {e}") from None

    def to_dict(self) -> dict:
        return {
            "name": self.name, "card": self.card, "source": self.source, "notes": self.notes,
            "model": asdict(self.model),
            "memory": {"card_bytes": self.card_memory_bytes, "reserved_bytes": self.reserved_bytes,
                       "attention_weights_bytes": self.attention_weights_bytes,
                       "expert_weights_bytes": self.expert_weights_bytes,
                       "kv_bytes_per_token": self.kv_bytes_per_token},
            "attention_step": {"batches": self.attention_step.batches, "contexts": self.attention_step.contexts,
                               "seconds": self.attention_step.seconds},
            "expert_layer": {str(n): c.pairs() for n, c in sorted(self.expert_layer.items())},
            "exchange_layer": {str(n): c.pairs() for n, c in sorted(self.exchange_layer.items())},
        }
