"""The MoE worker's side of the exchange for one replica: each step's layers received, run through the worker's
experts and answered, with a step replayed from a CUDA graph once its shape comes again.

A worker's step is a loop over layers and micro-batches (receive the tokens, unpack them, run the shard's experts,
send the answer): some fifteen kernel launches a layer. Launched one by one from Python they, not the GPU, set the
pace of a small step, and the replica (whose decode step is a graph already, see decode_graphs.py) waits on them
at every layer. So over NCCL, once a step shape (each micro-batch's token count) has run eagerly, which compiles
its kernels, its second coming is captured and every later one replays the graph: the replica's decode steps come
in a few bucketed shapes. Steps of many tokens stay eager: their kernels, not their launches, take the time.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch

from gptoss_serve.cluster.expert_parallel.exchange import (MAX_MICRO_BATCHES, STOP, Link, answer_dtype, row_bytes,
                                                  unpack)

logger = logging.getLogger(__name__)

MAX_GRAPH_TOKENS = 512  # the most tokens a step may have to be captured (every decode bucket by default)
MAX_GRAPHS = 64  # per link: prefill chunks of a repeated length get graphs too, up to this many
# Over NCCL a worker's links queue their steps one at a time (queueing never waits for a peer there), so that no
# capture overlaps another link's launches: without this, two replicas stepping at once through one worker hung a
# step in 1 of 3 runs of tests/test_shared_worker.py on 2 H200s (and 120b's 2 + 2 split once, at its first decode
# steps under load); with it, 3 of 3 passed.
_launch_lock = threading.Lock()
_capture_failed = False  # a capture that failed once in this process would fail again: every link stays eager


class WorkerSteps:
    """Runs a replica's steps on this worker: eagerly, or from the CUDA graph captured for the step's shape."""

    def __init__(self, link: Link, experts: list, *, hidden_size: int, top_k: int, device: torch.device,
                 staging: torch.device, graphs: bool = True) -> None:
        """experts[layer]: the worker's shard of that layer (model/experts.py's ExpertShard). staging: where the
        link's tensors live (the GPU over NCCL, the host over gloo)."""
        self.link, self.experts, self.device, self.staging = link, experts, device, staging
        self.hidden_size, self.top_k = hidden_size, top_k
        self.dtype = experts[0].dtype
        self.workers = link.dispatch.size() - 1
        self.answer = answer_dtype(self.workers, self.dtype)
        self.graphs_wanted = (graphs and link.backend == "nccl" and staging.type == "cuda"
                              and experts[0].never_waits_for_host(self.dtype))
        self.seen: set[tuple[int, ...]] = set()  # shapes that may be captured, run eagerly once (kernels compiled)
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, list]] = {}  # graph and its buffers
        self._pool = None  # one memory pool for the link's graphs: they replay one at a time, on one stream

    def run(self, sizes: tuple[int, ...]) -> None:
        """Queues one step of micro-batches of these token counts (waits on the host only over gloo)."""
        with _launch_lock if self.graphs_wanted else contextlib.nullcontext():
            if sizes in self.graphs:
                self.graphs[sizes][0].replay()
            elif self._should_capture(sizes):
                self._capture(sizes).replay()
            else:
                self._queue(self._buffers(sizes))
                if self._may_capture(sizes):  # only these: a long-lived worker sees countless prefill shapes
                    self.seen.add(sizes)

    def _may_capture(self, sizes: tuple[int, ...]) -> bool:
        return (self.graphs_wanted and not _capture_failed and sum(sizes) <= MAX_GRAPH_TOKENS
                and len(self.graphs) < MAX_GRAPHS)

    def _should_capture(self, sizes: tuple[int, ...]) -> bool:
        return sizes in self.seen and self._may_capture(sizes)

    def _buffers(self, sizes: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each micro-batch's receive buffer and answer, reused by every layer of the step."""
        width = row_bytes(self.hidden_size, self.top_k, self.dtype)
        return [(torch.empty(tokens, width, dtype=torch.uint8, device=self.staging),
                 torch.empty(tokens, self.hidden_size, dtype=self.answer, device=self.staging)) for tokens in sizes]

    def _queue(self, buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The step's layers, in stream order over NCCL (a receive's wait is a stream wait) and on the host over
        gloo. A micro-batch's answer buffer is written only once its previous layer's send has gone (the replica
        needs that answer before it sends the next layer, so this wait never delays anything)."""
        sends: list[object | None] = [None] * len(buffers)
        for shard in self.experts:
            for i, (received, answer) in enumerate(buffers):
                self.link.dispatch.recv([received], 0, 0).wait()
                x, ids, w = (t.to(self.device) for t in unpack(received, self.hidden_size, self.top_k, self.dtype))
                with torch.inference_mode():
                    # one worker: the layer's output; several: an unrounded share each (see answer_dtype)
                    y = shard(x, ids.long(), w) if self.workers == 1 else shard.partial(x, ids.long(), w)
                if sends[i] is not None:
                    sends[i].wait()
                answer.copy_(y)
                sends[i] = self.link.combine.send([answer], 0, 0)
        for send in sends:
            send.wait()

    def _capture(self, sizes: tuple[int, ...]) -> torch.cuda.CUDAGraph:
        """The step captured on this link's stream (nothing runs until it is replayed). capture_begin, not
        torch.cuda.graph: that synchronizes the whole device first, which would wait on another replica's link
        stuck in a receive."""
        global _capture_failed
        buffers = self._buffers(sizes)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # thread-local: NCCL's and the step watch's threads go on querying events meanwhile
        graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
        try:
            self._queue(buffers)
        except BaseException:
            _capture_failed = True
            logger.exception("capturing a step of %s tokens failed; this worker's steps stay eager", sizes)
            raise
        finally:
            graph.capture_end()
        self.graphs[sizes] = (graph, buffers)  # the graph reads and writes these buffers at every replay
        return graph

    def release(self) -> None:
        """Destroys the graphs (a graph still running is freed when it completes). NCCL holds a communicator that a
        graph captured until the graph is gone: with the graphs left to the interpreter's exit, the GPU test's worker
        process never exited."""
        for graph, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()


def serve_replica(link: Link, experts: list, *, hidden_size: int, top_k: int, device: torch.device,
                  staging: torch.device | None = None, graphs: bool = True) -> list[tuple[int, ...]]:
    """The worker's side, for one replica: answer step after step until the link stops (-> the step shapes it
    replayed from CUDA graphs, sorted) or breaks (raises).

    experts[layer] computes (hidden [n, H], expert_ids [n, K], weights [n, K]) -> [n, H] for the local shard, in
    the shard's dtype (ExpertShard.dtype), ignoring ids outside it. The header read (on the host, gloo) is this loop's
    one host wait a step; everything else is queued in stream order. graphs: replay repeated step shapes from CUDA
    graphs where the link and the experts allow it (NCCL, experts that never wait for the host).
    """
    staging = staging or device
    # a stream of the link's own: a link whose replica hung or died blocks only it (and graphs need one)
    with torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else contextlib.nullcontext():
        hello = torch.zeros(1, dtype=torch.int64, device=staging)
        link.dispatch.recv([hello], 0, 0).wait()
        link.combine.send([hello], 0, 0).wait()
        steps = WorkerSteps(link, experts, hidden_size=hidden_size, top_k=top_k, device=device, staging=staging,
                            graphs=graphs)
        header = torch.empty(1 + MAX_MICRO_BATCHES, dtype=torch.int64)
        try:
            while True:
                link.control.recv([header], 0, 0).wait()  # on the host: an idle replica leaves nothing on the GPU
                count, *sizes = header.tolist()
                if count == STOP:
                    return sorted(steps.graphs)
                steps.run(tuple(sizes[:count]))
        finally:
            steps.release()  # before the link's groups go (see release)
