"""Per-layer token exchange between one attention replica and N MoE workers, over torch.distributed.

Each replica links to the workers on its own: three process groups (rank 0 the replica, ranks 1..N the workers),
one carrying the replica's dispatches and one the workers' answers, so a send never queues behind a receive in the
other direction (NCCL runs a pair's messages in order and ignores tags), and a gloo one for the step headers.
Replicas start, fail and restart independently, and a worker serves each replica on a thread (and, on a GPU, a CUDA
stream) of its own. This module holds the protocol and the replica's side; the worker's is worker_steps.py.

The headers travel on the host so that a worker waiting for a replica's next step leaves nothing on its GPU: an NCCL
receive posted for a header would spin on the device for as long as that replica is idle, and NCCL cannot set up
another replica's communicator on the same GPU meanwhile (the second replica's first send hangs). Measured on 4
H200s: 2 attention replicas sharing a worker hung at their first request with the header on NCCL.

The wire protocol, built for the GPU: nothing on the replica's side waits for the host or reads a count back.
  once a step     header int64 [1 + MAX_MICRO_BATCHES] (host memory, gloo): how many micro-batches, and each
                  one's token count
  each layer and  one packed buffer [T, 2H + 8K] bytes to every worker: the T tokens' hidden states (the
  micro-batch     activation dtype), their K global expert ids (int32) and weights (float32)
                  one answer [T, H] from every worker: its experts' weighted sum (zero for tokens none of its
                  experts got), in the activation dtype from a single worker, in float32 from each of several
                  (see answer_dtype); the replica adds the answers in float32 up a fixed tree (add_as_groups)
                  and rounds once
Every worker gets every token: with a few workers and top-4 routing almost every token reaches each of them
anyway, and fixed sizes need no routing on the host. Over NCCL the sends and receives are queued on the GPU in
stream order (a receive's wait is a stream wait); the step's samples reach the host through an event that the
replica waits on with the expert timeout (see step_hooks.py). Over gloo (CPUs, tests) waits block the host, with
the same timeout. Ray does the placement and the rendezvous (who is which rank, where the store is); it carries
no tensor.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from gptoss_serve.cluster.expert_parallel.step_watch import StepWatch
from gptoss_serve.model.experts import ExpertsUnavailableError, add_as_groups

MAX_MICRO_BATCHES = 8
STOP = -1  # a header with this micro-batch count ends the worker's loop for this replica
HEADER_NOT_TAKEN = "did not answer (it did not take the step's header)"
HELLO = 7  # the handshake's value: both communicators are set up before the first step
# The environment of every process that may join a link over NCCL: the deployments start the attention replicas and
# the MoE workers with it, and make_link sets whatever is missing. This module's own timeouts abort a link, so
# torch's watchdog must not tear the process down on a peer's failure (its default); and NVLink multicast stays off
# (the lent multi-GPU machines need it off; NCCL reads it when a communicator is set up).
NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class Link:
    """One replica's two process groups with its workers (or one worker's view of them)."""

    dispatch: object  # replica -> workers
    combine: object  # workers -> replica
    backend: str
    control: object  # replica -> workers, gloo: the step headers

    def abort(self) -> None:
        """Ends the communicators now, without waiting for what is queued on them (a hung peer cannot block it)."""
        for group in (self.dispatch, self.combine, self.control):
            try:
                if hasattr(group, "abort"):
                    group.abort()
            except Exception:  # noqa: BLE001 - a communicator already torn down
                pass


def make_link(*, backend: str, host: str, port: int, rank: int, world_size: int, is_master: bool, prefix: str,
              timeout_s: float = 3600.0) -> tuple[Link, object]:
    """The link's three process groups (no global default group), over one rendezvous store."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master, timeout=datetime.timedelta(seconds=60),
                          wait_for_workers=False)

    def group(name: str, backend: str = backend):
        prefixed = dist.PrefixStore(f"{prefix}/{name}", store)
        if backend == "gloo":
            return dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        if backend == "nccl":
            # this module's own timeouts abort a link; torch's watchdog must not tear the process down on a peer's
            # failure (its default), and NVLink multicast stays off (read when the communicator is set up)
            for key, value in NCCL_ENV.items():
                os.environ.setdefault(key, value)
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            return dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
        raise ValueError(f"expert_transport must be 'gloo' or 'nccl', got {backend!r}")

    return Link(group("dispatch"), group("combine"), backend, group("control", "gloo")), store


def answer_dtype(num_workers: int, dtype: torch.dtype) -> torch.dtype:
    """What a worker answers in. One worker's answer is the layer's output, rounded once like colocated experts';
    several answer unrounded (float32) so that their sum is rounded once too, and greedy outputs stay those of
    colocated mode."""
    return dtype if num_workers == 1 else torch.float32


def row_bytes(hidden_size: int, top_k: int, dtype: torch.dtype) -> int:
    """Bytes of one token in a dispatch buffer."""
    return hidden_size * dtype.itemsize + top_k * 8


def pack(hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """hidden [T, H], expert_ids [T, K], weights [T, K] -> one uint8 buffer [T, row_bytes] (one send, one copy)."""
    return torch.cat([hidden.contiguous().view(torch.uint8), expert_ids.to(torch.int32).contiguous().view(torch.uint8),
                      weights.to(torch.float32).contiguous().view(torch.uint8)], dim=1)


def unpack(buffer: torch.Tensor, hidden_size: int, top_k: int,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = hidden_size * dtype.itemsize
    return (buffer[:, :a].contiguous().view(dtype), buffer[:, a:a + 4 * top_k].contiguous().view(torch.int32),
            buffer[:, a + 4 * top_k:].contiguous().view(torch.float32))


@dataclass
class Shard:
    """Which experts a worker holds: [first, first + count)."""

    first: int
    count: int


@dataclass
class PendingExchange:
    """A dispatched layer: the workers' answers arrive in `results`; `combine` adds them."""

    like: torch.Tensor  # the hidden states dispatched: the answer's shape, dtype and device
    results: list[torch.Tensor]
    receives: list[object]
    sends: list[tuple[object, torch.Tensor]]  # send works and their buffers, alive until they complete
    client: ExpertClient | None = None


@dataclass
class ExchangeStats:
    """What the exchange did since the last look (the replica turns it into metrics)."""

    tokens_per_worker: list[int]
    tokens_per_expert: list[int]  # filled in by drain()
    dispatch_seconds: list[float] = field(default_factory=list)  # per layer: host time to queue the dispatch
    combine_seconds: list[float] = field(default_factory=list)  # per layer: host time in combine
    step_bytes: list[int] = field(default_factory=list)  # bytes sent + received, per engine step
    link_failures: int = 0  # links reset after a failure (filled in by the replica's ExpertLink)


class ExpertClient:
    """The replica's side: announce a step, dispatch each layer's tokens to the workers, combine their answers."""

    def __init__(self, link: Link, shards: list[Shard], *, device: torch.device, timeout_s: float = 10.0,
                 staging: torch.device | None = None) -> None:
        self.link, self.shards, self.device = link, shards, device
        # gloo moves CPU tensors: GPU activations go through host memory
        self.staging = staging or device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.num_experts = shards[-1].first + shards[-1].count
        # per-expert token counts, summed on the activations' device without a host sync; one tensor for the
        # client's life (a decode step captured in a CUDA graph adds into this very memory), zeroed when drained
        self._expert_counts = torch.zeros(self.num_experts, dtype=torch.int64, device=device)
        self._one = torch.ones(1, dtype=torch.int64, device=device)
        self.stats = self._fresh_stats()
        self._step_bytes = 0
        self._hidden_bytes, self._top_k, self._answer_bytes = 0, 0, 0  # of the last dispatch: a replayed step's bytes
        self._header_sends: list[tuple[object, torch.Tensor]] = []
        self._counts_copy: tuple[torch.Tensor, torch.cuda.Event] | None = None  # per-expert counts on their way
        # over NCCL nothing on the step's path waits with a timeout: a watch thread aborts a hung link
        self.watch = StepWatch(link, timeout_s) if self.staging.type == "cuda" else None

    def watch_step(self) -> None:
        """Marks the end of the step queued so far; past the timeout without reaching it, the link is aborted."""
        if self.watch is not None:
            event = torch.cuda.Event()
            event.record()
            self.watch.watch(event)

    def check(self) -> None:
        """Raises the watch's verdict, if the link was aborted."""
        if self.watch is not None and self.watch.failure is not None:
            raise ExpertsUnavailableError(self.watch.failure)

    def _fresh_stats(self) -> ExchangeStats:
        return ExchangeStats([0] * len(self.shards), [0] * self.num_experts)

    @torch.inference_mode()  # the counts were made under it (the link connects inside a step)
    def drain(self) -> ExchangeStats:
        """The stats since the last drain. Never waits for the device: a hung worker leaves the stream stuck behind
        its receive, and a blocking read here would stall the engine before the expert timeout could fail the step.
        Per-expert counts on a GPU come from a copy started at an earlier drain, once it has landed (the copy and
        the zeroing after it are queued in stream order, so no count is lost or counted twice)."""
        counts = self._expert_counts
        stats, self.stats = self.stats, self._fresh_stats()
        if not counts.is_cuda:
            stats.tokens_per_expert = [int(c) for c in counts.tolist()]
            counts.zero_()
            return stats
        copy = self._counts_copy
        if copy is not None and copy[1].query():
            stats.tokens_per_expert = [int(c) for c in copy[0].tolist()]
            self._counts_copy = copy = None
        if copy is None:  # start the copy of what was counted, and count afresh
            event = torch.cuda.Event()
            self._counts_copy = (counts.to("cpu", non_blocking=True), event)
            counts.zero_()
            event.record()
        return stats

    def record_replayed_step(self, tokens: int, layers: int) -> None:
        """Host-side stats of a step replayed from a CUDA graph (its dispatches ran on the device alone)."""
        for worker in range(len(self.shards)):
            self.stats.tokens_per_worker[worker] += tokens * layers
        per_token = self._hidden_bytes + 8 * self._top_k + self._answer_bytes  # its row and its answer, per worker
        self._step_bytes += layers * len(self.shards) * tokens * per_token

    def _ranks(self) -> range:
        return range(1, len(self.shards) + 1)

    def handshake(self) -> None:
        """A first message each way, so both communicators exist before a step needs them (NCCL sets one up
        lazily, on its first message, which would otherwise stall the first request)."""
        hello = torch.full((1,), HELLO, dtype=torch.int64, device=self.staging)
        answers = [torch.zeros_like(hello) for _ in self.shards]
        works = [self.link.dispatch.send([hello], rank, 0) for rank in self._ranks()]
        works += [self.link.combine.recv([a], rank, 0) for a, rank in zip(answers, self._ranks())]
        self._wait_all(works, "did not answer the handshake")
        if self.staging.type == "cuda":
            done = torch.cuda.Event()
            done.record()
            wait_for_event(done, self.timeout.total_seconds(), "did not answer the handshake")
        if any(int(a) != HELLO for a in answers):
            raise ExpertsUnavailableError("a MoE worker answered the handshake wrongly")

    def begin_step(self, token_counts: list[int]) -> None:
        """Tells the workers how many micro-batches the next step has and how many tokens each."""
        self.check()
        if not 0 < len(token_counts) <= MAX_MICRO_BATCHES:
            raise ValueError(f"a step has 1 to {MAX_MICRO_BATCHES} micro-batches, got {len(token_counts)}")
        if self._step_bytes:
            self.stats.step_bytes.append(self._step_bytes)
        self._step_bytes = 0
        header = torch.zeros(1 + MAX_MICRO_BATCHES, dtype=torch.int64)
        header[0] = len(token_counts)
        header[1:1 + len(token_counts)] = torch.tensor(token_counts)
        # Nothing waits for a header here: it has a channel of its own, so no layer's message can overtake it. Over
        # NCCL the sends stay listed (their buffers alive) until they complete; a worker that never takes one hangs
        # the step, which the step watch fails. Over gloo combine waits for them.
        self._header_sends = [(work, buffer) for work, buffer in self._header_sends if not work.is_completed()]
        self._header_sends += [(self._send(header, rank, self.link.control), header) for rank in self._ranks()]

    def dispatch(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> PendingExchange:
        """hidden [T, H], expert_ids/weights [T, K] -> an exchange in flight (nothing waits here)."""
        start = time.perf_counter()
        self.check()
        flat = expert_ids.flatten()
        self._expert_counts.index_add_(0, flat.long(), self._one.expand(flat.numel()))  # no host sync
        packed = pack(hidden, expert_ids, weights).to(self.staging)
        sends = [(self._send(packed, rank, self.link.dispatch), packed) for rank in self._ranks()]
        answer = answer_dtype(len(self.shards), hidden.dtype)
        results = [torch.empty(hidden.shape, dtype=answer, device=self.staging) for _ in self.shards]
        try:
            receives = [self.link.combine.recv([r], rank, 0) for r, rank in zip(results, self._ranks())]
        except Exception as e:  # noqa: BLE001 - any failure of the link is the experts', never the request's
            raise ExpertsUnavailableError(f"the MoE workers are unreachable ({type(e).__name__}: {e})") from None
        self._hidden_bytes, self._top_k = hidden.shape[1] * hidden.element_size(), expert_ids.shape[1]
        self._answer_bytes = hidden.shape[1] * answer.itemsize
        if not capturing():  # a captured step's host stats are counted at each replay (record_replayed_step)
            tokens = hidden.shape[0]
            for worker in range(len(self.shards)):
                self.stats.tokens_per_worker[worker] += tokens
            self._step_bytes += len(self.shards) * (packed.numel() + hidden.shape[0] * self._answer_bytes)
            self.stats.dispatch_seconds.append(time.perf_counter() - start)
        return PendingExchange(hidden, results, receives, sends, self)

    def combine(self, pending: PendingExchange) -> torch.Tensor:
        """The workers' answers added up: [T, H] in the dispatched dtype, on its device."""
        start = time.perf_counter()
        if self.link.backend == "gloo":  # over NCCL nothing on the step's path waits on the host
            header_sends, self._header_sends = self._header_sends, []
            self._wait_all([work for work, _ in header_sends], HEADER_NOT_TAKEN, on_host=True)
        self._wait_all(pending.receives + [work for work, _ in pending.sends], "did not answer")
        self.check()
        like = pending.like
        if len(pending.results) == 1:  # one worker: its answer as it is
            out = pending.results[0].to(like.device, like.dtype)
        else:  # float32 shares, added up the kernel's tree and rounded once: colocated experts' output exactly
            out = add_as_groups([r.to(like.device, torch.float32) for r in pending.results]).to(like.dtype)
        if not capturing():
            self.stats.combine_seconds.append(time.perf_counter() - start)
        return out

    def abort(self) -> None:
        """Ends the link at once (its communicators are aborted, not waited on)."""
        if self.watch is not None:
            self.watch.close()
        self.link.abort()

    def close(self) -> None:
        """Tells the workers this link ends (best effort: they may be gone)."""
        if self.watch is not None:
            self.watch.close()
        try:
            header = torch.zeros(1 + MAX_MICRO_BATCHES, dtype=torch.int64)
            header[0] = STOP
            self._wait_all([self._send(header, rank, self.link.control) for rank in self._ranks()], HEADER_NOT_TAKEN,
                           on_host=True)
        except ExpertsUnavailableError:
            pass

    def _send(self, tensor: torch.Tensor, rank: int, group):
        try:
            return group.send([tensor], rank, 0)
        except Exception as e:  # noqa: BLE001 - any failure of the link is the experts', never the request's
            raise ExpertsUnavailableError(f"MoE worker {rank - 1} is unreachable ({type(e).__name__}: {e})") from None

    def _wait_all(self, works: list, what: str, *, on_host: bool = False) -> None:
        """gloo (the link's, or on_host: the header group's): blocks the host, up to the timeout. NCCL: makes the
        current stream wait (no host wait)."""
        try:
            for work in works:
                if on_host or self.link.backend == "gloo":
                    work.wait(self.timeout)
                else:
                    work.wait()
        except Exception as e:  # noqa: BLE001
            raise ExpertsUnavailableError(
                f"a MoE worker {what} within {self.timeout.total_seconds():.0f} s ({type(e).__name__}: {e})") from None


def capturing() -> bool:
    """Whether this thread is capturing a CUDA graph (host-side bookkeeping would run once, not per replay)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def wait_for_event(event, timeout_s: float, what: str) -> None:
    """Waits on the host for a CUDA event, up to timeout_s (a hung NCCL peer would block synchronize() forever)."""
    deadline = time.monotonic() + timeout_s
    while not event.query():
        if time.monotonic() > deadline:
            raise ExpertsUnavailableError(f"a MoE worker {what} within {timeout_s:.0f} s")
        time.sleep(20e-6)

