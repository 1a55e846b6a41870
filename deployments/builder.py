"""The application builder that a Serve config's `import_path` names: deployments are bound only here.

    serve run gptoss_serve.deployments.builder:build_app                       # the embedded tiny model, on the CPU
    serve run config.yaml                                         # the same, from the config file
    serve run gptoss_serve.deployments.builder:build_app model=/path/to/gpt-oss-20b num_gpus_per_replica=1
"""

from __future__ import annotations

from typing import Any

from pathlib import Path

from pydantic import ValidationError
from ray import serve
from ray.serve.config import RequestRouterConfig

from gptoss_serve.cluster.engine_config import describe_errors
from gptoss_serve.cluster.expert_parallel.exchange import NCCL_ENV
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.attention_replica import AttentionReplica
from gptoss_serve.deployments.expert_pool import ExpertPool
from gptoss_serve.deployments.openai_ingress import OpenAIIngress
from gptoss_serve.deployments.batching_router import BatchingRouter
from gptoss_serve.deployments.resources import warn_if_cluster_too_small
from gptoss_serve.model.config import GptOssConfig
from gptoss_serve.model.errors import CheckpointError
from gptoss_serve.model.synthetic import preset_config

ROUTING_STATS_PERIOD_S = 1.0
# Requests past the app's own limit must reach the ingress to be turned away (429 at once): what Serve holds back
# waits in the proxy, retried with backoff. With room for 16, 600 streams at once on a 64-request app took
# 40-95 s to answer on 2 cores, and admitted more than 64 as slots freed; with this much room, 10 s.
TURN_AWAY_ROOM = 1024
# a call naming `target_replica` (an abort) reaches that replica; others go where there is most room
MOST_ROOM = RequestRouterConfig(request_router_class="gptoss_serve.deployments.most_room_router:MostRoomRouter",
                                request_routing_stats_period_s=ROUTING_STATS_PERIOD_S)


def attention_routing(args: AppArgs) -> RequestRouterConfig:
    """How a batch picks its attention replica (args.attention_routing; aborts reach their replica either way)."""
    if args.attention_routing == "most_room":
        return MOST_ROOM
    return RequestRouterConfig(request_router_class="gptoss_serve.deployments.prefix_aware_router:PrefixAwareRouter",
                               request_router_kwargs={"block_size": args.engine.block_size},
                               request_routing_stats_period_s=ROUTING_STATS_PERIOD_S)


def parse_args(raw: dict[str, Any] | AppArgs) -> AppArgs:
    """Validates the args; a bad value fails here, before any replica starts, naming the field."""
    if isinstance(raw, AppArgs):
        return raw
    # `serve run import_path key=value` passes strings; nested engine limits may be given as engine.key=value
    nested: dict[str, Any] = {}
    for key, value in raw.items():
        if "." in key:
            outer, inner = key.split(".", 1)
            nested.setdefault(outer, {})[inner] = value
        else:
            nested[key] = value
    try:
        return AppArgs.model_validate(nested)
    except ValidationError as e:
        raise ValueError(f"invalid gptoss-serve app args: {describe_errors(e, whole='args')}") from None


def model_config(args: AppArgs) -> GptOssConfig:
    """The model's config.json, without loading (or downloading) any weights."""
    if not args.resolved_model:
        return preset_config("tiny")
    path = Path(args.resolved_model).expanduser()
    if path.is_dir():
        return GptOssConfig.from_file(path / "config.json")
    from huggingface_hub import hf_hub_download

    try:
        return GptOssConfig.from_file(hf_hub_download(args.resolved_model, "config.json"))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - no network, unknown id
        raise ValueError(f"invalid gptoss-serve app args: model: cannot read config.json of "
                         f"{args.resolved_model!r} ({type(e).__name__}: {e})") from None


def check_expert_split(args: AppArgs) -> None:
    """Every worker must hold the same number of experts of every layer."""
    if not args.num_moe_workers:
        return
    experts = model_config(args).num_local_experts
    if args.num_moe_workers > experts:
        raise ValueError(f"invalid gptoss-serve app args: num_moe_workers: {args.num_moe_workers} workers for "
                         f"{experts} experts; at most one worker per expert")
    if experts % args.num_moe_workers:
        raise ValueError(f"invalid gptoss-serve app args: num_moe_workers: {experts} experts do not divide evenly "
                         f"over {args.num_moe_workers} workers")


def build_app(raw_args: dict[str, Any] | AppArgs | None = None) -> serve.Application:
    args = parse_args(raw_args or {})
    # $GPTOSS_API_KEYS where the app is built travels in the ingress's bound args to every ingress replica: Ray's
    # workers do not inherit this process's environment (each replica still adds the keys of its own environment)
    try:
        ingress_args = args.with_env_api_keys()
    except ValueError as e:
        raise ValueError(f"invalid gptoss-serve app args: api_keys: {e}") from None
    check_expert_split(args)
    warn_if_cluster_too_small(args)
    pool = None
    if args.num_moe_workers:
        # it owns the workers' placement group; the attention replicas find the workers by name
        pool = serve.deployment(ExpertPool, name="ExpertPool", num_replicas=1, ray_actor_options={"num_cpus": 0},
                                health_check_period_s=2).bind(args)
    # a replica that is stopped (shutdown, redeploy, scale-down) first finishes what it is serving, up to the timeout
    drain = dict(graceful_shutdown_timeout_s=args.drain_timeout_s, graceful_shutdown_wait_loop_s=1.0)
    replica = serve.deployment(
        AttentionReplica,
        name="AttentionReplica",
        num_replicas=args.num_attention_replicas,
        max_ongoing_requests=10_000,  # a call is a whole batch; the engine queues, not Serve
        ray_actor_options={"num_cpus": args.num_cpus_per_replica, "num_gpus": args.num_gpus_per_replica,
                           "runtime_env": {"env_vars": NCCL_ENV}},
        request_router_config=attention_routing(args),
        health_check_period_s=5,
        health_check_timeout_s=30,
        **drain,
    ).bind(args, expert_pool=pool)
    router = serve.deployment(BatchingRouter, name="BatchingRouter", max_ongoing_requests=100_000,
                              num_replicas=args.num_router_replicas,
                              request_router_config=MOST_ROOM,  # aborts reach the router replica of their call
                              ray_actor_options={"num_cpus": args.num_cpus_per_router}, **drain).bind(
        replica, model_name=args.served_model_name, max_batch_size=args.router_max_batch_size,
        max_wait_ms=args.router_max_wait_ms)
    admitted = args.max_ongoing_requests + args.max_queued_requests  # the ingress answers 429 beyond
    ingress = serve.deployment(serve.ingress()(OpenAIIngress), name="OpenAIIngress",
                               max_ongoing_requests=admitted + TURN_AWAY_ROOM,
                               num_replicas=args.num_ingress_replicas,
                               ray_actor_options={"num_cpus": args.num_cpus_per_ingress}, **drain)
    return ingress.bind(router, ingress_args)
