"""The KubeRay manifests in k8s/ and the image in docker/, checked the way the cluster would check them (CPU, fast).

Every YAML file in k8s/ parses and opens with a comment. Each RayService passes the KubeRay CRD's schema (strictly:
an unknown field fails, as with kubectl's strict field validation) and the operator's own rules; its serveConfigV2
passes Ray Serve's config schema; each app's args pass our builder, and the app that Serve would build from them
takes its deployment overrides; the GPUs add up and every actor fits a pod; the head has no GPUs; secrets come from
Secrets; the checkpoint reaches every pod; the PodMonitor scrapes every Ray pod; and the Ray version is one
everywhere (rayVersion, image tags, the Dockerfile, pyproject.toml, the installed ray).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from gptoss_serve.bench.cluster_check import label_matches
from tests.k8s_cases import (GPU, K8S, REPO, cluster, containers, crd_schema, groups, image_ray_version,
                             load, manifest_paths, node_labels, ray_container, ray_resources)

SCHEMAS = K8S / "schemas"  # the vendored CRDs the tests validate against
# SHA-256 of the vendored CRDs, as copied from KubeRay (the commit is in k8s/schemas/README.md)
CRD_FILES = {
    "ray.io_rayservices.yaml": "0a8fc325e6e22b9231c1f282b309555e2ecf94227ca20a03df3d1d9a403907ab",
    "ray.io_rayclusters.yaml": "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1",
}
DOCKERFILE = REPO / "docker" / "Dockerfile"
# checkpoint name -> gptoss_serve.model.synthetic preset (its shapes)
PRESETS = {"gpt-oss-20b": "20b", "gpt-oss-120b": "120b"}
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}  # the operator's; the CRD says string
MAX_RAYSERVICE_NAME = 47  # KubeRay: 53 for a RayCluster, less the 6 characters it appends
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
SECRET_ENV = re.compile(r"TOKEN|PASSWORD|SECRET|CREDENTIAL|_KEY$", re.I)
SHORT_NAMES = {"PersistentVolumeClaim": "pvc"}  # kubectl's, allowed as the <kind> of a file name

MANIFESTS = manifest_paths()
DOCS = {path: load(path) for path in MANIFESTS}  # a file that does not parse has none: the first test reports it
RAYSERVICES = [pytest.param(d, id=p.name) for p, docs in DOCS.items() for d in docs
               if isinstance(d, dict) and d.get("kind") == "RayService"]
PODMONITORS = [d for docs in DOCS.values() for d in docs if isinstance(d, dict) and d.get("kind") == "PodMonitor"]


def serve_apps(svc: dict) -> list[dict]:
    return yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]


def app_args(app: dict) -> dict:
    return app.get("args") or {}


def build(app: dict, model_dir: Path) -> dict:
    """{deployment name: Deployment} as Serve builds the app from import_path and args. The model is replaced by a
    config.json of the same shapes (gptoss_serve.model.synthetic's preset), so nothing is downloaded or read from
    /models."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    from gptoss_serve.model.synthetic import preset_config

    args = dict(app_args(app))
    if args.get("model"):
        name = Path(args["model"]).name
        assert name in PRESETS, f"model {args['model']!r}: unknown shapes; add it to PRESETS in this test"
        (model_dir / name).mkdir(exist_ok=True)
        (model_dir / name / "config.json").write_text(json.dumps(preset_config(PRESETS[name]).to_dict()))
        args["model"] = str(model_dir / name)
    module, attr = app["import_path"].split(":")
    application = call_user_app_builder_with_args_if_necessary(getattr(importlib.import_module(module), attr), args)
    return {d.name: d for d in build_app(application, name=app["name"]).deployments}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[str, dict] = {}

    def get(app: dict) -> dict:
        key = json.dumps(app, sort_keys=True)
        if key not in cache:
            cache[key] = build(app, tmp_path_factory.mktemp("model"))
        return cache[key]
    return get


def actors(app: dict, deployments: dict) -> list[tuple[str, dict[str, float], dict[str, str]]]:
    """(what, Ray resources, label selector) of every actor the app may run at its largest: each deployment at its
    max replicas (the config's overrides applied as Serve applies them), then the MoE workers' bundles."""
    from gptoss_serve.deployments.builder import parse_args

    overrides = {o["name"]: o for o in app.get("deployments", [])}
    found = []
    for name, deployment in deployments.items():
        override = overrides.get(name, {})
        options = override.get("ray_actor_options", deployment.ray_actor_options or {})  # replaced, not merged
        scaling = override.get("autoscaling_config") or deployment._deployment_config.autoscaling_config
        replicas = (scaling["max_replicas"] if isinstance(scaling, dict) else scaling.max_replicas) if scaling \
            else override.get("num_replicas", deployment.num_replicas)
        found += [(f"{name} replica", {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0)},
                   options.get("label_selector") or {})] * replicas
    args = parse_args(app_args(app))
    moe = {"CPU": max(args.num_cpus_per_moe_worker, 0.01), "GPU": args.num_gpus_per_moe_worker}
    return found + [("MoE worker", moe, {})] * args.num_moe_workers


def fits(free: dict[str, float], need: dict[str, float]) -> bool:
    return all(free[k] >= v - 1e-9 for k, v in need.items())


# ---- every manifest ------------------------------------------------------------------------------------------------

def test_there_are_manifests():
    assert RAYSERVICES and PODMONITORS, "k8s/ should hold the RayServices and the PodMonitor"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_parses_and_says_what_it_shows(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, "no document"
    for doc in docs:
        assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get(
            "name"), f"every document needs apiVersion, kind and metadata.name: {str(doc)[:80]}"
    assert path.read_text().startswith("#"), "open with a comment that says what the manifest shows"
    kind, _, variant = path.name.removesuffix(".yaml").partition(".")
    assert kind in (docs[0]["kind"].lower(), SHORT_NAMES.get(docs[0]["kind"])) and variant, \
        "name it <kind>.<variant>.yaml, after its first document"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_gpu_requests_equal_limits(path):
    for c in containers(DOCS[path]):
        requests, limits = c.get("resources", {}).get("requests", {}), c.get("resources", {}).get("limits", {})
        for key in (set(requests) | set(limits)) & {GPU, "amd.com/gpu"}:
            assert str(requests.get(key)) == str(limits.get(key)), f"{c['name']}: {key} requests {requests.get(key)} " \
                                                                   f"!= limits {limits.get(key)}"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_secrets_come_from_secret_refs(path):
    for c in containers(DOCS[path]):
        for env in c.get("env", []):
            if SECRET_ENV.search(env["name"]):
                assert "value" not in env and env.get("valueFrom", {}).get("secretKeyRef", {}).get("name"), \
                    f"{c['name']}: {env['name']} must come from a Secret (valueFrom.secretKeyRef)"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_images_carry_the_installed_ray_version(path):
    images = [c["image"] for c in containers(DOCS[path])]
    images += [d["spec"]["rayClusterConfig"].get("autoscalerOptions", {}).get("image") for d in DOCS[path]
               if d.get("kind") == "RayService"]
    for image in filter(None, images):
        assert image_ray_version(image) == ray.__version__, f"{image}: its tag must carry Ray {ray.__version__}"


# ---- the image -----------------------------------------------------------------------------------------------------

def test_dockerfile_builds_on_the_installed_ray():
    bases = re.findall(r"^FROM\s+(?:--\S+\s+)*(\S+)", DOCKERFILE.read_text(), flags=re.M | re.I)
    assert bases and bases[-1].rpartition(":")[0].endswith("rayproject/ray"), "build on a rayproject/ray image"
    assert image_ray_version(bases[-1]) == ray.__version__, f"{bases[-1]}: not Ray {ray.__version__}"


def test_pyproject_pins_the_installed_ray():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if re.match(r"ray(\[[^]]*])?\s*==", d)]
    assert pins and all(p.split("==")[1].strip() == ray.__version__ for p in pins), pins


@pytest.mark.parametrize("name", CRD_FILES)
def test_vendored_crd_is_the_recorded_one(name):
    """k8s/schemas is authoritative and checked in every checkout: moving to a newer operator means its files, its
    commit in k8s/schemas/README.md and its digests in CRD_FILES, together."""
    assert (SCHEMAS / name).is_file(), f"k8s/schemas/{name} missing"
    assert hashlib.sha256((SCHEMAS / name).read_bytes()).hexdigest() == CRD_FILES[name], \
        f"k8s/schemas/{name} is not the recorded KubeRay CRD: restore it, or record the new one's digest"


# ---- each RayService -----------------------------------------------------------------------------------------------

FORMATS = jsonschema.FormatChecker()
FORMATS.checks("int32")(lambda v: not isinstance(v, int) or -2**31 <= v < 2**31)
FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -2**63 <= v < 2**63)


@functools.cache
def rayservice_validator() -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(crd_schema(SCHEMAS / "ray.io_rayservices.yaml"), format_checker=FORMATS)


@pytest.mark.parametrize("svc", RAYSERVICES)
def test_rayservice_passes_the_crd_schema(svc):
    assert svc["apiVersion"] == "ray.io/v1"
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
              for e in rayservice_validator().iter_errors(svc)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("svc", RAYSERVICES)
def test_rayservice_passes_the_operator_rules(svc):
    name = svc["metadata"]["name"]
    assert DNS_1035.match(name) and len(name) <= MAX_RAYSERVICE_NAME, f"{name}: a DNS-1035 label of <= 47 characters"
    upgrade = svc["spec"].get("upgradeStrategy", {})
    assert upgrade.get("type") in UPGRADE_TYPES, f"spell out upgradeStrategy.type, one of {sorted(UPGRADE_TYPES)}"
    if upgrade["type"] == "NewClusterWithIncrementalUpgrade":
        assert cluster(svc).get("enableInTreeAutoscaling") and upgrade.get("clusterUpgradeOptions")
    for group_name, group in groups(svc):
        params = group.get("rayStartParams", {})
        assert not (group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & params.keys()), \
            f"{group_name}: resources both in rayStartParams and in the group's resources"
        assert "labels" not in params, f"{group_name}: Ray node labels go in the group's `labels`"
    if ft := cluster(svc).get("gcsFaultToleranceOptions"):
        head = cluster(svc)["headGroupSpec"]
        assert ft.get("redisAddress") and "redis-password" not in head.get("rayStartParams", {})
        assert not {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS"} & {e["name"] for e in ray_container(head).get("env", [])}
        assert "value" not in ft.get("redisPassword", {}) and ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"]
        assert "ray.io/ft-enabled" not in svc["metadata"].get("annotations", {})


@pytest.mark.parametrize("svc", RAYSERVICES)
def test_rayversion_is_the_installed_ray(svc):
    assert cluster(svc)["rayVersion"] == ray.__version__


@pytest.mark.parametrize("svc", RAYSERVICES)
def test_head_has_no_gpus(svc):
    head = cluster(svc)["headGroupSpec"]
    assert head.get("rayStartParams", {}).get("num-gpus") == "0", 'set num-gpus: "0" in the head\'s rayStartParams'
    for c in containers(head["template"]):
        assert not any(k.endswith("/gpu") for part in c.get("resources", {}).values() for k in part), c["name"]


@pytest.mark.parametrize("svc", RAYSERVICES)
def test_serve_config_passes_the_serve_schema(svc):
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    serve_run = {a["import_path"] for a in yaml.safe_load((REPO / "config.yaml").read_text())["applications"]}
    assert {a.import_path for a in config.applications} <= serve_run, "run the app that `serve run config.yaml` runs"


@pytest.mark.parametrize("svc", RAYSERVICES)
def test_app_args_pass_the_builder(svc):
    from gptoss_serve.deployments.builder import parse_args

    for app in serve_apps(svc):
        parse_args(app_args(app))


@pytest.mark.parametrize("svc", RAYSERVICES)
def test_deployment_overrides_fit_the_built_app(svc, built):
    for app in serve_apps(svc):
        deployments, args = built(app), app_args(app)
        for override in app.get("deployments", []):
            name = override["name"]
            assert name in deployments, f"{name}: no such deployment; the app has {sorted(deployments)}"
            if "ray_actor_options" in override:  # Serve replaces the builder's options whole: restate them all
                code, given = deployments[name].ray_actor_options or {}, override["ray_actor_options"]
                drift = {k: {"builder": v, "manifest": given.get(k)} for k, v in code.items() if given.get(k) != v}
                assert not drift, f"{name}.ray_actor_options drops or changes the builder's: {drift}"
            if (scaling := override.get("autoscaling_config")) and name == "AttentionReplica":
                assert scaling["min_replicas"] <= args.get("num_attention_replicas", 1) <= scaling["max_replicas"]
                assert cluster(svc).get("enableInTreeAutoscaling"), "Serve scales replicas; let KubeRay scale pods"


@pytest.mark.parametrize("svc", RAYSERVICES)
def test_gpus_add_up_and_every_actor_fits_a_pod(svc, built):
    counts = {name: 1 if name == "head" else g["maxReplicas"] * g.get("numOfHosts", 1) for name, g in groups(svc)}
    for name, g in groups(svc)[1:]:
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], name
    wanted = [a for app in serve_apps(svc) for a in actors(app, built(app))]
    need = sum(r["GPU"] for _, r, _ in wanted)
    have = sum(counts[name] * ray_resources(g)["GPU"] for name, g in groups(svc))
    assert need <= have, f"the app may use {need} GPUs; the worker groups offer {have} at maxReplicas"
    pods = [{"what": f"{name} pod", "free": ray_resources(g), "labels": node_labels(name, g)}
            for name, g in groups(svc) for _ in range(min(counts[name], len(wanted)))]
    for what, res, selector in sorted(wanted, key=lambda a: (-a[1]["GPU"], -a[1]["CPU"])):
        pod = next((p for p in pods if label_matches(selector, p["labels"]) and fits(p["free"], res)), None)
        assert pod, f"{what} {res} {selector or ''} fits no pod left: " + str([(p['what'], p['free']) for p in pods])
        pod["free"] = {k: v - res.get(k, 0) for k, v in pod["free"].items()}


@pytest.mark.parametrize("svc", RAYSERVICES)
def test_moe_workers_and_attention_replicas_keep_to_their_groups(svc, built):
    gpu_groups = [(n, g) for n, g in groups(svc)[1:] if ray_resources(g)["GPU"]]
    for app in serve_apps(svc):
        workers = [r for what, r, _ in actors(app, built(app)) if what == "MoE worker"]
        if not workers or len(gpu_groups) < 2:
            continue
        selectors = [s for what, _, s in actors(app, built(app)) if what == "AttentionReplica replica"]
        selector = selectors[0] if selectors else {}
        ours = [n for n, g in gpu_groups if label_matches(selector, node_labels(n, g))]
        assert ours and len(ours) < len(gpu_groups), f"AttentionReplica's label selector {selector} should pick " \
                                                     f"its own GPU groups out of {[n for n, _ in gpu_groups]}"
        for n, g in gpu_groups:
            if n in ours:
                assert not fits(ray_resources(g), workers[0]), f"a MoE worker {workers[0]} fits an `{n}` pod"


@pytest.mark.parametrize("svc", RAYSERVICES)
def test_the_checkpoint_reaches_every_pod(svc):
    for app in serve_apps(svc):
        args = app_args(app)
        model = args.get("model")
        if model and model.startswith("/"):  # the builder, the ExpertPool and the replicas may run on any pod
            for name, group in groups(svc):
                mounts = [m["mountPath"] for m in ray_container(group).get("volumeMounts", [])]
                assert any(Path(model).is_relative_to(m) for m in mounts), f"{name}: nothing mounted at {model}"
        elif model:  # a hub id: each replica downloads it
            assert not args.get("num_moe_workers"), "MoE workers need the checkpoint at one path on every pod: " \
                                                    "mount a volume (the ExpertPool hands its local path over)"
            for name, group in groups(svc)[1:]:
                env = {e["name"]: e for e in ray_container(group).get("env", [])}
                assert env.get("HF_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef"), f"{name}: HF_TOKEN"


@pytest.mark.parametrize("svc", RAYSERVICES)
def test_the_podmonitor_scrapes_every_ray_pod(svc):
    for monitor in PODMONITORS:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["selector"]["matchLabels"] and monitor["spec"]["podMetricsEndpoints"]
    for name, group in groups(svc):
        labels = group["template"].get("metadata", {}).get("labels", {})
        ports = {p.get("name"): p["containerPort"] for p in ray_container(group).get("ports", [])}
        metrics_port = int(group.get("rayStartParams", {}).get("metrics-export-port", 8080))
        assert any(monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
                   and all(ports.get(e["port"]) == metrics_port for e in monitor["spec"]["podMetricsEndpoints"])
                   for monitor in PODMONITORS), f"{name}: no PodMonitor selects its pods at port {metrics_port}"


def test_the_scenarios_are_all_there():
    """The deliverables: gpt-oss-20b colocated and with MoE workers, gpt-oss-120b with MoE workers; the checkpoint
    from the hub and from a PVC; head fault tolerance with an external Redis."""
    seen = set()
    for svc in (param.values[0] for param in RAYSERVICES):
        for app in serve_apps(svc):
            args = app.get("args") or {}
            seen.add(f"{Path(args.get('model', '')).name} {'moe' if args.get('num_moe_workers') else 'colocated'}")
            seen.add("path" if args.get("model", "").startswith("/") else "hub" if args.get("model") else "default")
        volumes = [v for _, g in groups(svc) for v in g["template"]["spec"].get("volumes", [])]
        seen |= {"pvc"} if any("persistentVolumeClaim" in v for v in volumes) else set()
        seen |= {"redis"} if cluster(svc).get("gcsFaultToleranceOptions", {}).get("redisAddress") else set()
    wanted = {"gpt-oss-20b colocated", "gpt-oss-20b moe", "gpt-oss-120b moe", "hub", "path", "pvc", "redis"}
    assert wanted <= seen, f"missing: {sorted(wanted - seen)}"


@pytest.mark.parametrize("svc", RAYSERVICES)
def test_api_keys_can_come_from_a_secret_on_every_pod(svc):
    """The ingress may run on any pod: each Ray container reads GPTOSS_API_KEYS from the optional Secret, so
    creating the Secret (and restarting) turns authentication on everywhere at once."""
    for name, group in groups(svc):
        env = {e["name"]: e for e in ray_container(group).get("env", [])}
        ref = env.get("GPTOSS_API_KEYS", {}).get("valueFrom", {}).get("secretKeyRef", {})
        assert ref.get("name") == "gptoss-api-keys" and ref.get("optional") is True, f"{name}: GPTOSS_API_KEYS"


def test_replicas_drain_before_they_go(tmp_path):
    """Shutdown, redeploys and scale-downs let requests in flight finish (up to drain_timeout_s) on every
    deployment that serves them."""
    app = {"name": "drain", "import_path": "gptoss_serve.deployments.builder:build_app",
           "args": {"drain_timeout_s": 42}}
    deployments = build(app, tmp_path)
    for name in ("OpenAIIngress", "BatchingRouter", "AttentionReplica"):
        assert deployments[name]._deployment_config.graceful_shutdown_timeout_s == 42, name
