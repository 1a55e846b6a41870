"""ExpertPool: owns the N MoEWorker actors (one placement group), keeps them healthy, names them to replicas.

Workers are plain Ray actors, restarted by Ray when they die (each reloads its own shard); one that stops
answering pings is killed so that Ray restarts it. Attention replicas find them by name.
"""

from __future__ import annotations

import asyncio

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gptoss_serve.cluster.moe_worker import MoEWorker
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.replica_context import current_app_name

PING_PERIOD_S = 2.0
PING_TIMEOUT_S = 10.0


def worker_name(app: str, index: int) -> str:
    return f"gptoss-moe-worker:{app}:{index}"


class ExpertPool:
    def __init__(self, args: AppArgs) -> None:
        self.args, self.app_name = args, current_app_name()
        # a hub id is resolved by each worker on its own node; the default model is written here
        checkpoint = args.resolved_model or str(args.resolved_model_dir())
        n = args.num_moe_workers
        bundle = {"CPU": max(args.num_cpus_per_moe_worker, 0.01)}
        if args.num_gpus_per_moe_worker:
            bundle["GPU"] = args.num_gpus_per_moe_worker
        self.placement = placement_group([bundle] * n, strategy="PACK")
        ray.get(self.placement.ready(), timeout=600)
        device = "cuda" if args.num_gpus_per_moe_worker > 0 else "cpu"
        actor = ray.remote(MoEWorker)
        self.workers = [
            actor.options(
                name=worker_name(self.app_name, i), max_restarts=-1, max_concurrency=64,
                num_cpus=bundle["CPU"], num_gpus=args.num_gpus_per_moe_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=i),
                runtime_env={"env_vars": NO_MULTICAST},
            ).remote(checkpoint, index=i, num_workers=n, device=device, dtype=args.torch_dtype,
                     dequantize_experts=args.dequantize_experts, load_format=args.load_format,
                     max_num_batched_tokens=args.engine.max_num_batched_tokens)
            for i in range(n)]
        ray.get([w.ping.remote() for w in self.workers], timeout=600)
        self._health: asyncio.Task | None = None

    async def check_health(self) -> None:
        self._start_health_loop()

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


# NVLink multicast stays off in every process we start (the lent multi-GPU machines need it off)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
