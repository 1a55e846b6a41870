"""A multi-node Ray cluster on this machine, for tests/test_multinode.py: a head and one raylet per worker group of
a KubeRay manifest, each started with `ray start --block` as KubeRay starts a pod (the group's Ray node labels, its
CPUs, RAY_NODE_TYPE_NAME for the `ray.io/node-group` label), and the manifest's serveConfigV2 deployed through the
dashboard's REST API as the KubeRay operator does. Nothing about placement is restated here: labels, CPUs, the
label selector and the args that size the actors all come from the manifest.

The cluster keeps to itself: its own temp dir and ports, no `ray stop` (which would stop every Ray on the machine);
each node is a process group of our own, killed by its ids.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from tests.k8s_cases import K8S, groups, load, ray_resources
from tests.net import free_port

MANIFEST = K8S / "rayservice.gpt-oss-20b-disaggregated.yaml"
RAY = str(Path(sys.executable).with_name("ray"))
HEAD = "head"
OBJECT_STORE_BYTES = 100 * 1024**2  # per node; the app moves no tensors through Ray
# raylets start one idle worker per CPU by default: the manifests' CPUs are logical here (2 real cores)
# and a cluster of the test's own, on 127.0.0.1 only, needs no token (its clients get the same environment)
QUIET_ENV = {"RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0",
             "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def rayservice(path: Path = MANIFEST) -> dict:
    return next(d for d in load(path) if d.get("kind") == "RayService")


@dataclass
class GroupSpec:
    """What `ray start` gets for a pod of one group of the manifest."""

    name: str
    labels: dict[str, str]
    num_cpus: int
    params: dict[str, str]  # rayStartParams


def group_specs(svc: dict) -> dict[str, GroupSpec]:
    """{group name: spec}, the head first. GPUs are left out: the test app runs on the CPU (a GPU the app does not
    ask for changes no placement)."""
    return {name: GroupSpec(name, dict(g.get("labels") or {}), int(ray_resources(g)["CPU"]),
                            {k: str(v) for k, v in (g.get("rayStartParams") or {}).items()})
            for name, g in groups(svc)}


def cpu_serve_config(svc: dict, *, model: str, http_port: int, **arg_overrides) -> dict:
    """The manifest's serveConfigV2 made to run on this machine's CPUs, its placement rules untouched: the tiny
    model on the CPU over gloo, one attention replica (no autoscaling) and one MoE worker, no GPUs asked, proxies
    on the head only (one machine: every node's proxy would bind one port). The CPUs each actor asks for, and the
    AttentionReplica's label selector, stay the manifest's."""
    config = yaml.safe_load(svc["spec"]["serveConfigV2"])
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    config["proxy_location"] = "HeadOnly"
    (app,) = config["applications"]
    experts = int(app["args"]["num_moe_workers"])
    app["args"].update({"model": model, "device": "cpu", "num_gpus_per_replica": 0, "num_gpus_per_moe_worker": 0,
                        "expert_transport": "gloo", "num_attention_replicas": 1, "num_moe_workers": min(experts, 1),
                        "engine": {"max_model_len": 512, "num_kv_blocks": 256}, **arg_overrides})
    for deployment in app.get("deployments", []):
        if deployment["name"] == "AttentionReplica":
            deployment.pop("autoscaling_config", None)
            deployment["num_replicas"] = 1
        if "ray_actor_options" in deployment:
            deployment["ray_actor_options"]["num_gpus"] = 0
    return config


def attention_selector(svc: dict) -> dict[str, str]:
    """AttentionReplica's label selector, as the manifest's serveConfigV2 gives it."""
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    for deployment in app.get("deployments", []):
        if deployment["name"] == "AttentionReplica":
            return dict(deployment.get("ray_actor_options", {}).get("label_selector") or {})
    return {}


@dataclass
class RayNode:
    """One `ray start --block` in a process group (a session) of its own."""

    group: GroupSpec
    args: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None
    node_id: str | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([RAY, "start", "--block", *self.args], env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL to `ray start`, the raylet and everything they started (found before any dies, so that none is
        orphaned out of reach), and to the process group."""
        if self.proc is None:
            return
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)


def descendants(root: int) -> list[int]:
    """Every process under `root` (from /proc: this is Linux, as Ray's raylets are)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class LocalCluster:
    """The manifest's head and one node per worker group, on 127.0.0.1, ports and temp dir of its own."""

    svc: dict
    temp_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rmn", dir="/tmp")))
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: dict[str, RayNode] = field(default_factory=dict)
    url: str = ""  # the Serve app's, once deployed

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def node(self, group: str) -> RayNode:
        spec = group_specs(self.svc)[group]
        env = {**os.environ, **QUIET_ENV}
        env.pop("RAY_ADDRESS", None)
        args = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(spec.num_cpus), "--num-gpus", "0",
                "--object-store-memory", str(OBJECT_STORE_BYTES), "--temp-dir", str(self.temp_dir),
                "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()), "--disable-usage-stats"]
        if group == HEAD:
            args += ["--head", "--port", str(self.gcs_port), "--include-dashboard", "true",
                     "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                     "--ray-client-server-port", str(free_port())]
        else:
            env["RAY_NODE_TYPE_NAME"] = group  # as KubeRay sets it: Ray labels the node ray.io/node-group=<group>
            args += ["--address", self.address]
            if spec.labels:
                args += ["--labels", ",".join(f"{k}={v}" for k, v in spec.labels.items())]
        return RayNode(spec, args, env, self.temp_dir / f"ray-start-{group}.log")

    def start(self, name: str, *, timeout_s: float = 90) -> None:
        """Starts the group's node (again, after a kill) and waits until it is alive in the cluster. One at a time:
        two raylets starting at once on one address may miss each other's registration."""
        before = {n["node_id"] for n in self.list_nodes()} if name != HEAD else set()
        node = self.nodes[name] = self.node(name)
        node.start()
        deadline = time.monotonic() + timeout_s
        while True:
            assert node.proc.poll() is None, f"`ray start` for {name} exited: {self.tail(node)}"
            try:
                joined = [n["node_id"] for n in self.list_nodes() if n["state"] == "ALIVE"
                          and n["node_id"] not in before and bool(n.get("is_head_node")) == (name == HEAD)]
            except (httpx.HTTPError, ValueError, KeyError):
                joined = []
            if joined:
                node.node_id = joined[0]
                return
            assert time.monotonic() < deadline, f"{name} did not join within {timeout_s:.0f} s: {self.tail(node)}"
            time.sleep(0.5)

    def list_nodes(self) -> list[dict]:
        r = httpx.get(f"{self.dashboard}/api/v0/nodes", params={"limit": 1000, "detail": "true"}, timeout=10)
        r.raise_for_status()
        return r.json()["data"]["result"]["result"]

    def tail(self, node: RayNode, n: int = 3000) -> str:
        try:
            return node.log.read_text()[-n:]
        except OSError:
            return "(no log)"

    def deploy(self, config: dict, *, timeout_s: float = 150) -> None:
        """PUTs the Serve config to the dashboard (as the KubeRay operator does) and waits until it runs."""
        r = httpx.put(f"{self.dashboard}/api/serve/applications/", json=config, timeout=30)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.serve_status()
            apps = status.get("applications") or {}
            states = {name: app.get("status") for name, app in apps.items()}
            if apps and all(s == "RUNNING" for s in states.values()):
                return
            assert not any(s in ("DEPLOY_FAILED", "UNHEALTHY") for s in states.values()), status
            assert time.monotonic() < deadline, f"the app is not running after {timeout_s:.0f} s: {status}"
            time.sleep(1)

    def serve_status(self) -> dict:
        try:
            r = httpx.get(f"{self.dashboard}/api/serve/applications/", timeout=10)
            return r.json() if r.status_code == 200 else {}
        except httpx.HTTPError:
            return {}

    def shutdown(self) -> None:
        for name in [n for n in self.nodes if n != HEAD] + [HEAD] * (HEAD in self.nodes):
            self.nodes[name].kill()
        if not os.environ.get("GPTOSS_KEEP_RAY_LOGS"):  # set it to read the nodes' logs after a failure
            shutil.rmtree(self.temp_dir, ignore_errors=True)
