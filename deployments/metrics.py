"""Prometheus metrics of the app, through Ray's metrics agent (scraped at each node's metrics export port).

Named and labelled as vLLM names its own (`time_to_first_token_seconds`, `num_requests_running`,
`kv_cache_usage_perc`, `request_success` by `finished_reason`, ... with a `model_name` label), under our prefix, so
its users' queries carry over with `vllm:` turned into `ray_gptoss_`; the expert-parallel ones are ours. Ray
prefixes every name with `ray_` and counters get `_total`: `ray_gptoss_generation_tokens_total`, ... Each carries
`model_name` and `replica` (the Serve replica id). The README lists them; k8s/grafana/gptoss-serve.json charts them.

The request phases (queue, prefill, decode), the per-request token histograms, preemptions and tokens per step are
bucketed as vLLM buckets them, so its alerts' thresholds fall on bucket bounds here too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray.util.metrics import Counter, Gauge, Histogram, Metric

if TYPE_CHECKING:
    from gptoss_serve.cluster.engine_protocol import RequestOutput, RequestTimes

LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
# vLLM's request_latency_buckets, which its queue, prefill and decode times use
REQUEST_PHASE_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                         480.0, 960.0, 1920.0, 7680.0]
# vLLM's 1-2-5 buckets up to max_model_len, here gpt-oss's 131,072-token context: a Ray histogram's buckets are fixed
# when it is made, before the engine (and any smaller max_model_len) exists
TOKEN_COUNT_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000]
# vLLM's buckets of tokens per engine step
STEP_TOKEN_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
TAGS = ("model_name", "replica")


class ReplicaMetrics:
    """What an attention replica reports: load, tokens, latencies, cache."""

    def __init__(self, *, model: str, replica: str) -> None:
        self.tags = {"model_name": model, "replica": replica}
        self.running = Gauge("gptoss_num_requests_running", description="requests in the engine's running batch",
                             tag_keys=TAGS)
        self.waiting = Gauge("gptoss_num_requests_waiting", description="requests waiting for the engine",
                             tag_keys=TAGS)
        self.prompt_tokens = Counter("gptoss_prompt_tokens", description="prompt tokens of finished requests",
                                     tag_keys=TAGS)
        self.generation_tokens = Counter("gptoss_generation_tokens", description="tokens generated",
                                         tag_keys=TAGS)
        self.requests = Counter("gptoss_request_success", description="finished requests, by finished_reason "
                                "(stop, length, error, abort)", tag_keys=(*TAGS, "finished_reason"))
        self.ttft = Histogram("gptoss_time_to_first_token_seconds", description="arrival to first token",
                              boundaries=LATENCY_BUCKETS, tag_keys=TAGS)
        self.itl = Histogram("gptoss_inter_token_latency_seconds", description="time between two tokens",
                             boundaries=LATENCY_BUCKETS, tag_keys=TAGS)
        self.e2e = Histogram("gptoss_e2e_request_latency_seconds", description="arrival to last token",
                             boundaries=LATENCY_BUCKETS, tag_keys=TAGS)
        self.kv_usage = Gauge("gptoss_kv_cache_usage_perc", description="fraction of KV blocks in use (0 to 1)",
                              tag_keys=TAGS)
        self.prefix_queries = Counter("gptoss_prefix_cache_queries", description="prompt tokens looked up",
                                      tag_keys=TAGS)
        self.prefix_hits = Counter("gptoss_prefix_cache_hits", description="prompt tokens found in the cache",
                                   tag_keys=TAGS)
        self.engine_core_restarts = Counter(
            "gptoss_engine_core_restarts", description="engine cores lost and replaced, by reason (died: it exited; "
            "stalled: stuck past an expert deadline and killed)", tag_keys=(*TAGS, "reason"))
        # vLLM's request phases, timed by the engine core (RequestTimes): their sum is the request's time in the engine
        self.queue_time = Histogram("gptoss_request_queue_time_seconds", description="arrival in the engine to first "
                                    "scheduled", boundaries=REQUEST_PHASE_BUCKETS, tag_keys=TAGS)
        self.prefill_time = Histogram("gptoss_request_prefill_time_seconds", description="first scheduled to first "
                                      "token", boundaries=REQUEST_PHASE_BUCKETS, tag_keys=TAGS)
        self.decode_time = Histogram("gptoss_request_decode_time_seconds", description="first token to last token",
                                     boundaries=REQUEST_PHASE_BUCKETS, tag_keys=TAGS)
        self.request_prompt_tokens = Histogram("gptoss_request_prompt_tokens", description="prompt tokens of each "
                                               "finished request", boundaries=TOKEN_COUNT_BUCKETS, tag_keys=TAGS)
        self.request_generation_tokens = Histogram("gptoss_request_generation_tokens", description="tokens generated "
                                                   "for each finished request", boundaries=TOKEN_COUNT_BUCKETS,
                                                   tag_keys=TAGS)
        self.preemptions = Counter("gptoss_num_preemptions", description="sequences preempted (blocks freed, "
                                   "recomputed later) when the KV cache ran out", tag_keys=TAGS)
        self.kernel_compiles = Counter("gptoss_kernel_compiles", description="GPU kernel variants first needed "
                                       "after the engine's start-up, compiled (each stalls its step, and every request "
                                       "in it, for a second or more) or loaded from Triton's disk cache",
                                       tag_keys=TAGS)
        self.step_tokens = Histogram("gptoss_iteration_tokens_total", description="tokens (prefill and decode) per "
                                     "engine step", boundaries=STEP_TOKEN_BUCKETS, tag_keys=TAGS)

    def record_finished(self, out: RequestOutput, times: RequestTimes | None, *, step_time: float) -> None:
        """A finished request's token counts, and each of its phases whose two ends it reached (one that failed
        before its first token has no prefill or decode time). step_time: when the core took the step of `out`,
        the end of a request that the engine did not end with a last token (a stop string found beside it, a failed
        step)."""
        tags = self.tags
        self.request_prompt_tokens.observe(out.num_prompt_tokens, tags=tags)
        self.request_generation_tokens.observe(out.num_output_tokens, tags=tags)
        if times is None or not times.scheduled:
            return
        self.queue_time.observe(times.queue_time, tags=tags)
        if times.first_token:
            self.prefill_time.observe(times.prefill_time, tags=tags)
            # (max: the step's stamp is taken after the token's, but on a wall clock that NTP may step back)
            self.decode_time.observe(max(0.0, times.decode_time(times.last_token or step_time)), tags=tags)


class RouterMetrics:
    def __init__(self, *, model: str, replica: str) -> None:
        self.tags = {"model_name": model, "replica": replica}
        self.batch_size = Histogram("gptoss_router_batch_size", description="requests per router batch",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=TAGS)
        self.batch_wait = Histogram("gptoss_router_batch_wait_seconds",
                                    description="time a request waited for its batch to leave",
                                    boundaries=LATENCY_BUCKETS, tag_keys=TAGS)


class RoutingMetrics:
    """What a request router (PrefixAwareRouter, inside each caller of a deployment) decided. The prefix-cache hit
    rate per replica that these decisions buy is ReplicaMetrics' prefix_cache_hits / prefix_cache_queries."""

    def __init__(self, *, deployment: str) -> None:
        self.deployment = deployment
        self.decisions = Counter("gptoss_routing_decisions", description="batches routed, by reason: prefix (to a "
                                 "replica sent its prefix before), load (its holder was overloaded), no_match",
                                 tag_keys=("deployment", "reason"))


class ExpertMetrics:
    """Expert parallelism, seen from an attention replica: load balance, exchange latency and volume."""

    def __init__(self, *, model: str, replica: str) -> None:
        self.tags = {"model_name": model, "replica": replica}
        self.worker_tokens = Counter("gptoss_expert_tokens_dispatched", description="tokens sent to each MoE worker",
                                     tag_keys=(*TAGS, "worker"))
        self.expert_tokens = Counter("gptoss_expert_tokens_routed", description="(token, expert) pairs per expert",
                                     tag_keys=(*TAGS, "expert"))
        self.dispatch = Histogram("gptoss_expert_dispatch_seconds", description="routing and sending, per layer",
                                  boundaries=LATENCY_BUCKETS, tag_keys=TAGS)
        self.combine = Histogram("gptoss_expert_combine_seconds", description="waiting for experts, per layer",
                                 boundaries=LATENCY_BUCKETS, tag_keys=TAGS)
        self.step_bytes = Histogram("gptoss_expert_exchange_bytes_per_step", description="bytes sent + received",
                                    boundaries=[2**k for k in range(10, 34, 2)], tag_keys=TAGS)
        self.link_failures = Counter("gptoss_expert_link_failures", description="links to the MoE workers that "
                                     "failed (a worker died, hung or could not be reached) and were reset",
                                     tag_keys=TAGS)

    def record(self, stats) -> None:
        tags = self.tags
        for worker, n in enumerate(stats.tokens_per_worker):
            if n:
                self.worker_tokens.inc(n, tags={**tags, "worker": str(worker)})
        for expert, n in enumerate(stats.tokens_per_expert):
            if n:
                self.expert_tokens.inc(n, tags={**tags, "expert": str(expert)})
        for seconds in stats.dispatch_seconds:
            self.dispatch.observe(seconds, tags=tags)
        for seconds in stats.combine_seconds:
            self.combine.observe(seconds, tags=tags)
        for n in stats.step_bytes:
            self.step_bytes.observe(n, tags=tags)
        if stats.link_failures:
            self.link_failures.inc(stats.link_failures, tags=tags)


def exported_series() -> dict[str, set[str]]:
    """Every series the app can export, as Prometheus names it (Ray's `ray_` prefix, `_total` on counters,
    `_bucket`/`_sum`/`_count` on histograms) -> its labels. The dashboard's test checks its queries against it."""
    series: dict[str, set[str]] = {}
    groups = [group(model="", replica="") for group in (ReplicaMetrics, RouterMetrics, ExpertMetrics)]
    for group in [*groups, RoutingMetrics(deployment="")]:
        for metric in vars(group).values():
            if not isinstance(metric, Metric):
                continue
            name, labels = f"ray_{metric._name}", set(metric._tag_keys)
            if isinstance(metric, Counter):
                series[name + "_total"] = labels
            elif isinstance(metric, Histogram):
                series |= {name + "_bucket": labels | {"le"}, name + "_sum": labels, name + "_count": labels}
            else:
                series[name] = labels
    return series
