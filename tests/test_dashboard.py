"""The shipped Grafana dashboard (k8s/grafana/gptoss-serve.json) asks only for series, and labels, that the app
exports (deployments/metrics.py), so no panel stays empty after a rename; vLLM's request series keep its buckets."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ray.util.metrics import Counter, Histogram, Metric

from gptoss_serve.deployments.metrics import ReplicaMetrics, exported_series

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


# vLLM's buckets (its PrometheusStatLogger), the per-request token counts' for gpt-oss's 131,072-token max_model_len
VLLM_PHASE_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                      480.0, 960.0, 1920.0, 7680.0]
VLLM_TOKEN_COUNT_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]
VLLM_STEP_TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
# vLLM's request phases, per-request token counts and tokens per step, under our prefix -> their buckets
VLLM_REQUEST_HISTOGRAMS = {
    "ray_gptoss_request_queue_time_seconds": VLLM_PHASE_BUCKETS,
    "ray_gptoss_request_prefill_time_seconds": VLLM_PHASE_BUCKETS,
    "ray_gptoss_request_decode_time_seconds": VLLM_PHASE_BUCKETS,
    "ray_gptoss_request_prompt_tokens": VLLM_TOKEN_COUNT_BUCKETS,
    "ray_gptoss_request_generation_tokens": VLLM_TOKEN_COUNT_BUCKETS,
    "ray_gptoss_iteration_tokens_total": VLLM_STEP_TOKEN_BUCKETS,
}


def test_vllms_request_series_are_exported_with_its_buckets_and_charted():
    metrics = {f"ray_{m._name}": m for m in vars(ReplicaMetrics(model="", replica="")).values()
               if isinstance(m, Metric)}
    exported, asked = exported_series(), " ".join(queries())
    for name, buckets in VLLM_REQUEST_HISTOGRAMS.items():
        assert isinstance(metrics[name], Histogram) and metrics[name].boundaries == buckets, name
        assert exported[name + "_bucket"] == {"model_name", "replica", "le"}, name
        assert f"{name}_bucket{{" in asked, name  # a panel charts its quantiles
    preemptions = "ray_gptoss_num_preemptions"  # a counter, as vLLM's
    assert isinstance(metrics[preemptions], Counter) and exported[preemptions + "_total"] == {"model_name", "replica"}
    assert f"rate({preemptions}_total{{" in asked
