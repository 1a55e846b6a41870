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

import itertools
from dataclasses import dataclass, field
from typing import Literal

from gptoss_serve.cluster.capacity_profile import Profile, ProfileError
from gptoss_serve.cluster.capacity_workload import EngineLimits, Workload


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
