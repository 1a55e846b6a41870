"""MoE workers the cluster cannot hold (16 CPUs each on the 8-CPU test cluster): the builder warns, the pool logs
what is missing and reports itself unhealthy, and requests get a 503 at once instead of waiting for ever."""

from __future__ import annotations

import glob
import logging
import os
import re
import time

import httpx
import pytest

from gptoss_serve.deployments.builder import build_app
from gptoss_serve.deployments.expert_pool import placement_state

APP = "gptoss-unplaced"
MODEL = "gpt-oss-unplaced"
ARGS = {"served_model_name": MODEL, "num_moe_workers": 2, "num_cpus_per_moe_worker": 16, "num_cpus_per_replica": 0.5,
        "engine": {"max_model_len": 256, "num_kv_blocks": 64}}
RESOURCES_LOGGER = "gptoss_serve.deployments.resources"
INTERNALS = re.compile(r"\d+\.\d+\.\d+\.\d+|[0-9a-f]{16,}|actor|pid|Traceback|placement_group", re.IGNORECASE)


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_bf16):
    from ray import serve

    built = build_app({**ARGS, "model": str(tiny_bf16)})
    serve.run(built, name=APP, route_prefix="/unplaced")
    yield ray_cluster["http_url"] + "/unplaced"
    serve.delete(APP)


def test_builder_warns_when_the_cluster_cannot_hold_the_args(ray_cluster, tiny_bf16, caplog):
    def builder_warnings():
        # only the builder's own logger: the capture also holds whatever other loggers print meanwhile, such as
        # asyncio reporting an earlier test's event loop collected with its tasks pending
        return [r.getMessage() for r in caplog.records if r.name == RESOURCES_LOGGER]

    with caplog.at_level(logging.WARNING, logger=RESOURCES_LOGGER):
        build_app({**ARGS, "model": str(tiny_bf16)})
    # 2 workers x 16 CPUs + 0.5 each for ingress, router and replica, on 8 CPUs
    assert any("CPU 33.5 in all, the cluster has CPU 8; missing CPU 25.5" in m for m in builder_warnings())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=RESOURCES_LOGGER):
        build_app({**ARGS, "model": str(tiny_bf16), "num_cpus_per_moe_worker": 1})
    assert builder_warnings() == []


@pytest.mark.parametrize("stream", [False, True])
def test_requests_get_503_at_once_saying_the_workers_could_not_be_placed(app, stream):
    for _ in range(3):
        start = time.monotonic()
        r = httpx.post(app + "/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": "Hello", "max_tokens": 4, "stream": stream})
        assert time.monotonic() - start < 2, "a request waited for workers that have no place"
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "service_unavailable"
        assert "could not be placed" in error["message"]
        assert not INTERNALS.search(error["message"]), error["message"]


def test_the_pool_reports_unhealthy_and_the_log_names_the_missing_resources(app):
    import ray
    from ray import serve

    pool = serve.get_deployment_handle("ExpertPool", app_name=APP)
    with pytest.raises(Exception, match="could not be placed.*missing: CPU 24"):  # 32 asked, 8 free at most
        pool.check_health.remote().result(timeout_s=30)
    deadline = time.monotonic() + 30
    while serve.status().applications[APP].deployments["ExpertPool"].status != "UNHEALTHY":
        assert time.monotonic() < deadline, serve.status().applications[APP].deployments["ExpertPool"]
        time.sleep(0.5)
    logs = os.path.join(ray._private.worker._global_node.get_logs_dir_path(), "serve")
    text = "".join(open(path).read() for path in glob.glob(os.path.join(logs, f"replica_{APP}_*.log")))
    assert "2 MoE workers ask for CPU 16 each (CPU 32 in all)" in text and "missing: CPU 24" in text
    assert placement_state(APP) == "PENDING"


def test_deleting_the_app_removes_its_placement_group(app):
    from ray import serve

    serve.delete(APP)
    deadline = time.monotonic() + 30
    while placement_state(APP) is not None:
        assert time.monotonic() < deadline, "the MoE workers' placement group outlived its app"
        time.sleep(0.5)
