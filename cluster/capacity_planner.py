"""Capacity planning: predict throughput and latency of a layout (data parallel, or M attention GPUs + N expert GPUs)
for a workload, from a profile of measured times (issue 33). Pure Python: no torch, no Ray, so it runs anywhere and
a profile saved on one card plans for other GPU counts (docs/capacity-planning.md).

The model, per attention replica holding B sequences at mean context c (L layers):
- colocated / data parallel:  decode step = A(B, c) + L * E1(B)
- M:N split, decode step:      max(A(B, c) + L * (X_N(B) + E_N(B)),  M * L * E_N(B))
  (the replica's critical path; or the workers' busy time, as each worker serves the layers of all M replicas).
  Decode steps stay whole even with micro_batches 2: the engine replays one CUDA graph of the whole batch.
- a prefill chunk of T tokens is the same formula at B = T (context: half the prompt); with micro_batches 2 the
  two halves pipeline: max(2a, 2e) + min(a, e) / L, a = A(T/2), e = L * (X_N(T/2) + E_N(T/2)).
- a cycle of B requests: prefill B * P prompt tokens in chunks, then O decode steps; throughput = B * O / cycle.
A is the attention side of a whole step (every layer's attention and dense layers, unembedding, sampling, the host's
share); E_N the MoE layer on one worker holding 1/N of the experts; X_N the exchange's round trip per layer.
KV capacity: what gpu_memory_utilization leaves on an attention GPU after its weights and a fixed reserve.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Literal


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


# ---------------------------------------------------------------------------------------------------------------
# The workload and the engine's limits.


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
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048


# ---------------------------------------------------------------------------------------------------------------
# Layouts and predictions.


@dataclass(frozen=True)
class Layout:
    kind: Literal["data_parallel", "split"]
    replicas: int                # attention replicas (each one GPU); data parallel: the colocated replicas
    workers: int = 0             # MoE workers (each one GPU)
    micro_batches: int = 1       # split only: 2 = ping-pong prefill chunks

    @property
    def gpus(self) -> int:
        return self.replicas + self.workers

    @property
    def label(self) -> str:
        if self.kind == "data_parallel":
            return "colocated" if self.replicas == 1 else f"data parallel x{self.replicas}"
        return f"split {self.replicas}:{self.workers}" + (" ping-pong" if self.micro_batches > 1 else "")


def layouts_for(gpus: int, experts: int) -> list[Layout]:
    """Every layout on exactly `gpus` GPUs: data parallel, and each M:N split whose N divides the experts, with and
    without ping-pong."""
    if gpus < 1:
        raise ProfileError(f"GPUs must be at least 1, got {gpus}")
    out = [Layout("data_parallel", gpus)]
    for m in range(1, gpus):
        n = gpus - m
        if experts % n == 0:
            out += [Layout("split", m, n, 1), Layout("split", m, n, 2)]
    return out


@dataclass
class Prediction:
    layout: Layout
    fits: bool
    reason: str = ""                         # why it does not fit / cannot be predicted
    kv_tokens_per_replica: float = 0.0
    max_seqs_per_replica: int = 0            # sequences of the workload's lengths that the KV cache holds
    max_concurrency: int = 0                 # over all replicas (KV and max_num_seqs)
    batch: float = 0.0                       # sequences decoding together per replica at the operating point
    decode_step_s: float = 0.0
    tpot_s: float = 0.0
    ttft_s: float = 0.0
    tokens_per_s: float = 0.0                # output tokens, all GPUs
    tokens_per_s_per_gpu: float = 0.0
    max_tokens_per_s: float = 0.0            # capacity: at the largest batch that fits and meets the TPOT limit
    kv_limited: bool = False                 # the workload wants more sequences than the KV cache holds
    sustains: bool = True                    # request-rate mode: the layout keeps up with the rate
    meets_limits: bool = True
    breakdown: dict = field(default_factory=dict)  # the terms each figure was built from, seconds


def _kv(profile: Profile, layout: Layout, limits: EngineLimits) -> tuple[float, str]:
    """KV bytes of one attention GPU, or a reason the layout does not fit."""
    usable = profile.card_memory_bytes * limits.gpu_memory_utilization - profile.reserved_bytes
    if layout.kind == "data_parallel":
        weights = profile.attention_weights_bytes + profile.expert_weights_bytes
    else:
        weights = profile.attention_weights_bytes
        per_worker = profile.expert_weights_bytes / layout.workers
        if per_worker > usable:
            return 0.0, (f"a worker's experts ({per_worker / 1e9:.1f} GB) exceed its GPU's usable "
                         f"{usable / 1e9:.1f} GB")
    kv = usable - weights
    if kv <= 0:
        return 0.0, f"the weights ({weights / 1e9:.1f} GB) leave no KV cache in the usable {usable / 1e9:.1f} GB"
    return kv, ""


class Planner:
    """Predictions for one profile, workload and engine limits."""

    def __init__(self, profile: Profile, workload: Workload, limits: EngineLimits | None = None) -> None:
        self.p, self.w, self.limits = profile, workload, limits or EngineLimits()
        self.prompt, self.output = workload.prompt.mean, workload.output.mean
        # a decoding sequence's context on average: its prompt plus half its output
        self.decode_context = self.prompt + self.output / 2
        # KV a sequence holds at its full length, averaged over the distributions (blocks round up per sequence)
        self.seq_kv_tokens = sum(pp * po * profile.model.sequence_tokens(p + o)
                                 for (p, pp), (o, po) in itertools.product(workload.prompt.items(),
                                                                           workload.output.items()))

    # -- step times

    def step(self, layout: Layout, tokens: float, context: float, prefill: bool = False) -> dict:
        """One step of `tokens` tokens on one replica: {"total": seconds, and its terms}."""
        p, L = self.p, self.p.model.layers
        if layout.kind == "data_parallel":
            a, e = p.attention_step.at(tokens, context), L * p.experts_time(tokens, 1)
            return {"total": a + e, "attention": a, "experts": e}
        n, m = layout.workers, layout.replicas
        if prefill and layout.micro_batches > 1 and tokens >= 2:
            half = tokens / 2
            a = p.attention_step.at(half, context)
            x, e = L * p.exchange_time(half, n), L * p.experts_time(half, n)
            path = max(2 * a, 2 * (x + e)) + min(a, x + e) / L   # two stages pipelined; one layer to fill
            workers = m * 2 * e
            return {"total": max(path, workers), "attention": 2 * a, "exchange": 2 * x, "experts": 2 * e,
                    "critical_path": path, "workers_busy": workers, "overlap": 2 * a + 2 * (x + e) - path}
        a = p.attention_step.at(tokens, context)
        x, e = L * p.exchange_time(tokens, n), L * p.experts_time(tokens, n)
        path, workers = a + x + e, m * e
        return {"total": max(path, workers), "attention": a, "exchange": x, "experts": e, "critical_path": path,
                "workers_busy": workers}

    def cycle(self, layout: Layout, batch: float) -> dict:
        """One replica serving `batch` requests from prompt to last token: their prefill chunks, then the output's
        decode steps. (The engine mixes the two in one step; adding them up is the approximation.)"""
        prompt_tokens = batch * self.prompt
        chunk = min(self.limits.max_num_batched_tokens, max(prompt_tokens, 1.0))
        prefill_step = self.step(layout, chunk, self.prompt / 2, prefill=True)
        prefill = prompt_tokens / chunk * prefill_step["total"]
        decode = self.step(layout, max(batch, 1.0), self.decode_context)
        total = prefill + self.output * decode["total"]
        # own prompt: its chunks (a prompt longer than a chunk takes several steps)
        own_prefill = max(self.prompt / chunk, 1.0) * prefill_step["total"]
        return {"total": total, "prefill": prefill, "decode_step": decode["total"], "decode": decode,
                "prefill_chunk": prefill_step, "chunk_tokens": chunk, "own_prefill": own_prefill}

    def tpot(self, layout: Layout, batch: float) -> float:
        c = self.cycle(layout, batch)
        return c["decode_step"] if self.w.burst else c["total"] / self.output

    def capacity(self, layout: Layout, cap: int) -> float:
        """Output tokens a second at the largest batch (up to `cap`) whose TPOT meets the limit: the layout's
        headroom, which ranks layouts that all keep up with a request rate."""
        limit = self.w.tpot_limit_s
        batch = float(cap)
        if limit is not None and self.tpot(layout, batch) > limit:
            if self.tpot(layout, 1.0) > limit:
                return 0.0
            lo, hi = 1.0, float(cap)
            for _ in range(50):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if self.tpot(layout, mid) <= limit else (lo, mid)
            batch = lo
        return layout.replicas * batch * self.output / self.cycle(layout, batch)["total"]

    # -- a layout's prediction

    def predict(self, layout: Layout) -> Prediction:
        pred = Prediction(layout, fits=True)
        if layout.kind == "split" and not self.p.exchange_layer:
            pred.fits, pred.reason = False, "the profile has no exchange times (measure on 2+ GPUs)"
            return pred
        kv, reason = _kv(self.p, layout, self.limits)
        if reason:
            pred.fits, pred.reason = False, reason
            return pred
        pred.kv_tokens_per_replica = kv / self.p.kv_bytes_per_token
        pred.max_seqs_per_replica = int(pred.kv_tokens_per_replica // self.seq_kv_tokens)
        if pred.max_seqs_per_replica < 1:
            pred.fits = False
            pred.reason = (f"one sequence needs {self.seq_kv_tokens:.0f} KV tokens, a replica holds "
                           f"{pred.kv_tokens_per_replica:.0f}")
            return pred
        cap = min(pred.max_seqs_per_replica, self.limits.max_num_seqs)
        r = layout.replicas
        pred.max_concurrency = cap * r
        full = self.cycle(layout, cap)
        pred.max_tokens_per_s = self.capacity(layout, cap)

        w = self.w
        if w.concurrency is not None:
            wanted = w.concurrency / r
            batch = min(wanted, cap)
            pred.kv_limited = wanted > pred.max_seqs_per_replica
            c = self.cycle(layout, batch)
            queued_cycles = max(0.0, wanted / batch - 1)   # requests beyond the batch wait for earlier ones
            if w.burst:
                tpot = c["decode_step"]
                ttft = (c["prefill"] + c["own_prefill"]) / 2 + queued_cycles * c["total"]
            else:
                tpot = c["total"] / self.output
                ttft = c["own_prefill"] + c["decode_step"] + queued_cycles * c["total"]
        else:
            # open loop: the average batch B at which the replicas complete requests as fast as they come
            rate = w.request_rate / r
            if cap / full["total"] < rate:
                pred.sustains = False
                batch, c = cap, full
            else:
                lo, hi = 1e-6, float(cap)
                for _ in range(60):
                    mid = (lo + hi) / 2
                    if mid / self.cycle(layout, mid)["total"] < rate:
                        lo = mid
                    else:
                        hi = mid
                batch, c = hi, self.cycle(layout, hi)
            tpot = c["total"] / self.output
            ttft = c["own_prefill"] + c["decode_step"]
        pred.batch, pred.decode_step_s, pred.tpot_s, pred.ttft_s = batch, c["decode_step"], tpot, ttft
        pred.tokens_per_s = r * batch * self.output / c["total"]
        if w.request_rate is not None and pred.sustains:
            pred.tokens_per_s = w.request_rate * self.output
        pred.tokens_per_s_per_gpu = pred.tokens_per_s / layout.gpus
        pred.meets_limits = (pred.sustains and (w.tpot_limit_s is None or tpot <= w.tpot_limit_s)
                             and (w.ttft_limit_s is None or ttft <= w.ttft_limit_s))
        pred.breakdown = {"decode_step": c["decode"], "prefill_chunk": c["prefill_chunk"],
                          "chunk_tokens": c["chunk_tokens"], "cycle": c["total"], "cycle_prefill": c["prefill"],
                          "cycle_decode": self.output * c["decode_step"], "decode_context": self.decode_context,
                          "seq_kv_tokens": self.seq_kv_tokens, "kv_bytes_per_replica": kv}
        return pred

    def plan(self, gpus: int) -> tuple[list[Prediction], Prediction | None, str]:
        """Every layout on `gpus` GPUs, the recommended one and why."""
        preds = [self.predict(layout) for layout in layouts_for(gpus, self.p.model.experts)]
        return preds, *recommend(preds)


def recommend(preds: list[Prediction]) -> tuple[Prediction | None, str]:
    """The layout with the most output tokens a second per GPU among those that meet the latency limits (and keep
    up with the rate); ties go to the larger capacity. If none meets them, the lowest TPOT that fits, said so."""
    feasible = [p for p in preds if p.fits]
    if not feasible:
        return None, "no layout fits: " + "; ".join(f"{p.layout.label}: {p.reason}" for p in preds)
    meets = [p for p in feasible if p.meets_limits]
    if meets:
        best = max(meets, key=lambda p: (round(p.tokens_per_s_per_gpu, 6), p.max_tokens_per_s))
        why = "most tok/s per GPU" + (" within the latency limits" if len(meets) < len(feasible) else "")
        bound = [p for p in feasible if p.kv_limited and p.max_concurrency < best.max_concurrency]
        if bound:
            why += (f"; KV-bound elsewhere: {bound[0].layout.label} holds {bound[0].max_concurrency} sequences, "
                    f"this layout {best.max_concurrency}")
        return best, why
    best = min(feasible, key=lambda p: (not p.sustains, p.tpot_s))
    return best, "no layout meets the limits: the lowest TPOT"
