"""Per-layer token exchange between one attention replica and N MoE workers, over torch.distributed.

Each replica forms its own process group with the workers: rank 0 is the replica, ranks 1..N the workers, so
replicas start, fail and restart independently, and a worker serves each replica on its own thread.

The wire protocol for one MoE layer, to each worker, in this order (tags keep the messages apart):
  header  int64 [2]       (layer, tokens) -- a small control message first, so sizes are known
  hidden  [n, H]          the hidden states of the tokens routed to any of the worker's experts
  routing int64 [n, K] and float32 [n, K]: global expert ids and weights
and back: [n, H], the weighted sum of the worker's experts' outputs. The replica adds the workers' parts.
Ray does the placement and the rendezvous (who is which rank, where the store is); it carries no tensor.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from gptoss_serve.model.experts import ExpertsUnavailableError

HEADER, HIDDEN, IDS, WEIGHTS, RESULT = range(5)
HEADER_SIZE = 2  # int64 (layer, tokens)
STOP_LAYER = -1  # a header with this layer ends the worker's loop for this replica


def make_group(*, backend: str, host: str, port: int, rank: int, world_size: int, is_master: bool,
               prefix: str, timeout_s: float = 3600.0):
    """A process group of its own (no global default group): one per replica-workers link."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master, timeout=datetime.timedelta(seconds=60),
                          wait_for_workers=False)
    store = dist.PrefixStore(prefix, store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout), store
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options), store
    raise ValueError(f"expert_transport must be 'gloo' or 'nccl', got {backend!r}")


@dataclass
class Shard:
    """Which experts a worker holds: [first, first + count)."""

    first: int
    count: int


@dataclass
class PendingExchange:
    """A dispatched layer: what came back is added into `out` at `combine`."""

    out: torch.Tensor
    parts: list[tuple[torch.Tensor, torch.Tensor, object]]  # (token rows, result buffer, recv work)
    sends: list[tuple[object, torch.Tensor]]  # send works and their tensors, alive until they complete
    client: ExpertClient | None = None


@dataclass
class ExchangeStats:
    """What the exchange did since the last look (the replica turns it into metrics)."""

    tokens_per_worker: list[int]
    tokens_per_expert: list[int]  # filled in by drain()
    dispatch_seconds: list[float] = field(default_factory=list)  # per layer: routing + sending
    combine_seconds: list[float] = field(default_factory=list)  # per layer: waiting for the answers
    step_bytes: list[int] = field(default_factory=list)  # bytes sent + received, per engine step


class ExpertClient:
    """The replica's side: dispatch a layer's routed tokens to the workers, combine their answers."""

    def __init__(self, group, shards: list[Shard], *, device: torch.device, timeout_s: float = 10.0,
                 staging: torch.device | None = None) -> None:
        self.group, self.shards, self.device = group, shards, device
        # gloo moves CPU tensors: GPU activations go through host memory
        self.staging = staging or device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.num_experts = shards[-1].first + shards[-1].count
        self.stats = self._fresh_stats()
        self._step_bytes, self._last_layer = 0, -1

    def _fresh_stats(self) -> ExchangeStats:
        self._expert_counts = None  # [E] on the activations' device, summed without a host sync
        return ExchangeStats([0] * len(self.shards), [0] * self.num_experts)

    def drain(self) -> ExchangeStats:
        counts = self._expert_counts
        stats, self.stats = self.stats, self._fresh_stats()
        if counts is not None:
            stats.tokens_per_expert = counts.tolist()
        return stats

    def dispatch(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> PendingExchange:
        """hidden [T, H], expert_ids/weights [T, K] -> an exchange in flight (nothing waits here)."""
        start = time.perf_counter()
        if layer == 0 and self._last_layer != 0:  # a new step begins (its micro-batches all start at layer 0)
            if self._step_bytes:
                self.stats.step_bytes.append(self._step_bytes)
            self._step_bytes = 0
        self._last_layer = layer
        counts = torch.bincount(expert_ids.flatten(), minlength=self.num_experts)
        self._expert_counts = counts if self._expert_counts is None else self._expert_counts + counts
        out = torch.zeros_like(hidden)
        parts, sends = [], []
        for worker, shard in enumerate(self.shards):
            local = (expert_ids >= shard.first) & (expert_ids < shard.first + shard.count)  # [T, K]
            rows = local.any(dim=1).nonzero().flatten()  # [n] tokens this worker must see
            n = rows.numel()
            self.stats.tokens_per_worker[worker] += n
            rank = worker + 1
            header = torch.tensor([layer, n], dtype=torch.int64)
            try:
                sends.append((self.group.send([header], rank, HEADER), header))
                if n == 0:
                    continue
                x = hidden[rows].to(self.staging).contiguous()
                ids = expert_ids[rows].to(self.staging, torch.int64).contiguous()
                w = weights[rows].to(self.staging, torch.float32).contiguous()
                for tensor, tag in ((x, HIDDEN), (ids, IDS), (w, WEIGHTS)):
                    sends.append((self.group.send([tensor], rank, tag), tensor))
                    self._step_bytes += tensor.numel() * tensor.element_size()
                result = torch.empty_like(x)
                parts.append((rows, result, self.group.recv([result], rank, RESULT)))
            except RuntimeError as e:
                raise ExpertsUnavailableError(f"MoE worker {worker} is unreachable ({e})") from None
        self.stats.dispatch_seconds.append(time.perf_counter() - start)
        return PendingExchange(out, parts, sends, self)

    def combine(self, pending: PendingExchange) -> torch.Tensor:
        start = time.perf_counter()
        works = [work for work, _ in pending.sends] + [work for _, _, work in pending.parts]
        for worker_rows, result, work in pending.parts:
            try:
                for w in works:
                    w.wait(self.timeout)
                works = []
            except RuntimeError as e:
                raise ExpertsUnavailableError(
                    f"a MoE worker did not answer within {self.timeout.total_seconds():.0f} s ({e})") from None
            self._step_bytes += result.numel() * result.element_size()
            pending.out.index_add_(0, worker_rows, result.to(pending.out.device, pending.out.dtype))
        self.stats.combine_seconds.append(time.perf_counter() - start)
        return pending.out

    def close(self) -> None:
        for worker in range(len(self.shards)):
            try:
                self.group.send([torch.tensor([STOP_LAYER, 0], dtype=torch.int64)], worker + 1, HEADER)
            except RuntimeError:
                pass


def serve_replica(group, experts: list, *, hidden_size: int, top_k: int, device: torch.device,
                  staging: torch.device | None = None) -> None:
    """The worker's side, for one replica: answer layer after layer until the link stops or breaks.

    experts[layer] computes (hidden [n, H], expert_ids [n, K], weights [n, K]) -> [n, H] for the local shard, in
    the shard's dtype (ExpertShard.dtype).
    """
    staging = staging or device
    dtype = experts[0].dtype
    while True:
        header = torch.empty(HEADER_SIZE, dtype=torch.int64)
        group.recv([header], 0, HEADER).wait()
        layer, n = int(header[0]), int(header[1])
        if layer == STOP_LAYER:
            return
        if n == 0:
            continue
        x = torch.empty(n, hidden_size, dtype=dtype, device=staging)
        ids = torch.empty(n, top_k, dtype=torch.int64, device=staging)
        w = torch.empty(n, top_k, dtype=torch.float32, device=staging)
        for tensor, tag in ((x, HIDDEN), (ids, IDS), (w, WEIGHTS)):
            group.recv([tensor], 0, tag).wait()
        with torch.inference_mode():
            y = experts[layer](x.to(device), ids.to(device), w.to(device))  # [n, H]
        group.send([y.to(staging, dtype).contiguous()], 0, RESULT).wait()
