"""ExpertPool: owns the N MoEWorker actors (one placement group), keeps them healthy, names them to replicas.

Workers are plain Ray actors, restarted by Ray when they die (each reloads its own shard); one that stops
answering pings is killed so that Ray restarts it. Attention replicas find them by name.

A placement group the cluster cannot hold (more CPUs or GPUs than it has) would stay pending for ever, with every
request waiting on it. So the pool waits a short while, then logs which resources are missing and reports itself
unhealthy, and keeps waiting in the background (nodes may still join); attention replicas read the group's state
and answer 503 at once meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gptoss_serve.cluster.expert_parallel.exchange import NCCL_ENV
from gptoss_serve.cluster.expert_parallel.moe_worker import MoEWorker
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.replica_context import current_app_name
from gptoss_serve.deployments.resources import cluster_view, moe_worker_bundle, moe_workers_shortfall

PING_PERIOD_S = 2.0
PING_TIMEOUT_S = 10.0
PLACEMENT_WAIT_S = 10.0  # how long the workers' placement group may stay pending before it counts as unplaced
STARTUP_TIMEOUT_S = 600.0  # loading a shard of a large checkpoint
logger = logging.getLogger("ray.serve")


def worker_name(app: str, index: int) -> str:
    return f"gptoss-moe-worker:{app}:{index}"


def placement_group_prefix(app: str) -> str:
    # each pool instance adds its own suffix: a restarted pool's group may be created before its old one is gone
    return f"gptoss-moe-workers:{app}:"


def placement_state(app: str) -> str | None:
    """The state of the app's MoE-worker placement group ("CREATED", "PENDING", "RESCHEDULING"); None while
    there is none (the pool is starting or restarting)."""
    prefix = placement_group_prefix(app)
    states = {group["state"] for group in placement_group_table().values()
              if group.get("name", "").startswith(prefix) and group["state"] != "REMOVED"}
    for state in ("CREATED", "RESCHEDULING", "PENDING"):  # a live group wins over one being replaced
        if state in states:
            return state
    return None


def wait_for_placement(app: str, *, pending_for_s: float = PLACEMENT_WAIT_S,
                       timeout_s: float = STARTUP_TIMEOUT_S) -> bool:
    """True once the workers' placement group is placed; False once it has been seen pending for
    `pending_for_s` (or no group appeared within `timeout_s`)."""
    start = time.monotonic()
    pending_since = None
    while True:
        state, now = placement_state(app), time.monotonic()
        if state in ("CREATED", "RESCHEDULING"):  # rescheduling: placed once, Ray restarts what a lost node held
            return True
        pending_since = (pending_since or now) if state == "PENDING" else None
        if (pending_since is not None and now - pending_since >= pending_for_s) or now - start >= timeout_s:
            return False
        time.sleep(0.5)


class ExpertPool:
    def __init__(self, args: AppArgs) -> None:
        self.args, self.app_name = args, current_app_name()
        # a hub id is resolved by each worker on its own node; the default model is written here
        self.checkpoint = args.resolved_model or str(args.resolved_model_dir())
        self.bundle = moe_worker_bundle(args)
        self.placement = placement_group([self.bundle] * args.num_moe_workers, strategy="PACK",
                                         name=placement_group_prefix(self.app_name) + uuid.uuid4().hex[:8])
        self.workers: list = []
        self.unavailable: str | None = None  # why the workers cannot serve (no place yet); None once they can
        self._startup_checked = False
        self._health: asyncio.Task | None = None
        if self.placement.wait(PLACEMENT_WAIT_S):
            self._create_workers()
            return
        total, largest_node, free = cluster_view()
        self.unavailable = (f"the MoE workers could not be placed within {PLACEMENT_WAIT_S:.0f} s: "
                         + moe_workers_shortfall(args, total=total, largest_node=largest_node, free=free))
        logger.error("%s. They stay pending until the cluster has room; requests get 503 meanwhile.", self.unavailable)
        threading.Thread(target=self._create_workers_once_placed, name="moe-placement", daemon=True).start()

    def _create_workers(self) -> None:
        args, n = self.args, self.args.num_moe_workers
        device = "cuda" if args.num_gpus_per_moe_worker > 0 else "cpu"
        actor = ray.remote(MoEWorker)
        workers = [
            actor.options(
                name=worker_name(self.app_name, i), max_restarts=-1, max_concurrency=64,
                num_cpus=self.bundle["CPU"], num_gpus=args.num_gpus_per_moe_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=i),
                runtime_env={"env_vars": NCCL_ENV},
            ).remote(self.checkpoint, index=i, num_workers=n, device=device, dtype=args.torch_dtype,
                     dequantize_experts=args.dequantize_experts, bf16_expert_copy=args.bf16_expert_copy,
                     load_format=args.load_format,
                     max_num_batched_tokens=args.engine.max_num_batched_tokens,
                     enforce_eager=args.engine.enforce_eager)
            for i in range(n)]
        ray.get([w.ping.remote() for w in workers], timeout=STARTUP_TIMEOUT_S)
        self.workers = workers

    def _create_workers_once_placed(self) -> None:
        ray.get(self.placement.ready())
        logger.info("the MoE workers' placement group is placed at last; starting the workers")
        try:
            self._create_workers()
        except Exception as e:  # noqa: BLE001 - the health check reports it and Serve starts a new pool
            logger.exception("the MoE workers did not start")
            self.unavailable = f"the MoE workers did not start ({type(e).__name__})"
            return
        self.unavailable = None

    async def check_health(self) -> None:
        # Serve's start-up check passes: a replica that fails it counts towards Serve's constructor retries, after
        # which Serve gives up on the deployment for good, while a placement may still come (pods still pulling
        # their image, an autoscaler adding nodes). Every later check fails while the workers have no place.
        if self.unavailable is not None and self._startup_checked:
            raise RuntimeError(self.unavailable)
        self._startup_checked = True
        self._start_health_loop()

    def __del__(self) -> None:
        try:  # Serve stops the pool (shutdown, redeploy, failed health): its group goes with it, workers and all
            remove_placement_group(self.placement)
        except Exception:  # noqa: BLE001 - Ray is shutting down; the group dies with its owner anyway
            pass

    def _start_health_loop(self) -> None:
        if self._health is None or self._health.done():
            self._health = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(PING_PERIOD_S)
            for worker in self.workers:
                try:
                    await asyncio.wait_for(worker.ping.remote(), PING_TIMEOUT_S)
                except asyncio.TimeoutError:  # hung: kill it, Ray brings it back with its shard
                    ray.kill(worker, no_restart=False)
                except Exception:  # noqa: BLE001 - dead and being restarted by Ray already
                    pass

