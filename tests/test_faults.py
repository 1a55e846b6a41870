"""Faults under load, on 2 attention replicas sharing 2 MoE workers (expert_timeout_s 5): a MoE worker killed
(SIGKILL), a MoE worker stopped for 30 s (SIGSTOP, then SIGCONT), an attention replica killed (SIGKILL).

Each time, while a few streams run: the streams the fault hits fail (an error event or a 5xx) within
expert_timeout_s + 1 s, no client hangs, the streams it does not hit complete, and a request gets a 200 again
within 60 s.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from gptoss_serve.deployments.builder import ROUTING_STATS_PERIOD_S, build_app
from gptoss_serve.deployments.expert_pool import worker_name
from tests.completion_stream import CompletionStream, wait_until_streaming

APP = "gptoss-faults"
MODEL = "gpt-oss-faults"
EXPERT_TIMEOUT_S = 5.0
FAIL_WITHIN_S = EXPERT_TIMEOUT_S + 1
BACK_WITHIN_S = 60.0
MAX_TOKENS = 300  # long enough to be mid-stream when the fault comes, short enough for the others to finish


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_bf16):
    from ray import serve

    serve.run(build_app({"model": str(tiny_bf16), "served_model_name": MODEL, "num_attention_replicas": 2,
                         "num_moe_workers": 2, "num_cpus_per_moe_worker": 0.5, "num_cpus_per_replica": 0.5,
                         "expert_timeout_s": EXPERT_TIMEOUT_S,
                         "engine": {"max_model_len": 512, "num_kv_blocks": 256}}),
              name=APP, route_prefix="/faults")
    yield ray_cluster["http_url"] + "/faults"
    serve.delete(APP)


def start_streams(url: str, n: int, *, first: int = 0) -> list[CompletionStream]:
    streams = []
    for i in range(first, first + n):
        streams.append(CompletionStream(url, {"model": MODEL, "prompt": f"fault load {i}", "max_tokens": MAX_TOKENS,
                                              "temperature": 0, "ignore_eos": True}))
        time.sleep(0.3)  # one batch each, so that they spread over both replicas
    wait_until_streaming(streams)
    return streams


Streams = list[CompletionStream]


def check_outcomes(streams: Streams, fault_at: float) -> tuple[Streams, Streams]:
    """(failed, completed): every stream ended, the failed ones within the bound after the fault."""
    for s in streams:
        s.thread.join(timeout=90)
        assert not s.thread.is_alive(), f"stream {s.body['prompt']!r} hung after the fault"
    failed = [s for s in streams if not s.completed]
    print(f"\n{len(failed)} of {len(streams)} streams failed, {', '.join(f'{s.ended_at - fault_at:.2f}' for s in failed)}"
          f" s after the fault")
    for s in failed:
        assert s.error is not None and (s.status == 200 or s.status >= 500), (s.status, s.error)
        assert s.ended_at - fault_at < FAIL_WITHIN_S, \
            f"stream {s.body['prompt']!r} failed {s.ended_at - fault_at:.1f} s after the fault: {s.error}"
    return failed, [s for s in streams if s.completed]


def wait_for_service(url: str, fault_at: float) -> float:
    """Seconds from the fault until a request gets a 200 (each failure in the meantime is a 503)."""
    while True:
        r = httpx.post(url + "/v1/completions", timeout=60, json={"model": MODEL, "prompt": [1, 2, 3],
                                                                  "max_tokens": 4, "ignore_eos": True})
        if r.status_code == 200:
            print(f"a request got a 200 {time.monotonic() - fault_at:.1f} s after the fault")
            return time.monotonic() - fault_at
        assert r.status_code == 503, r.text
        assert time.monotonic() - fault_at < BACK_WITHIN_S, f"no service {BACK_WITHIN_S:.0f} s after the fault"
        time.sleep(0.5)


def worker_pid(index: int) -> int:
    import ray

    return ray.get(ray.get_actor(worker_name(APP, index)).ping.remote(), timeout=30)["pid"]


def test_killed_moe_worker(app):
    pid = worker_pid(0)
    streams = start_streams(app, 4)
    fault_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_for_service(app, fault_at)
    failed, _ = check_outcomes(streams, fault_at)
    assert failed, "no stream was hit by the lost worker"
    assert all("MoE worker" in s.error for s in failed), [s.error for s in failed]
    assert worker_pid(0) != pid  # Ray restarted it


def test_stopped_moe_worker(app):
    pid = worker_pid(1)
    streams = start_streams(app, 4)
    fault_at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for_service(app, fault_at)  # the pool kills the worker that stopped answering; Ray restarts it
        failed, _ = check_outcomes(streams, fault_at)
        assert failed, "no stream was hit by the stopped worker"
        time.sleep(max(0.0, fault_at + 30 - time.monotonic()))
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:  # killed and replaced meanwhile
            pass
    wait_for_service(app, fault_at)


def attention_replicas() -> list[str]:
    """The ids of the app's AttentionReplica actors alive now (Serve names each actor after its replica)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#AttentionReplica#"
    return [a["name"].removeprefix(prefix) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)]


def test_killed_attention_replica(app):
    from ray import serve

    handle = serve.get_deployment_handle("AttentionReplica", app_name=APP)
    replicas = attention_replicas()
    assert len(replicas) == 2, replicas
    def describe() -> list[dict]:
        return [handle.describe.remote(target_replica=r).result(timeout_s=30) for r in replicas]

    streams = start_streams(app, 4)
    described = describe()
    # The router spreads by the replicas' reports (every ROUTING_STATS_PERIOD_S) and the requests it sent since; on a
    # slow machine a burst can still land on one replica before a report: one more stream after each report.
    while not all(d["running"] for d in described) and len(streams) < 8:
        time.sleep(ROUTING_STATS_PERIOD_S + 0.5)
        streams += start_streams(app, 1, first=len(streams))
        described = describe()
    assert all(d["running"] for d in described), f"the streams did not spread over both replicas: {described}"
    victim = described[0]
    fault_at = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for_service(app, fault_at)
    failed, completed = check_outcomes(streams, fault_at)
    # the victim's streams fail; the other replica's complete
    assert len(failed) == victim["running"] and len(completed) == len(streams) - victim["running"], \
        [(s.completed, s.error) for s in streams]
    # Serve replaces the lost replica, and the new one's engine serves
    while len(fresh := [r for r in attention_replicas() if r not in replicas]) != 1 or \
            handle.describe.remote(target_replica=fresh[0]).result(timeout_s=30)["core_pid"] is None:
        assert time.monotonic() - fault_at < BACK_WITHIN_S, "the lost replica was not replaced"
        time.sleep(1)
    print(f"replaced {time.monotonic() - fault_at:.1f} s after the fault")
