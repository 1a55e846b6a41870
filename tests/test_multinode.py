"""A real multi-node Ray cluster on this machine, placed by the KubeRay manifest's own rules.

tests/ray_nodes.py starts a head and one raylet per worker group of k8s/rayservice.gpt-oss-20b-disaggregated.yaml
with `ray start`, each with the group's node labels and CPUs as the manifest gives them, and deploys the manifest's
serveConfigV2 (the tiny model on the CPU, one attention replica and one MoE worker; the label selectors and the
CPUs each actor asks for unchanged) through the dashboard, as the operator does. Then:

- `python -m gptoss_serve.bench.cluster_check` (Ray's state API: list_nodes, list_actors) finds the attention
  replica, the ingress and the router on the `attention` node and the MoE worker on the `moe` node;
- the `moe` node is killed (its `ray start`, raylet and every process they started), twice: the streams in flight
  fail within expert_timeout_s + 5 s, none hangs, what needs no expert (/v1/models) still answers and a completion
  is refused with a 503; once the node rejoins with the same labels the service answers 200 again within 60 s,
  its worker on the new `moe` node. The streams fail at the exchange: the request path (ingress, router, replica)
  is on the `attention` node. Nothing keeps the ExpertPool off `moe` nodes: it goes with the node in some runs.

The cluster is the test's own (its temp dir, its ports, loopback only), apart from the session's local cluster of
tests/conftest.py, and its processes are killed by their ids at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from gptoss_serve.bench.cluster_check import (ATTENTION, MOE, Group, placements, rules_from_manifest,
                                              violations)
from gptoss_serve.deployments.expert_pool import worker_name
from tests.k8s_cases import groups, node_labels, ray_resources
from tests.completion_stream import CompletionStream, wait_until_streaming
from tests.net import free_port
from tests.ray_nodes import HEAD, MANIFEST, QUIET_ENV, LocalCluster, cpu_serve_config, group_specs, rayservice

EXPERT_TIMEOUT_S = 5.0
FAIL_WITHIN_S = EXPERT_TIMEOUT_S + 5
BACK_WITHIN_S = 60.0
REFUSED_WITHIN_S = 30.0  # a request that arrives while the node is away: a 503, never held (see the test)
MODEL = "gpt-oss-multinode"
MAX_TOKENS = 400  # still streaming when the node goes
SVC = rayservice()
APP = rules_from_manifest(MANIFEST).app


# ---- the rules, without a cluster ----------------------------------------------------------------------------------

def test_the_check_reads_the_manifest_as_test_k8s_does():
    """cluster_check's reading of the manifest (its groups' labels and CPUs, where each kind belongs) is the one
    tests/test_k8s.py checks the manifests with, so what is checked here is what the manifests promise."""
    rules = rules_from_manifest(MANIFEST)
    assert {g.name: (g.labels, g.cpus, g.gpus) for g in rules.groups} == {
        name: (g.get("labels", {}), ray_resources(g)["CPU"], ray_resources(g)["GPU"]) for name, g in groups(SVC)[1:]}
    for g in rules.groups:
        assert g.holds(node_labels(g.name, dict(groups(SVC))[g.name]))
    assert rules.allowed == {ATTENTION: ["attention"], MOE: ["moe"], "OpenAIIngress": ["attention"],
                             "BatchingRouter": ["attention"]}


def test_the_check_catches_an_actor_off_its_group():
    rules = rules_from_manifest(MANIFEST)
    nodes = [{"node_id": f"{g.name}-node", "state": "ALIVE", "labels": {**g.labels, "ray.io/node-group": g.name}}
             for g in rules.groups]
    replica = {"class_name": f"ServeReplica:{APP}:AttentionReplica", "name": "r", "state": "ALIVE"}
    worker = {"class_name": "MoEWorker", "name": worker_name(APP, 0), "state": "ALIVE"}
    front = [{"class_name": f"ServeReplica:{APP}:{name}", "name": name, "state": "ALIVE", "node_id": "attention-node"}
             for name in ("OpenAIIngress", "BatchingRouter")]
    right = [{**replica, "node_id": "attention-node"}, {**worker, "node_id": "moe-node"}, *front]
    assert not violations(rules, placements(rules, nodes, right))
    swapped = [{**replica, "node_id": "moe-node"}, {**worker, "node_id": "attention-node"}, *front]
    assert len(violations(rules, placements(rules, nodes, swapped))) == 2
    router_astray = [*right[:3], {**right[3], "node_id": "moe-node"}]
    assert [v.split()[0] for v in violations(rules, placements(rules, nodes, router_astray))] == ["BatchingRouter"]
    assert violations(rules, placements(rules, nodes, [right[0], *front])) == [f"no live {MOE} of app {APP!r}"]
    unlabelled = [{**n, "labels": {}} if n["node_id"] == "moe-node" else n for n in nodes]
    assert violations(rules, placements(rules, unlabelled, right))  # a node without the group's labels: no group
    assert not Group("moe", {"gptoss.io/role": "moe"}, 10, 1).holds({"gptoss.io/role": "moe",
                                                                      "ray.io/node-group": "attention"})


# ---- the cluster ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tiny_bf16):
    started = time.monotonic()
    local = LocalCluster(SVC)
    try:
        for name in (HEAD, "attention", "moe"):
            local.start(name)
        http_port = free_port()
        local.deploy(cpu_serve_config(SVC, model=str(tiny_bf16), http_port=http_port,
                                      served_model_name=MODEL, expert_timeout_s=EXPERT_TIMEOUT_S))
        print(f"\ncluster up and app running in {time.monotonic() - started:.1f} s")
        local.url = f"http://127.0.0.1:{http_port}"
        yield local
    finally:
        local.shutdown()
        print(f"cluster gone after {time.monotonic() - started:.1f} s")


def cluster_check(local: LocalCluster) -> subprocess.CompletedProcess:
    """The check script against the cluster's GCS address, in a process of its own (a driver of this cluster; the
    test process may be one of the session's cluster)."""
    env = {**os.environ, **QUIET_ENV}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "gptoss_serve.bench.cluster_check", "--address", local.address,
                           "--manifest", str(MANIFEST), "--all"], env=env, capture_output=True, text=True, timeout=120)


def assert_placed(local: LocalCluster) -> str:
    result = cluster_check(local)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    for kind, group in ((ATTENTION, "attention"), (MOE, "moe"), ("OpenAIIngress", "attention"),
                        ("BatchingRouter", "attention")):
        words = kind.split()
        assert any(line.split()[:len(words)] == words and f"group {group}" in line and line.endswith("ok")
                   for line in result.stdout.splitlines()), f"no {kind} on {group}:\n{result.stdout}"
    return result.stdout


def complete(url: str, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": [1, 2, 3], "max_tokens": max_tokens, "ignore_eos": True})


def serving(url: str, *, within_s: float, why: str = "", check=lambda: "") -> None:
    """Waits for a completion's 200; each answer meanwhile must be a 503 (refused, not held)."""
    since, refused = time.monotonic(), 0
    while True:
        r = complete(url)
        if r.status_code == 200:
            assert json.loads(r.text)["usage"]["completion_tokens"] == 4
            if refused:
                print(f"{refused} completions got a 503 before a 200, {time.monotonic() - since:.1f} s")
            return
        assert r.status_code == 503, r.text
        refused += 1
        assert time.monotonic() - since < within_s, f"no 200 within {within_s:.0f} s {why}: {r.text}\n{check()}"
        time.sleep(0.5)


def test_nodes_carry_their_groups_labels_and_cpus(cluster):
    specs = group_specs(SVC)
    nodes = [n for n in cluster.list_nodes() if n["state"] == "ALIVE"]
    assert len(nodes) == len(specs)
    for name, node in cluster.nodes.items():
        info = next(n for n in nodes if n["node_id"] == node.node_id)
        assert specs[name].labels.items() <= info["labels"].items(), (name, info["labels"])
        assert info["resources_total"].get("CPU", 0) == specs[name].num_cpus, (name, info["resources_total"])
        if name != HEAD:
            assert info["labels"]["ray.io/node-group"] == name


def test_each_kind_of_actor_on_a_node_of_its_group(cluster):
    assert complete(cluster.url).status_code == 200
    assert_placed(cluster)


def lose_and_rejoin_the_moe_node(cluster: LocalCluster) -> dict[str, bool]:
    """Kills the `moe` node under two streams and starts it again; checks the bounds. Returns which of the app's
    other actors the lost node held: the manifest keeps the ingress and the router off it, not the ExpertPool."""
    serving(cluster.url, within_s=BACK_WITHIN_S)
    body = {"model": MODEL, "prompt": "the node goes", "max_tokens": MAX_TOKENS, "ignore_eos": True}
    streams = [CompletionStream(cluster.url, body) for _ in range(2)]
    wait_until_streaming(streams)
    before = assert_placed(cluster)  # where everything is, for the record (and a failure's message)
    moe_node = cluster.nodes["moe"].node_id[:8]
    went_too = {name: any(f"#{name}#" in line and f"node {moe_node}" in line for line in before.splitlines())
                for name in ("BatchingRouter", "ExpertPool", "OpenAIIngress")}
    assert not went_too["BatchingRouter"] and not went_too["OpenAIIngress"], before  # their label selectors

    fault_at = time.monotonic()
    cluster.nodes["moe"].kill()
    killed_in = time.monotonic() - fault_at

    for i, s in enumerate(streams):
        s.thread.join(timeout=FAIL_WITHIN_S + 30)
        assert not s.thread.is_alive(), f"stream {i} hung after the node was lost"
    held = [k for k, v in went_too.items() if v] or "nothing else"
    print(f"\nnode killed in {killed_in:.2f} s (it also held {held});"
          f" streams ended {[round(s.ended_at - fault_at, 2) for s in streams]} s after: {[s.error for s in streams]}")
    for i, s in enumerate(streams):
        assert not s.completed and s.error, f"stream {i} completed without its MoE worker"
        assert s.ended_at - fault_at < FAIL_WITHIN_S, f"stream {i} failed {s.ended_at - fault_at:.1f} s after"
        assert "MoE worker" in s.error, s.error  # the request path (ingress, router, replica) lived on

    # what needs no expert still answers while the node is away; a completion is refused, never held
    r = httpx.get(cluster.url + "/v1/models", timeout=30)
    assert r.status_code == 200, r.text
    asked = time.monotonic()
    r = complete(cluster.url)
    refused_in = time.monotonic() - asked
    print(f"a completion asked while the node was away: {r.status_code} in {refused_in:.1f} s")
    assert r.status_code == 503 and refused_in < REFUSED_WITHIN_S, (r.status_code, refused_in, r.text)

    rejoined_at = time.monotonic()
    cluster.start("moe")
    serving(cluster.url, within_s=BACK_WITHIN_S, why=f"after the node rejoined (it had held {went_too})",
            check=lambda: cluster_check(cluster).stdout)
    print(f"a 200 {time.monotonic() - rejoined_at:.1f} s after the node rejoined")
    assert cluster.nodes["moe"].node_id[:8] in assert_placed(cluster)
    return went_too


def test_lost_node_fails_its_streams_fast_and_the_service_returns_when_it_rejoins(cluster):
    """Twice, the second time against the workers that came back with the node. The streams fail at the expert
    exchange (expert_timeout_s): the ingress and the router are on the `attention` node by the manifest's label
    selectors. The ExpertPool may be on the lost node: its workers die with it, and the replica finds the new
    pool's workers by name."""
    held = [lose_and_rejoin_the_moe_node(cluster) for _ in range(2)]
    print(f"the lost node held, each time: {held}")
