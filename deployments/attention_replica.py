"""AttentionReplica: one engine core process, fed batches of requests by the BatchingRouter.

A batch is one streaming handle call: the replica first yields its own replica id (so the router can aim an
abort at it), then lists of StreamItems, one list per engine step for the whole batch, until every request of
the batch has ended. The engine steps in its own process (cluster/engine_core.py), so this process's event
loop only splits each step's outputs among the calls and records metrics once per step.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable

import torch

from gptoss_serve.cluster.output_processor import TextStreams
from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_core import Built
from gptoss_serve.cluster.engine_core_client import EngineCoreClient
from gptoss_serve.cluster.engine_protocol import (EngineRequest, EngineStats, RequestOutput, RequestTimes, RoutingLoad,
                                                  StreamItem)
from gptoss_serve.cluster.grammar import ll_tokenizer
from gptoss_serve.cluster.expert_parallel.remote_experts import ExpertLink, RemoteExperts
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.expert_pool import wait_for_placement, worker_name
from gptoss_serve.deployments.metrics import ExpertMetrics, ReplicaMetrics
from gptoss_serve.deployments.replica_context import current_app_name, current_replica_id
from gptoss_serve.deployments.request_stream import RequestStream, abort_where_they_are
from gptoss_serve.deployments.resources import cluster_view, moe_workers_shortfall
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer

STATS_PERIOD_S = 1.0
UNPLACED = ("the MoE expert workers could not be placed: the cluster lacks the resources they ask for (the server "
            "log says which); retry later")
STARTING = "the engine is starting; retry shortly"
logger = logging.getLogger("ray.serve")  # Serve shows its replicas' records in `serve run`'s console


def build_engine(args: AppArgs, *, expert_workers: list | None = None, link_name: str | None = None,
                 find_workers: Callable[[], list] | None = None) -> Built:
    """Colocated experts, or (given MoE worker actors) RemoteExperts on every layer; with them, the
    exchange's stats. link_name: the replica's name to the workers, the same for each engine core it starts (a
    worker ends a replica's old link when it reconnects, also after its core was replaced)."""
    device = args.resolved_device
    factory, micro_batches, link = None, 1, None
    if expert_workers:
        link = ExpertLink(expert_workers, backend=args.resolved_transport, device=torch.device(device),
                          timeout_s=args.expert_timeout_s, name=link_name, find_workers=find_workers)
        factory, micro_batches = (lambda layer: RemoteExperts(layer, link)), args.micro_batches
    model = load_model(args.resolved_model_dir(), device=device, dtype=args.torch_dtype, experts_factory=factory,
                       dequantize_experts=args.dequantize_experts, bf16_expert_copy=args.bf16_expert_copy,
                       load_format=args.load_format)
    # text and stop strings are decoded beside the core, by the replica (see AttentionReplica._on_step)
    engine = LLMEngine(model, load_tokenizer(), args.engine, micro_batches=micro_batches, detokenize=False)
    # llguidance's view of the vocabulary (about 1 s, 140 MB) now, not when the first request with a structured output
    # arrives and every running request would wait for it
    ll_tokenizer(engine.tokenizer)
    return engine, (link.drain_stats if link is not None else None)


def build_engine_core(args: AppArgs, *, app_name: str, ray_address: str | None, namespace: str | None,
                      replica_id: str | None = None) -> Built:
    """Runs in the engine core process. With MoE workers it joins the Ray cluster to reach them by name."""
    workers = None
    if args.num_moe_workers:
        import ray

        ray.init(address=ray_address, namespace=namespace, log_to_driver=False, configure_logging=False)
        workers = find_expert_workers(args, app_name=app_name)
    return build_engine(args, expert_workers=workers,
                        link_name=f"{app_name}/{replica_id}" if replica_id is not None else None,
                        find_workers=lambda: find_expert_workers(args, app_name=app_name, timeout_s=0))


def find_expert_workers(args: AppArgs, *, app_name: str, timeout_s: float = 600) -> list:
    """The ExpertPool's workers, by name (the pool may still be creating them)."""
    import ray

    names = [worker_name(app_name, i) for i in range(args.num_moe_workers)]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return [ray.get_actor(name) for name in names]
        except ValueError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"MoE workers {names} did not appear within {timeout_s:.0f} s") from None
            time.sleep(1)


def engine_totals(stats: EngineStats) -> tuple[int, ...]:
    """The running totals an engine core reports, in the order _add_engine_totals counts them."""
    return stats.prefix_queries, stats.prefix_hits, stats.num_preemptions, stats.kernel_compiles


def rss_bytes(pid: int) -> int:
    """Resident memory of a process on this node (Linux /proc; 0 where there is none)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _ray_location() -> tuple[str | None, str | None]:
    """(GCS address, namespace) of the Ray job this process belongs to; (None, None) outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            return context.gcs_address, context.namespace
    except Exception:  # noqa: BLE001 - not in Ray
        pass
    return None, None


class AttentionReplica:
    def __init__(self, args: AppArgs, *, expert_pool=None, build: Callable[[], Built] | None = None) -> None:
        """expert_pool: the ExpertPool deployment (bound so that Serve starts it first), or None: colocated.
        build: how the engine core makes its engine (picklable); by default from `args` (tests inject one)."""
        self.args = args
        self.replica_id = current_replica_id()
        app_name = current_app_name()
        if build is None:
            address, namespace = _ray_location()
            build = functools.partial(build_engine_core, args, app_name=app_name, ray_address=address,
                                      namespace=namespace, replica_id=self.replica_id)
        self.texts = TextStreams(load_tokenizer())  # for outputs the core left undecoded
        self.metrics = ReplicaMetrics(model=args.served_model_name, replica=self.replica_id)
        self.expert_metrics = ExpertMetrics(model=args.served_model_name, replica=self.replica_id) \
            if args.num_moe_workers else None
        self.calls: dict[str, RequestStream] = {}  # request id -> the batch call it came in
        self.arrivals: dict[str, float] = {}  # request id -> when the ingress received it (for latencies)
        # request id -> its times as its first token's output carried them, kept until it ends: an output that the
        # engine did not end (a stop string found here, a failed step) carries none
        self.first_token_times: dict[str, RequestTimes] = {}
        self.core: EngineCoreClient | None = None  # None until the engine core has started
        self.unavailable: str | None = None  # while there is no core: what requests are told (503)
        self.start_error: str | None = None  # why a core started in the background could not start
        self._totals_seen = engine_totals(EngineStats())  # the running totals the counters have (_add_engine_totals)
        self._deaths_seen: dict[str, int] = {}  # engine core deaths already counted, by reason
        self.stats = EngineStats(time=time.time())
        self._last_step = time.time()
        self._next_stats = 0.0
        if args.num_moe_workers and not wait_for_placement(app_name):
            # the core would wait for workers that have no place: serve 503s at once instead, start it once placed
            self.unavailable = UNPLACED
            total, largest_node, free = cluster_view()
            logger.error("the MoE workers have no place in the cluster (%s); answering every request with 503 until "
                         "they have", moe_workers_shortfall(args, total=total, largest_node=largest_node, free=free))
            threading.Thread(target=self._start_core_once_placed, args=(build, app_name), name="engine-core-start",
                             daemon=True).start()
        else:
            self._start_core(build)

    def _start_core(self, build: Callable[[], Built]) -> None:
        core = EngineCoreClient(build, on_step=self._on_step, on_failure=self._on_failure)
        stats = self.stats = core.stats
        self._totals_seen = engine_totals(stats)
        self.core = core
        logger.info("engine ready on %s: weights %.2f GB, KV cache %.2f GB of %s (%d blocks, %d tokens), "
                    "max_model_len %d", self.args.resolved_device, stats.weights_bytes / 1e9,
                    stats.kv_cache_bytes / 1e9, stats.kv_cache_dtype, stats.num_blocks,
                    stats.num_blocks * stats.block_size, stats.max_model_len)

    def _start_core_once_placed(self, build: Callable[[], Built], app_name: str) -> None:
        while not wait_for_placement(app_name):
            pass  # each call waits a while; a cluster may get room at any time (nodes join)
        logger.info("the MoE workers are placed; starting the engine core")
        self.unavailable = STARTING
        try:
            self._start_core(build)
        except Exception as e:  # noqa: BLE001 - check_health reports it and Serve replaces this replica
            self.unavailable = f"the engine could not start ({type(e).__name__})"
            self.start_error = f"{type(e).__name__}: {e}"
            return
        self.unavailable = None

    # ---- the router's calls ---------------------------------------------------------------------------------
    async def generate_batch(self, requests: list[EngineRequest], *, target_replica: str | None = None):
        """Streams this replica's id, then lists of StreamItems until every request has ended."""
        if self.core is None:  # nothing can run: every request is told why at once
            yield self.replica_id
            yield [StreamItem(r.request_id, error=self.unavailable or STARTING, status=503) for r in requests]
            return
        ids = [r.request_id for r in requests]
        stream = RequestStream(ids, abort=self._abort_in_core)
        admitted, refused = self._admit(requests)
        for request in requests:
            self.calls[request.request_id] = stream
            self.arrivals[request.request_id] = request.arrival_time
        stream.put([StreamItem(r.request_id, error="the engine's queue is full; retry shortly", status=429)
                    for r in refused])
        for request in admitted:
            self.texts.add(request.request_id, request.params)
        if admitted:
            self.core.add(admitted)
        try:
            yield self.replica_id
            async for items in stream.steps():
                yield items
        finally:  # the router went away (or every request ended): nothing of this batch may keep running
            stream.close()
            for request_id in ids:
                self._forget(request_id)

    async def abort(self, request_ids: list[str], *, target_replica: str | None = None) -> None:
        """Stops requests (their clients left); their blocks are freed within a step."""
        for request_id in abort_where_they_are(self.calls, request_ids):
            self._forget(request_id)

    def record_routing_stats(self) -> dict:
        """Serve hands these to the request router, which places batches on the replica with the most room. Serve asks
        every ROUTING_STATS_PERIOD_S (builder.py) whatever the traffic, so the load gauges are set here too: an idle
        engine sends no steps, and a gauge nobody sets drops out of the metrics (an alert on running == 0 would
        find no series)."""
        self._set_gauges(self.stats)
        return RoutingLoad.of_engine(self.stats).as_stats()

    def describe(self, *, target_replica: str | None = None) -> dict:
        """This replica's process ids, memory and engine load, for operators, soak runs and fault tests
        (target_replica: which replica answers, see MostRoomRouter)."""
        core_pid = self.core.process.pid if self.core is not None else None
        stats = self.stats
        in_use = stats.num_blocks - 1 - stats.free_blocks if self.core is not None else 0
        return {"replica_id": self.replica_id, "pid": os.getpid(), "rss_bytes": rss_bytes(os.getpid()),
                "core_pid": core_pid, "core_rss_bytes": rss_bytes(core_pid) if core_pid else 0,
                "running": stats.running, "waiting": stats.waiting, "kv_blocks_in_use": in_use,
                "num_blocks": stats.num_blocks, "unavailable": self.unavailable}

    def check_health(self) -> None:
        """Healthy while a replacement core starts (its requests get 503 meanwhile); not once that failed. Healthy
        too while the MoE workers have no place (the ExpertPool reports that): a replica restarted for it would
        serve nothing while it starts, not even the 503s that say why."""
        if self.core is None:
            if self.start_error is not None:
                raise RuntimeError(f"the engine core could not start: {self.start_error}")
            return
        if not self.core.alive and not self.core.restarting:
            raise RuntimeError(f"the engine core is down: {self.core.error}")

    # ---- inside -----------------------------------------------------------------------------------------------
    def _admit(self, requests: list[EngineRequest]) -> tuple[list[EngineRequest], list[EngineRequest]]:
        """Requests beyond the engine's queue limit are refused (429) before latency grows without bound: the
        engine runs up to max_num_seqs requests and may hold max_waiting_per_replica more."""
        room = max(0, self.args.engine.max_num_seqs + self.args.max_waiting_per_replica - len(self.core.open))
        return requests[:room], requests[room:]

    def _on_step(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        """One engine step: text decoded, metrics recorded once, outputs split among the calls. Outputs of requests
        already over here (a stop string found beside the core, a client gone) come from steps launched before the
        core heard of it: they are dropped, not counted a second time."""
        outputs = [self._decode(out) for out in outputs if out.request_id in self.calls]
        self._record(outputs, stats)
        by_call: dict[int, tuple[RequestStream, list[StreamItem]]] = {}
        for out in outputs:
            stream = self.calls.get(out.request_id)
            if stream is None:
                continue
            if out.error is not None:  # the step failed (a MoE worker was lost) or its grammar did: this request ends
                item = StreamItem(out.request_id, error=out.error, status=out.error_status)
            else:
                item = StreamItem(out.request_id, output=out)
            by_call.setdefault(id(stream), (stream, []))[1].append(item)
            if item.is_last:
                self._forget(out.request_id)
        for stream, items in by_call.values():
            stream.put(items)

    def _decode(self, out: RequestOutput) -> RequestOutput:
        if out.new_text is not None:  # the engine decoded it already
            return out
        decoded = self.texts.process(out)
        if decoded.finished and not out.finished:  # a stop string: the engine stops it too
            self.core.abort([out.request_id])
        return decoded

    def _abort_in_core(self, request_ids: list[str]) -> None:
        """Stops requests whose clients left; they count as finished with reason "abort"."""
        if self.core is None:
            return
        if aborted := sum(request_id in self.core.open for request_id in request_ids):
            self.metrics.requests.inc(aborted, tags={**self.metrics.tags, "finished_reason": "abort"})
        self.core.abort(request_ids)

    def _forget(self, request_id: str) -> None:
        """A request is over here (finished, failed or aborted): its call, arrival time and text go."""
        self.calls.pop(request_id, None)
        self.arrivals.pop(request_id, None)
        self.first_token_times.pop(request_id, None)
        self.texts.remove(request_id)

    def _on_failure(self, request_id: str, message: str, status: int) -> None:
        stream = self.calls.get(request_id)
        self._forget(request_id)
        if stream is not None:
            stream.put([StreamItem(request_id, error=message, status=status)])

    def _set_gauges(self, stats: EngineStats) -> None:
        """The engine's load now: at most once a STATS_PERIOD_S from steps, and on every routing-stats request."""
        m, tags = self.metrics, self.metrics.tags
        m.running.set(stats.running, tags=tags)
        m.waiting.set(stats.waiting, tags=tags)
        m.kv_usage.set(stats.kv_usage, tags=tags)

    def _add_engine_totals(self, stats: EngineStats) -> None:
        """The engine keeps running totals (prefix cache lookups and hits, preemptions, kernel compiles); their
        counters get what was added since the last look."""
        m, totals = self.metrics, engine_totals(stats)
        if any(total < seen for total, seen in zip(totals, self._totals_seen)):  # a new engine core counts from 0
            self._totals_seen = (0,) * len(totals)
        counters = (m.prefix_queries, m.prefix_hits, m.preemptions, m.kernel_compiles)
        for counter, total, seen in zip(counters, totals, self._totals_seen):
            if total > seen:  # Ray's counters refuse an increment of 0
                counter.inc(total - seen, tags=m.tags)
        self._totals_seen = totals

    def _record(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        now, m, tags = time.time(), self.metrics, self.metrics.tags
        if new_tokens := sum(len(o.new_token_ids) for o in outputs):
            m.generation_tokens.inc(new_tokens, tags=tags)
            m.itl.observe(now - self._last_step, tags=tags)  # one gap a step: every request in it waited as long
        self._last_step = now
        if stats.step_tokens:  # (stats sent without a step, after aborts, have none)
            m.step_tokens.observe(stats.step_tokens, tags=tags)
        for out in outputs:
            if out.num_output_tokens == 1 or out.finished:  # once or twice a request, never per token
                arrival = self.arrivals.get(out.request_id)
                if out.num_output_tokens == 1 and arrival is not None:
                    m.ttft.observe(now - arrival, tags=tags)
                if out.finished:
                    if arrival is not None:
                        m.e2e.observe(now - arrival, tags=tags)
                    m.prompt_tokens.inc(out.num_prompt_tokens, tags=tags)
                    m.requests.inc(1, tags={**tags, "finished_reason": out.finish_reason or "unknown"})
                    m.record_finished(out, out.times or self.first_token_times.get(out.request_id),
                                      step_time=stats.time)
                elif out.times is not None:
                    self.first_token_times[out.request_id] = out.times
        self.stats = stats
        if now >= self._next_stats or stats.idle:  # an idle engine sends no more steps: its gauges must say 0 now
            self._next_stats = now + STATS_PERIOD_S
            self._set_gauges(stats)
            self._add_engine_totals(stats)
        if stats.extra is not None and self.expert_metrics is not None:
            self.expert_metrics.record(stats.extra)
        for reason, count in (self.core.deaths if self.core is not None else {}).items():  # the client keeps totals: the counter gets what was added
            if count > self._deaths_seen.get(reason, 0):
                m.engine_core_restarts.inc(count - self._deaths_seen.get(reason, 0), tags={**tags, "reason": reason})
                self._deaths_seen[reason] = count

