"""Did each kind of actor land on a node of its own group? Checks a running Ray cluster against a KubeRay manifest.

    python -m gptoss_serve.bench.cluster_check --address auto                       # on a node of the cluster
    python -m gptoss_serve.bench.cluster_check --address ray://HEAD:10001           # through Ray Client
    python -m gptoss_serve.bench.cluster_check --address http://HEAD:8265 \\
        --manifest k8s/rayservice.gpt-oss-20b-disaggregated.yaml --app gptoss

The rules come from the manifest, not from this script: the attention replicas belong on the worker groups whose
Ray node labels AttentionReplica's label selector matches, and so does every other deployment the manifest gives a
label selector (the ingress and the router, kept off `moe` pods); the MoE workers on the groups whose pods can hold
a worker's CPUs and GPUs (the manifest keeps them off `attention` pods by asking more CPUs than those pods have). A
node is of a group when it carries the group's labels (and, where Ray set it, `ray.io/node-group`: KubeRay's
RAY_NODE_TYPE_NAME).

Ray's state API (ray.util.state list_nodes and list_actors) tells which node each live actor is on. Prints one line
per actor (kind, actor, node, its group, ok or WRONG GROUP) and exits 1 on any actor off its groups, or when a kind
has no live actor at all (a pending placement is a failure too: nothing was placed to check). Exits 0 otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_MANIFEST = Path(__file__).resolve().parents[1] / "k8s" / "rayservice.gpt-oss-20b-disaggregated.yaml"
NODE_GROUP_LABEL = "ray.io/node-group"  # Ray's own label, from RAY_NODE_TYPE_NAME (KubeRay sets it on each pod)
ATTENTION, MOE = "attention replica", "MoE worker"  # kinds; other selector-bearing deployments are their own kind
ATTENTION_DEPLOYMENT = "AttentionReplica"


@dataclass(frozen=True)
class Group:
    name: str
    labels: dict[str, str]
    cpus: float
    gpus: float

    def holds(self, node_labels: dict[str, str]) -> bool:
        """Whether a node with these Ray labels is one of this group's."""
        if node_labels.get(NODE_GROUP_LABEL, self.name) != self.name:
            return False
        return all(node_labels.get(k) == v for k, v in self.labels.items())


@dataclass(frozen=True)
class Rules:
    app: str
    groups: list[Group]  # the worker groups (the head holds no actor of ours: its num-cpus is 0)
    allowed: dict[str, list[str]]  # kind -> the groups its actors may be on


def label_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Ray's label selector: `value`, `!value`, `in(a,b)`, `!in(a,b)`."""
    for key, want in selector.items():
        negate, want = want.startswith("!"), want.lstrip("!")
        values = [v.strip() for v in want[3:-1].split(",")] if want.startswith("in(") else [want]
        if (labels.get(key) in values) == negate:
            return False
    return True


def pod_resources(group: dict) -> tuple[float, float]:
    """(CPUs, GPUs) Ray counts on a pod of the group: rayStartParams first, else the container's limits (a CPU
    limit rounded up, as KubeRay does)."""
    params = group.get("rayStartParams") or {}
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    if "num-cpus" in params:
        cpus = float(params["num-cpus"])
    else:
        limit = str(limits.get("cpu", "0"))
        cpus = math.ceil(float(limit[:-1]) / 1000 if limit.endswith("m") else float(limit))
    return cpus, float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))


def rules_from_manifest(path: Path, app_name: str | None = None) -> Rules:
    """Where each kind of actor of the manifest's app belongs, by the manifest's own rules."""
    svc = next(d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict) and d.get("kind") == "RayService")
    apps = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    app = next((a for a in apps if app_name in (None, a["name"])), None)
    if app is None:
        raise SystemExit(f"{path}: no app {app_name!r}; it has {[a['name'] for a in apps]}")
    groups = []
    for g in svc["spec"]["rayClusterConfig"].get("workerGroupSpecs", []):
        cpus, gpus = pod_resources(g)
        groups.append(Group(g["groupName"], dict(g.get("labels") or {}), cpus, gpus))
    selectors = {d["name"]: (d.get("ray_actor_options") or {}).get("label_selector") or {}
                 for d in app.get("deployments", [])}
    args = app.get("args") or {}
    worker = (max(float(args.get("num_cpus_per_moe_worker", 1)), 0.01), float(args.get("num_gpus_per_moe_worker", 0)))

    def matching(selector: dict[str, str]) -> list[str]:
        return [g.name for g in groups if label_matches(selector, {**g.labels, NODE_GROUP_LABEL: g.name})]

    allowed = {ATTENTION: matching(selectors.get(ATTENTION_DEPLOYMENT, {}))}
    allowed |= {name: matching(s) for name, s in selectors.items() if s and name != ATTENTION_DEPLOYMENT}
    if args.get("num_moe_workers"):
        allowed[MOE] = [g.name for g in groups if g.cpus >= worker[0] and g.gpus >= worker[1]]
    return Rules(app["name"], groups, allowed)


def kind_of(actor: dict, rules: Rules) -> str | None:
    """The actor's kind under the rules (None: no rule places it)."""
    app = rules.app
    deployment = (actor.get("class_name") or "").removeprefix(f"ServeReplica:{app}:")
    if deployment == ATTENTION_DEPLOYMENT:
        return ATTENTION
    if deployment in rules.allowed:
        return deployment
    from gptoss_serve.deployments.expert_pool import worker_name

    if (actor.get("name") or "").startswith(worker_name(app, 0).rsplit(":", 1)[0] + ":"):
        return MOE
    return None


@dataclass(frozen=True)
class Placement:
    kind: str
    actor: str
    node_id: str
    group: str | None  # None: the node is of no group of the manifest (or gone)
    ok: bool


def placements(rules: Rules, nodes: list[dict], actors: list[dict]) -> list[Placement]:
    """Each live actor of the app's kinds, where it is and whether that is one of its groups."""
    labels = {n["node_id"]: n.get("labels") or {} for n in nodes if n.get("state") == "ALIVE"}
    found = []
    for actor in actors:
        kind = kind_of(actor, rules)
        if kind is None or actor.get("state") != "ALIVE":
            continue
        node = actor.get("node_id") or ""
        group = next((g.name for g in rules.groups if node in labels and g.holds(labels[node])), None)
        found.append(Placement(kind, actor.get("name") or actor["actor_id"], node, group,
                               group in rules.allowed.get(kind, [])))
    return found


def violations(rules: Rules, found: list[Placement]) -> list[str]:
    wrong = [f"{p.kind} {p.actor} is on node {p.node_id[:8]} of group {p.group}; it belongs on "
             f"{rules.allowed[p.kind]}" for p in found if not p.ok]
    missing = [f"no live {kind} of app {rules.app!r}" for kind in rules.allowed if not any(p.kind == kind
                                                                                         for p in found)]
    return wrong + missing


def snapshot(address: str) -> tuple[list[dict], list[dict]]:
    """(nodes, actors) from Ray's state API, each as a dict."""
    if address.startswith("ray://"):  # Ray Client: ask from inside the cluster
        import ray

        ray.init(address=address, log_to_driver=False)
        try:
            return ray.get(ray.remote(num_cpus=0)(_snapshot_here).remote())
        finally:
            ray.shutdown()
    return _snapshot_here(None if address == "auto" else address)


def _snapshot_here(address: str | None = None) -> tuple[list[dict], list[dict]]:
    from ray.util.state import list_actors, list_nodes

    nodes = [n.__dict__ if not isinstance(n, dict) else n
             for n in list_nodes(address=address, limit=10_000, detail=True, raise_on_missing_output=False)]
    actors = [a.__dict__ if not isinstance(a, dict) else a for a in list_actors(
        address=address, limit=10_000, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)]
    return nodes, actors


def others(rules: Rules, nodes: list[dict], actors: list[dict]) -> list[str]:
    """The app's other live actors (the ExpertPool, and whatever the manifest gives no label selector), where they
    are: no rule keeps them anywhere."""
    labels = {n["node_id"]: n.get("labels") or {} for n in nodes if n.get("state") == "ALIVE"}
    lines = []
    for actor in actors:
        if (actor.get("class_name") or "").startswith(f"ServeReplica:{rules.app}:") and kind_of(actor, rules) is None:
            node = actor.get("node_id") or ""
            group = next((g.name for g in rules.groups if node in labels and g.holds(labels[node])), None)
            lines.append(f"  {'(any node)':<18} {actor.get('name') or actor['actor_id']:<60} node {node[:8]}  "
                         f"group {group or '-'}")
    return sorted(lines)


def report(rules: Rules, found: list[Placement], problems: list[str], rest: list[str] = ()) -> str:
    lines = [f"app {rules.app}: " + "; ".join(f"{kind} on {groups}" for kind, groups in rules.allowed.items())]
    for p in sorted(found, key=lambda p: (p.kind, p.actor)):
        lines.append(f"  {p.kind:<18} {p.actor:<60} node {p.node_id[:8]}  group {p.group or '-':<12} "
                     f"{'ok' if p.ok else 'WRONG GROUP'}")
    lines += list(rest)
    lines += [f"VIOLATION: {problem}" for problem in problems]
    lines.append("placement: " + ("FAILED" if problems else "ok"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="auto", help="auto, HOST:PORT (the GCS), ray://HOST:10001 or "
                                                          "http://HOST:8265 (the dashboard)")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="the RayService whose rules apply")
    parser.add_argument("--app", default=None, help="the Serve app's name (default: the manifest's only app)")
    parser.add_argument("--all", action="store_true", help="also show where the app's other actors are")
    args = parser.parse_args(argv)
    rules = rules_from_manifest(args.manifest, args.app)
    nodes, actors = snapshot(args.address)
    found = placements(rules, nodes, actors)
    problems = violations(rules, found)
    print(report(rules, found, problems, others(rules, nodes, actors) if args.all else ()))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
