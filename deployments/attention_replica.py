"""AttentionReplica: one inference engine, fed batches of requests by the Router.

A batch is one streaming handle call: the replica first yields its own replica id (so the Router can aim an
abort at it), then lists of StreamItems, each step's outputs of the whole batch together, until every request
of the batch has finished. Requests of one batch still finish, fail and abort one by one.
"""

from __future__ import annotations

import asyncio
import time

import torch

from gptoss_serve.cluster.async_engine import AsyncEngine, EngineDeadError
from gptoss_serve.cluster.engine import LLMEngine, RequestOutput
from gptoss_serve.cluster.remote_experts import ExpertLink, RemoteExperts
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.expert_pool import worker_name
from gptoss_serve.deployments.messages import EngineRequest, StreamItem
from gptoss_serve.deployments.metrics import ExpertMetrics, ReplicaMetrics
from gptoss_serve.deployments.replica_context import current_app_name, current_replica_id
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer

STATS_PERIOD_S = 1.0


def build_engine(args: AppArgs, *, expert_workers: list | None = None) -> tuple[LLMEngine, ExpertLink | None]:
    """Colocated experts, or (given MoE worker actors) RemoteExperts on every layer, and their link."""
    device = args.resolved_device
    factory, micro_batches, link = None, 1, None
    if expert_workers:
        link = ExpertLink(expert_workers, backend=args.resolved_transport, device=torch.device(device),
                          timeout_s=args.expert_timeout_s)
        factory, micro_batches = (lambda layer: RemoteExperts(layer, link)), args.micro_batches
    model = load_model(args.resolved_model_dir(), device=device, dtype=args.torch_dtype, experts_factory=factory)
    return LLMEngine(model, load_tokenizer(), args.engine, micro_batches=micro_batches), link


def find_expert_workers(args: AppArgs, *, timeout_s: float = 600) -> list:
    """The ExpertPool's workers, by name (the pool may still be creating them)."""
    import ray

    names = [worker_name(current_app_name(), i) for i in range(args.num_moe_workers)]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return [ray.get_actor(name) for name in names]
        except ValueError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"MoE workers {names} did not appear within {timeout_s:.0f} s") from None
            time.sleep(1)


class AttentionReplica:
    def __init__(self, args: AppArgs, *, expert_pool=None) -> None:
        """expert_pool: the ExpertPool deployment (bound so that Serve starts it first), or None: colocated."""
        self.args = args
        self.replica_id = current_replica_id()
        workers = find_expert_workers(args) if args.num_moe_workers else None
        engine, self.expert_link = build_engine(args, expert_workers=workers)
        self.engine = AsyncEngine(engine)
        self.metrics = ReplicaMetrics(model=args.served_model_name, replica=self.replica_id)
        self.expert_metrics = ExpertMetrics(model=args.served_model_name, replica=self.replica_id) \
            if self.expert_link is not None else None
        self.tasks: dict[str, asyncio.Task] = {}
        self.stats: dict[str, float | str] = self._read_stats(self.engine.engine)
        self._prefix_seen = (0, 0)
        self._stats_task: asyncio.Task | None = None

    # ---- the Router's calls ---------------------------------------------------------------------------------
    async def generate_batch(self, requests: list[EngineRequest], *, target_replica: str | None = None):
        """Streams this replica's id, then lists of StreamItems until every request has ended."""
        self._ensure_stats_task()
        items: asyncio.Queue[StreamItem | None] = asyncio.Queue()
        for request in requests:
            self.tasks[request.request_id] = asyncio.create_task(self._pump(request, items))
        remaining = len(requests)
        try:
            yield self.replica_id
            while remaining:
                batch = [await items.get()]
                while not items.empty():
                    batch.append(items.get_nowait())
                remaining -= batch.count(None)
                if out := [item for item in batch if item is not None]:
                    yield out
        finally:  # the Router went away: nothing of this batch may keep running
            for request in requests:
                task = self.tasks.pop(request.request_id, None)
                if task is not None:
                    task.cancel()

    async def abort(self, request_ids: list[str], *, target_replica: str | None = None) -> None:
        """Stops requests (their clients left); their blocks are freed."""
        for request_id in request_ids:
            task = self.tasks.pop(request_id, None)
            if task is not None:
                task.cancel()

    def record_routing_stats(self) -> dict:
        """Serve hands these to the request router, which places batches on the replica with the most room."""
        return dict(self.stats)

    def check_health(self) -> None:
        if self.engine.error is not None:
            raise RuntimeError(f"engine stopped: {self.engine.error!r}")

    # ---- inside -----------------------------------------------------------------------------------------------
    async def _pump(self, request: EngineRequest, items: asyncio.Queue) -> None:
        last = None
        try:
            async for out in self.engine.generate(request.request_id, request.prompt_token_ids, request.params):
                if out.error is not None:  # the step failed (a MoE worker was lost): this request ends
                    items.put_nowait(StreamItem(request.request_id, error=out.error, status=503))
                    break
                last = self._observe(request, out, last)
                items.put_nowait(StreamItem(request.request_id, output=out))
        except ValueError as e:
            items.put_nowait(StreamItem(request.request_id, error=str(e), status=400))
        except EngineDeadError as e:
            items.put_nowait(StreamItem(request.request_id, error=str(e), status=503))
        except asyncio.CancelledError:
            pass
        except Exception as e:  # noqa: BLE001 - a request's failure must not end its batch
            items.put_nowait(StreamItem(request.request_id, error=f"{type(e).__name__}: {e}", status=500))
        finally:
            self.tasks.pop(request.request_id, None)
            items.put_nowait(None)

    def _observe(self, request: EngineRequest, out: RequestOutput, last: float | None) -> float:
        now, m, tags = time.time(), self.metrics, self.metrics.tags
        if last is None:
            m.ttft.observe(now - request.arrival_time, tags=tags)
        else:
            m.itl.observe(now - last, tags=tags)
        m.generation_tokens.inc(len(out.new_token_ids), tags=tags)
        if out.finished:
            m.prompt_tokens.inc(out.num_prompt_tokens, tags=tags)
            m.e2e.observe(now - request.arrival_time, tags=tags)
            m.requests.inc(1, tags={**tags, "finish_reason": out.finish_reason or "unknown"})
        return now

    def _ensure_stats_task(self) -> None:
        if self._stats_task is None or self._stats_task.done():
            self._stats_task = asyncio.get_running_loop().create_task(self._refresh_stats())

    async def _refresh_stats(self) -> None:
        while True:
            stats = await self.engine.call(self._read_stats)
            self.stats = stats
            m, tags = self.metrics, self.metrics.tags
            m.running.set(stats["running"], tags=tags)
            m.waiting.set(stats["waiting"], tags=tags)
            m.kv_usage.set(stats["kv_usage"], tags=tags)
            # the engine keeps running totals; the counters get what was added since the last look
            queries, hits = stats["prefix_queries"], stats["prefix_hits"]
            if queries > self._prefix_seen[0]:
                m.prefix_queries.inc(queries - self._prefix_seen[0], tags=tags)
            if hits > self._prefix_seen[1]:
                m.prefix_hits.inc(hits - self._prefix_seen[1], tags=tags)
            self._prefix_seen = (queries, hits)
            if self.expert_link is not None:
                exchange = await self.engine.call(lambda engine: self.expert_link.drain_stats())
                if exchange is not None:
                    self.expert_metrics.record(exchange)
            await asyncio.sleep(STATS_PERIOD_S)

    def _read_stats(self, engine: LLMEngine) -> dict:
        return {"replica_id": self.replica_id, "free_blocks": engine.num_free_blocks, "num_blocks": engine.num_blocks,
                "running": engine.num_running, "waiting": engine.num_waiting, "kv_usage": engine.blocks.usage,
                "prefix_queries": engine.scheduler.prefix_queries, "prefix_hits": engine.scheduler.prefix_hits,
                "max_model_len": engine.max_model_len, "time": time.time()}
