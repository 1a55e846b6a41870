"""2 attention replicas sharing 2 MoE workers over gloo: the same greedy tokens as colocated mode and HF
transformers, under concurrent HTTP requests; a lost worker fails its requests fast and comes back."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch

from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.deployments.builder import build_app
from gptoss_serve.deployments.expert_pool import worker_name
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer

APP = "gptoss-ep"
MODEL = "gpt-oss-ep"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_bf16):
    from ray import serve

    serve.run(build_app({"model": str(tiny_bf16), "served_model_name": MODEL, "num_attention_replicas": 2,
                         "num_moe_workers": 2, "num_cpus_per_moe_worker": 0.5, "num_cpus_per_replica": 0.5,
                         "expert_timeout_s": 3.0, "engine": {"max_model_len": 512, "num_kv_blocks": 256}}),
              name=APP, route_prefix="/ep")
    yield ray_cluster["http_url"] + "/ep"
    serve.delete(APP)


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 199_000, (n,), generator=gen).tolist() for n in (5, 37, 66, 12, 90, 41)]


def complete(url: str, prompt: list[int]) -> dict:
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
        "logprobs": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_same_tokens_as_colocated_and_transformers(app, tiny_bf16):
    ps = prompts()
    results: dict[int, list[int]] = {}
    tokenizer = load_tokenizer()

    def one(i: int) -> None:
        results[i] = complete(app, ps[i])["choices"][0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(ps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    model = load_model(tiny_bf16, dtype=torch.float32)
    colocated = LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=256, max_model_len=512)).generate(
        ps, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    transformers = pytest.importorskip("transformers")
    hf = transformers.GptOssForCausalLM.from_pretrained(tiny_bf16, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    for i, prompt in enumerate(ps):
        expected = colocated[i].token_ids
        assert results[i]["logprobs"]["tokens"] == [tokenizer.decode_bytes([t]).decode("utf-8", "replace")
                                                   for t in expected]
        assert results[i]["text"] == colocated[i].text
        reference = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert reference == expected


def test_exchange_metrics_per_worker_and_expert(app, ray_cluster):
    from tests.test_serve_app import scrape_samples

    complete(app, prompts()[2])
    deadline = time.monotonic() + 40
    while True:
        samples = scrape_samples(ray_cluster["metrics_url"], MODEL)
        workers = {labels["worker"] for name, labels, _ in samples
                   if name == "ray_gptoss_expert_tokens_dispatched_total"}
        experts = {labels["expert"] for name, labels, _ in samples if name == "ray_gptoss_expert_tokens_routed_total"}
        names = {name for name, _, _ in samples}
        if workers == {"0", "1"} and len(experts) > 1 and {
                "ray_gptoss_expert_dispatch_seconds_count", "ray_gptoss_expert_combine_seconds_count",
                "ray_gptoss_expert_exchange_bytes_per_step_count"} <= names:
            break
        assert time.monotonic() < deadline, (workers, experts, sorted(n for n in names if "expert" in n))
        time.sleep(2)


def test_lost_worker_fails_requests_fast_then_service_resumes(app, ray_cluster):
    import ray

    outcome: dict = {}

    def long_request() -> None:
        with httpx.stream("POST", app + "/v1/completions", timeout=120, json={
                "model": MODEL, "prompt": "keep going", "max_tokens": 450, "ignore_eos": True,
                "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    outcome.setdefault("chunks", 0)
                    outcome["chunks"] += 1
                    if "error" in event:
                        outcome["error"] = event["error"]
                        outcome["at"] = time.monotonic()
        outcome.setdefault("at", time.monotonic())

    thread = threading.Thread(target=long_request)
    thread.start()
    while outcome.get("chunks", 0) < 3:
        time.sleep(0.05)
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(worker_name(APP, 0)), no_restart=False)  # Ray restarts it with its shard
    thread.join(timeout=60)
    assert not thread.is_alive(), "the request hung after its worker died"
    assert "error" in outcome and "MoE worker" in outcome["error"]["message"]
    assert outcome["at"] - killed_at < 15

    # the worker comes back (Ray restarts it, it reloads its shard) and requests succeed again
    deadline = time.monotonic() + 90
    while True:
        r = httpx.post(app + "/v1/completions", timeout=60, json={"model": MODEL, "prompt": [1, 2, 3],
                                                                  "max_tokens": 4, "ignore_eos": True})
        if r.status_code == 200:
            break
        assert r.status_code == 503 and "MoE" in r.json()["error"]["message"], r.text
        assert time.monotonic() < deadline, "service did not resume"
        time.sleep(1)

    # operators see it: the link's failure is counted (the engine cores lived on: none was restarted)
    from tests.test_serve_app import scrape_samples

    deadline = time.monotonic() + 40
    while True:
        samples = scrape_samples(ray_cluster["metrics_url"], MODEL)
        failures = sum(v for name, _, v in samples if name == "ray_gptoss_expert_link_failures_total")
        restarts = sum(v for name, _, v in samples if name == "ray_gptoss_engine_core_restarts_total")
        if failures >= 1:
            break
        assert time.monotonic() < deadline, sorted({n for n, _, _ in samples})
        time.sleep(2)
    assert restarts == 0
    assert r.json()["usage"]["completion_tokens"] == 4
