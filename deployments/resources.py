"""What the app's actors ask of the Ray cluster, and what the cluster lacks for them.

The builder compares the whole app's demand with the cluster's totals and warns when it cannot fit (the actors
that do not fit wait for nodes, forever on a fixed cluster). The ExpertPool uses the same arithmetic to say, in
its log and its health check, which resources its MoE workers are missing when their placement group stays
pending.
"""

from __future__ import annotations

import logging

from gptoss_serve.deployments.args import AppArgs

logger = logging.getLogger(__name__)
Resources = dict[str, float]
MIN_CPU = 0.01  # a worker asked to take no CPU still takes a sliver: Ray places a bundle only if it asks something


def moe_worker_bundle(args: AppArgs) -> Resources:
    """One MoE worker's share of the pool's placement group."""
    bundle = {"CPU": max(args.num_cpus_per_moe_worker, MIN_CPU)}
    if args.num_gpus_per_moe_worker:
        bundle["GPU"] = args.num_gpus_per_moe_worker
    return bundle


def app_demand(args: AppArgs) -> Resources:
    """Everything the app's actors ask for at once: ingress, router and attention replicas, and MoE workers."""
    demand: Resources = {}

    def add(count: int, resources: Resources) -> None:
        for name, amount in resources.items():
            if amount:
                demand[name] = demand.get(name, 0.0) + count * amount

    add(args.num_ingress_replicas, {"CPU": args.num_cpus_per_ingress})
    add(args.num_router_replicas, {"CPU": args.num_cpus_per_router})
    add(args.num_attention_replicas, {"CPU": args.num_cpus_per_replica, "GPU": args.num_gpus_per_replica})
    add(args.num_moe_workers, moe_worker_bundle(args) if args.num_moe_workers else {})
    return demand


def shortfall(asked: Resources, have: Resources) -> Resources:
    """How much of each asked resource `have` lacks (only those it lacks)."""
    return {name: amount - have.get(name, 0.0) for name, amount in asked.items() if amount > have.get(name, 0.0)}


def describe(resources: Resources) -> str:
    """`CPU 16, GPU 2` (whole numbers without a fraction); `nothing` when empty."""
    return ", ".join(f"{name} {amount:g}" for name, amount in sorted(resources.items())) or "nothing"


def moe_workers_shortfall(args: AppArgs, *, total: Resources, largest_node: Resources, free: Resources) -> str:
    """Why the MoE workers' bundles do not fit, for the log and the health check: what they ask, what the cluster
    has in all, on its largest node (one bundle must fit on one node) and free now, and what is missing."""
    bundle, n = moe_worker_bundle(args), args.num_moe_workers
    in_all = {name: n * amount for name, amount in bundle.items()}
    # what the cluster could never hold first; else what others hold now
    missing = shortfall(in_all, total) or shortfall(bundle, largest_node) or shortfall(in_all, free)
    return (f"{n} MoE workers ask for {describe(bundle)} each ({describe(in_all)} in all); the cluster has "
            f"{describe(_only(total, bundle))} in all, {describe(_only(largest_node, bundle))} on its largest node, "
            f"{describe(_only(free, bundle))} free; missing: {describe(missing)}")


def warn_if_cluster_too_small(args: AppArgs) -> None:
    """Logs a warning when the running Ray cluster cannot hold everything the args ask for (an autoscaler may
    still add nodes, so this is no error). Silent outside Ray: `serve build` has no cluster to compare with."""
    import ray

    if not ray.is_initialized():
        return
    demand = app_demand(args)
    missing = shortfall(demand, _only(ray.cluster_resources(), demand))
    if missing:
        logger.warning("the Ray cluster cannot hold what the app's args ask for: %s in all, the cluster has %s; "
                       "missing %s. Replicas or MoE workers that do not fit wait for nodes, and while MoE workers "
                       "wait, requests get 503", describe(demand),
                       describe(_only(ray.cluster_resources(), demand)), describe(missing))


def cluster_view() -> tuple[Resources, Resources, Resources]:
    """(total, largest node, free now) of the running Ray cluster."""
    import ray

    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    largest: Resources = {}
    for node in nodes:
        for name, amount in node.items():
            largest[name] = max(largest.get(name, 0.0), amount)
    return ray.cluster_resources(), largest, ray.available_resources()


def _only(resources: Resources, keys: Resources) -> Resources:
    """The entries of `resources` named in `keys` (0 where absent): Ray lists memory, node ids, ..."""
    return {name: resources.get(name, 0.0) for name in keys}
