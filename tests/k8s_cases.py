"""Reading the manifests in k8s/ as KubeRay and Ray read them, for tests/test_k8s.py: a RayService's groups and
containers, the Ray resources of a pod, Ray label selectors, the Ray version in an image tag, and the CRD schema made
strict. Needs only PyYAML (which Ray brings)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]  # the checkout
K8S = REPO / "k8s"
GPU = "nvidia.com/gpu"


def manifest_paths() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


def load(path: Path) -> list:
    """The documents of a (possibly multi-document) YAML file; [] when it does not parse."""
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError:
        return []


def cluster(svc: dict) -> dict:
    return svc["spec"]["rayClusterConfig"]


def groups(svc: dict) -> list[tuple[str, dict]]:
    """(name, group spec) of the head ("head") and of every worker group."""
    spec = cluster(svc)
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def containers(node) -> list[dict]:
    """Every container and init container anywhere in a manifest."""
    if isinstance(node, list):
        return [c for item in node for c in containers(item)]
    if not isinstance(node, dict):
        return []
    own = [c for key in ("containers", "initContainers") for c in node.get(key) or []]
    return own + [c for key, value in node.items() if key not in ("containers", "initContainers")
                  for c in containers(value)]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def ray_resources(group: dict) -> dict[str, float]:
    """The CPUs and GPUs Ray counts on a pod of the group: rayStartParams first, else the container's limits
    (a CPU limit rounded up, as KubeRay does)."""
    params = group.get("rayStartParams", {})
    limits = ray_container(group).get("resources", {}).get("limits", {})
    if "num-cpus" in params:
        cpus = float(params["num-cpus"])
    else:
        limit = str(limits.get("cpu", ""))
        if not limit:
            raise ValueError(f"{group.get('groupName', 'head')}: no cpu limit and no num-cpus: Ray's CPUs unknown")
        cpus = math.ceil(float(limit[:-1]) / 1000 if limit.endswith("m") else float(limit))
    return {"CPU": cpus, "GPU": float(params.get("num-gpus", limits.get(GPU, 0)))}


def node_labels(name: str, group: dict) -> dict[str, str]:
    """The Ray node labels of the group's pods: its `labels`, and the group's name, which Ray adds itself."""
    return {**group.get("labels", {}), "ray.io/node-group": name}


def image_ray_version(image: str) -> str | None:
    """rayproject/ray:2.60.0-py311-gpu -> 2.60.0; our own images carry it in the tag: ...:0.1.0-ray2.60.0."""
    repo, _, tag = image.rpartition(":")
    if repo.split("/")[-2:] == ["rayproject", "ray"]:
        return tag.split("-")[0]
    found = re.search(r"ray-?(\d+\.\d+\.\d+)", tag)
    return found.group(1) if found else None


def strict(schema):
    """A CRD's openAPIV3Schema for jsonschema, with unknown fields forbidden (as kubectl's strict field validation
    does) and the x-kubernetes-* keys (CEL rules, list and map types) left out; int-or-string is already an anyOf."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_schema(path: Path, version: str = "v1") -> dict:
    crd = yaml.safe_load(path.read_text())
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return strict(served["schema"]["openAPIV3Schema"])
