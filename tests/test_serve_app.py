"""The Serve application on the tiny model, driven over real HTTP: one app for the whole module."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from gptoss_serve.deployments.builder import build_app

MODEL = "gpt-oss"
ARGS = {"served_model_name": MODEL, "num_attention_replicas": 1, "max_ongoing_requests": 6,
        "max_queued_requests": 0, "engine": {"max_model_len": 512, "num_kv_blocks": 256}}


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory, tiny_bf16):
    from ray import serve

    serve.run(build_app({**ARGS, "model": str(tiny_bf16)}), name="gptoss", route_prefix="/")
    yield ray_cluster["http_url"]
    serve.delete("gptoss")


def post(url: str, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120, **kw)


def sse(url: str, path: str, body: dict) -> list[dict]:
    events = []
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
    assert events[-1] == "[DONE]"
    return events[:-1]


def chat(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 12,
            "temperature": 0, **extra}


def test_models_and_health(app):
    assert httpx.get(app + "/health").json() == {"status": "ok"}
    assert [m["id"] for m in httpx.get(app + "/v1/models").json()["data"]] == [MODEL]


def test_chat_completion(app):
    body = post(app, "/v1/chat/completions", chat(ignore_eos=True)).json()
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 12
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 12
    # greedy: the same request gives the same answer, streamed or not
    again = post(app, "/v1/chat/completions", chat(ignore_eos=True)).json()["choices"][0]["message"]
    assert again == choice["message"]
    events = sse(app, "/v1/chat/completions", chat(ignore_eos=True, stream_options={"include_usage": True}))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    streamed = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert streamed == (choice["message"]["content"] or "")
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 12
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_completions_text_and_token_ids(app):
    text = post(app, "/v1/completions", {"model": MODEL, "prompt": "Hello there", "max_tokens": 6,
                                         "temperature": 0, "ignore_eos": True, "logprobs": 2}).json()
    choice = text["choices"][0]
    assert text["object"] == "text_completion" and text["usage"]["completion_tokens"] == 6
    assert len(choice["logprobs"]["tokens"]) == 6 and all(len(t) == 2 for t in choice["logprobs"]["top_logprobs"])
    from gptoss_serve.model.tokenizer import load_tokenizer

    ids = load_tokenizer().encode("Hello there")
    by_ids = post(app, "/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 6, "temperature": 0,
                                           "ignore_eos": True}).json()
    assert by_ids["choices"][0]["text"] == choice["text"]
    events = sse(app, "/v1/completions", {"model": MODEL, "prompt": [ids, ids], "max_tokens": 6, "temperature": 0,
                                          "ignore_eos": True})
    for index in (0, 1):
        assert "".join(c["text"] for e in events for c in e["choices"] if c["index"] == index) == choice["text"]


def test_n_choices_and_seed(app):
    body = post(app, "/v1/chat/completions", chat(n=3, temperature=1.0, seed=7, ignore_eos=True)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2] and body["usage"]["completion_tokens"] == 36
    again = post(app, "/v1/chat/completions", chat(n=3, temperature=1.0, seed=7, ignore_eos=True)).json()
    assert [c["message"] for c in again["choices"]] == [c["message"] for c in body["choices"]]


def test_tools_and_tool_results(app):
    """A tool call and its result in the history render and run over HTTP. Random weights answer anything: that
    a tool call comes back parsed is checked in-process on a scripted model (test_tool_calls.py)."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"}]
    r = post(app, "/v1/chat/completions", {"model": MODEL, "messages": messages, "tools": tools, "max_tokens": 5,
                                          "reasoning_effort": "low"})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


def test_concurrent_clients(app):
    results: list[dict] = []

    def one(i: int) -> None:
        results.append(post(app, "/v1/completions", {"model": MODEL, "prompt": f"Count {i}", "max_tokens": 10,
                                                     "temperature": 0, "ignore_eos": True}).json())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 5 and all(r["usage"]["completion_tokens"] == 10 for r in results), results


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", chat(temperature=-1), 400, "temperature"),
    ("/v1/chat/completions", chat(top_p=0), 400, "top_p"),
    ("/v1/chat/completions", {"model": MODEL, "max_tokens": 3}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/completions", {"model": MODEL, "prompt": [300000]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": list(range(600))}, 400, "prompt"),  # over max_model_len 512
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "model"),
])
def test_errors_in_openai_shape(app, path, body, status, param):
    r = post(app, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert "Traceback" not in r.text


def replica_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("AttentionReplica", app_name="gptoss").describe.remote().result()


def wait_until_idle(timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = replica_stats()
        if stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_blocks_in_use"] == 0:
            return stats
        assert time.monotonic() < deadline, f"replica never went idle: {stats}"
        time.sleep(0.5)


def test_client_disconnect_aborts_and_frees_blocks(app):
    with httpx.stream("POST", app + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "go on", "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data: "))
    # the connection is closed here, mid-stream: the request must stop and give its blocks back
    wait_until_idle()


def leave_once_running(url: str, body: dict, sequences: int) -> None:
    """Sends a non-streamed completion request on a bare connection, and closes it unanswered once the replica runs
    `sequences` sequences (the request has reached the engine, it is not on its way there)."""
    address = httpx.URL(url)
    payload = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {address.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n")
    with socket.create_connection((address.host, address.port)) as connection:
        connection.sendall(head.encode() + payload)
        deadline = time.monotonic() + 60
        while replica_stats()["running"] < sequences:
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.05)


def aborted_requests(metrics_url: str) -> float:
    """Requests the engine stopped while they ran because their client left (finished_reason "abort")."""
    return sum(value for name, labels, value in scrape_samples(metrics_url, MODEL)
               if name == "ray_gptoss_request_success_total" and labels.get("finished_reason") == "abort")


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_from_a_multi_choice_request_aborts_all_choices(app, ray_cluster, stream):
    """n=2 and a client that leaves early: both choices are stopped mid-way (counted as aborted, not run to their
    400 tokens), their blocks go back, and nothing wedges: the next request is answered (this once left the router
    spinning, every later request slow)."""
    metrics = ray_cluster["metrics_url"]
    wait_until_idle()
    time.sleep(12)  # earlier requests' counts reach the exporter first
    before = aborted_requests(metrics)
    body = {"model": MODEL, "prompt": "Hello", "n": 2, "max_tokens": 400, "ignore_eos": True, "stream": stream}
    if stream:
        with httpx.stream("POST", app + "/v1/completions", timeout=60, json=body) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(line for line in lines if line.startswith("data: "))
    else:
        leave_once_running(app, body, sequences=2)
    wait_until_idle()
    deadline = time.monotonic() + 45  # the exporter's period, and then some
    while (aborted := aborted_requests(metrics)) < before + 2 and time.monotonic() < deadline:
        time.sleep(2)
    assert aborted == before + 2
    assert post(app, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 4}).status_code == 200


def test_many_disconnects_at_once_free_everything(app):
    """Clients that all leave after their first token (half of them with n=2): every request is stopped."""
    import asyncio

    async def leave_after_first(client, n):
        body = {"model": MODEL, "prompt": "go", "n": n, "max_tokens": 400, "ignore_eos": True, "stream": True}
        async with client.stream("POST", app + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return r.status_code

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            # 6 at a time fit max_ongoing_requests; 5 waves of them
            for _ in range(5):
                statuses = await asyncio.gather(*(leave_after_first(client, 1 + i % 2) for i in range(6)))
                assert statuses == [200] * 6

    asyncio.run(main())
    wait_until_idle(timeout=5)
    assert post(app, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 4}).status_code == 200


def test_full_queue_gets_429_with_retry_after(app):
    """max_ongoing_requests 6 + max_queued_requests 0: a seventh concurrent request is turned away."""
    streams = [httpx.stream("POST", app + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "hold", "max_tokens": 400, "ignore_eos": True, "stream": True}) for _ in range(6)]
    opened = [s.__enter__() for s in streams]
    readers = [r.iter_lines() for r in opened]  # kept referenced: a collected reader would close its stream
    try:
        for lines in readers:
            next(line for line in lines if line.startswith("data: "))
        r = post(app, "/v1/completions", {"model": MODEL, "prompt": "one more", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        for s in streams:
            s.__exit__(None, None, None)
    wait_until_idle()


def scrape_samples(url: str, model: str) -> list[tuple[str, dict, float]]:
    """(name, labels, value) of our series for one served model."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(httpx.get(url, timeout=10).text)
            for sample in family.samples
            if sample.name.startswith("ray_gptoss_") and sample.labels.get("model_name") == model]


def scrape(url: str) -> dict[str, float]:
    """Sums each metric over its label sets (one replica here)."""
    totals: dict[str, float] = {}
    for name, _, value in scrape_samples(url, MODEL):
        totals[name] = totals.get(name, 0.0) + value
    return totals


def wait_for_counters(url: str, before: dict, expected: dict, timeout: float = 45) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        after = scrape(url)
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in expected}
        if delta == expected or time.monotonic() > deadline:
            return delta
        time.sleep(2)


def test_metrics_agree_with_responses(app, ray_cluster):
    wait_until_idle()
    time.sleep(12)  # let every earlier request's counts reach the exporter
    before = scrape(ray_cluster["metrics_url"])
    prompt = completion = 0
    for i in range(3):
        usage = post(app, "/v1/completions", {"model": MODEL, "prompt": f"metric {i}", "max_tokens": 7,
                                              "ignore_eos": True}).json()["usage"]
        prompt, completion = prompt + usage["prompt_tokens"], completion + usage["completion_tokens"]
    expected = {"ray_gptoss_generation_tokens_total": completion, "ray_gptoss_prompt_tokens_total": prompt,
                # vLLM's per-request histograms, one observation a request (Ray exports a histogram's sum from its
                # buckets' midpoints: only its count is exact)
                **{f"ray_gptoss_request_{name}_count": 3 for name in (
                    "prompt_tokens", "generation_tokens", "queue_time_seconds", "prefill_time_seconds",
                    "decode_time_seconds")}}
    assert wait_for_counters(ray_cluster["metrics_url"], before, expected) == expected
    after = scrape(ray_cluster["metrics_url"])
    for name in ("ray_gptoss_time_to_first_token_seconds_count", "ray_gptoss_e2e_request_latency_seconds_count",
                 "ray_gptoss_router_batch_size_count", "ray_gptoss_kv_cache_usage_perc",
                 "ray_gptoss_num_requests_running", "ray_gptoss_iteration_tokens_total_bucket"):
        assert name in after, name


def test_load_generator_figures_agree_with_the_server(app, ray_cluster):
    """A short bounded load through gptoss_serve.bench.loadtest; its token totals equal the server's Prometheus counters."""
    import asyncio

    from gptoss_serve.bench.loadtest import LoadConfig, run_load

    wait_until_idle()
    time.sleep(12)  # earlier requests' counts reach the exporter first
    before = scrape(ray_cluster["metrics_url"])
    result = asyncio.run(run_load(LoadConfig(url=app, endpoint="completions", model=MODEL, concurrency=3,
                                             num_requests=6, input_len=16, output_len=8, timeout=60)))
    assert result.completed == 6 and result.failed == 0, result.errors_by_status
    assert result.total_output_tokens == 6 * 8
    assert result.ttft.median > 0 and result.tpot.median > 0 and result.output_throughput > 0
    delta = wait_for_counters(ray_cluster["metrics_url"], before, {
        "ray_gptoss_generation_tokens_total": result.total_output_tokens,
        "ray_gptoss_prompt_tokens_total": result.total_input_tokens})
    assert delta == {"ray_gptoss_generation_tokens_total": result.total_output_tokens,
                     "ray_gptoss_prompt_tokens_total": result.total_input_tokens}


def test_conversation_load_runs_against_the_app(app):
    """The load generator's long-context workload through the app: chats under one system prompt, each turn sending
    the conversation so far (the answers as streamed) and a new message; the server's prompts grow turn by turn."""
    import asyncio

    from gptoss_serve.bench.loadtest import LoadConfig, run_load

    # one user, so that its turns come in a known order: a conversation of 3, then the first turn of the next
    result = asyncio.run(run_load(LoadConfig(url=app, model=MODEL, workload="conversation", concurrency=1,
                                             num_requests=4, system_prompt_len=64, turns=3, input_len=16,
                                             output_len=8, timeout=60)))
    assert result.completed == 4 and result.failed == 0, result.errors_by_status
    by_turn = result.to_json_dict()["by_turn"]
    assert [(t["turn"], t["completed"]) for t in by_turn] == [(1, 2), (2, 1), (3, 1)]
    prompts = [t["mean_input_tokens"] for t in by_turn]  # the server's usage.prompt_tokens
    assert 64 + 16 < prompts[0] < prompts[1] < prompts[2]
