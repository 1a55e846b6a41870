"""The shipped Grafana dashboard (k8s/grafana/gptoss-serve.json) asks only for series, and labels, that the app
exports (deployments/metrics.py), so no panel stays empty after a rename."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gptoss_serve.deployments.metrics import exported_series

DASHBOARD = Path(__file__).resolve().parent.parent / "k8s" / "grafana" / "gptoss-serve.json"


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


def test_every_query_names_a_series_the_app_exports():
    exported = exported_series()
    asked = {name for expr in queries() for name in re.findall(r"\bray_gptoss_\w+", expr)}
    assert len(asked) >= 12
    assert asked <= exported.keys(), sorted(asked - exported.keys())


def test_every_label_a_query_uses_is_on_its_series():
    exported = exported_series()
    for expr in queries():
        for name, selector in re.findall(r"\b(ray_gptoss_\w+)\{([^}]*)\}", expr):
            used = set(re.findall(r"(\w+)\s*=~?", selector))
            assert used <= exported[name], (name, used - exported[name])
        for labels, name in re.findall(r"\bby \(([^)]*)\) \((?:rate\()?(ray_gptoss_\w+)", expr):
            used = {label.strip() for label in labels.split(",")}
            assert used <= exported[name], (name, used - exported[name])
    # vLLM's names and its model_name label, under our prefix (its users' dashboards and alerts carry over)
    for series in ("ray_gptoss_time_to_first_token_seconds_bucket", "ray_gptoss_inter_token_latency_seconds_bucket",
                   "ray_gptoss_e2e_request_latency_seconds_bucket", "ray_gptoss_kv_cache_usage_perc",
                   "ray_gptoss_prefix_cache_queries_total", "ray_gptoss_prefix_cache_hits_total",
                   "ray_gptoss_num_requests_running", "ray_gptoss_num_requests_waiting",
                   "ray_gptoss_request_success_total"):
        assert "model_name" in exported[series], series
    assert "finished_reason" in exported["ray_gptoss_request_success_total"]
