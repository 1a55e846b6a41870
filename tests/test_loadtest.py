"""gptoss_serve.bench.loadtest against a fake OpenAI-compatible server on 127.0.0.1 whose timings and faults we choose.

The fake server streams one token per chunk: the first after FIRST_DELAY, the others TOKEN_DELAY apart, and
counts prompt tokens with the real tokenizer (each chat message's, plus CHAT_TEMPLATE_TOKENS), so every figure the
load generator reports can be checked against what the server did; it keeps every chat request's messages. The model
name picks the behaviour.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import statistics
import threading
import time
from collections import Counter
from itertools import islice

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gptoss_serve.bench.loadtest import (ConfigError, LoadConfig, UnsafeTargetError, Workload, check_target,
                                         make_prompt, parse_goodput, run_load)
from gptoss_serve.bench.loadtest.arrivals import arrival_gaps
from gptoss_serve.bench.loadtest.cli import main
from gptoss_serve.bench.loadtest.lengths import LengthSampler
from gptoss_serve.model.tokenizer import load_tokenizer

FIRST_DELAY = 0.05
TOKEN_DELAY = 0.004
CHAT_TEMPLATE_TOKENS = 7
ERROR_CYCLE = ("429", "missing_usage", "token_mismatch", "stream_error", "missing_done", "ok")

VLLM_KEYS = {
    "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput", "output_throughput",
    "total_token_throughput", "request_goodput", "duration", "max_concurrency", "request_rate", "burstiness",
    "num_prompts", "model_id", "backend", "date",
    *(f"{stat}_{name}_ms" for stat in ("mean", "median", "p99", "std") for name in ("ttft", "tpot", "itl", "e2el")),
}


# --------------------------------------------------------------------------- the fake server


def _fake_app(seen: Counter, chats: list) -> FastAPI:
    app = FastAPI()
    tok = load_tokenizer()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-ok", "object": "model"}, {"id": "fake-errors"}]}

    async def generate(request: Request, *, chat: bool):
        body = await request.json()
        model = body["model"]
        seen[model] += 1
        fault = ERROR_CYCLE[(seen[model] - 1) % len(ERROR_CYCLE)] if model == "fake-errors" else "ok"
        if fault == "429":
            return JSONResponse({"error": {"message": "too many requests", "code": 429}}, status_code=429)
        n = body["max_tokens"]
        if chat:
            chats.append(body["messages"])
            prompt_tokens = sum(len(tok.encode(m["content"])) for m in body["messages"]) + CHAT_TEMPLATE_TOKENS
        else:
            chats.append(body["prompt"])
            prompt_tokens = len(tok.encode(body["prompt"]))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n + (fault == "token_mismatch")}
        if chat:  # a prefix cache that held everything before the last message
            last = len(tok.encode(body["messages"][-1]["content"]))
            usage["prompt_tokens_details"] = {"cached_tokens": prompt_tokens - last}

        def chunk(i: int) -> dict:
            if not chat:
                return {"choices": [{"index": 0, "text": f" t{i}"}]}
            # a reasoning model streams its analysis first: both kinds of text are output
            key = "reasoning_content" if i < 2 else "content"
            return {"choices": [{"index": 0, "delta": {key: f" t{i}"}}]}

        async def stream():
            if chat:
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            if model == "fake-slow":
                await asyncio.sleep(2.0)
            if model == "fake-malformed":
                yield "this is not server-sent events\n\n"
            for i in range(n):
                await asyncio.sleep(FIRST_DELAY if i == 0 else TOKEN_DELAY)
                if fault == "stream_error" and i == 2:
                    yield _sse({"error": {"message": "engine died", "type": "internal_error"}})
                    return
                yield _sse(chunk(i))
            if fault != "missing_usage":
                yield _sse({"choices": [], "usage": usage})
            if fault != "missing_done":
                yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/responses")
    async def responses(request: Request):
        body = await request.json()
        seen[body["model"]] += 1
        number = sum(1 for b in chats if isinstance(b, dict))  # bodies kept beside chat messages
        chats.append(body)
        rid = f"resp_{number}"
        n = body["max_output_tokens"]

        async def stream():
            yield _sse({"type": "response.created", "response": {"id": rid, "status": "in_progress"}})
            for i in range(n):
                await asyncio.sleep(FIRST_DELAY if i == 0 else TOKEN_DELAY)
                kind = "reasoning_text" if i < 2 else "output_text"
                yield _sse({"type": f"response.{kind}.delta", "delta": f" t{i}"})
            usage = {"input_tokens": len(tok.encode(body["input"])), "output_tokens": n}
            yield _sse({"type": "response.completed", "response": {"id": rid, "status": "completed", "usage": usage}})

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/metrics")
    async def metrics():
        """The app's counters as Ray exports them, made up from the requests seen: 100 prompt tokens looked up a
        request, 60 of them hits on replica "a" and 20 on "b" (alternating), each request routed by prefix; one
        series of Ray's own labels per replica, and a series of another app the scrape must ignore."""
        from fastapi.responses import PlainTextResponse

        n = sum(seen.values())
        on_a, on_b = (n + 1) // 2, n // 2
        ray = 'Component="serve_replica",NodeAddress="10.0.0.1",SessionName="s"'
        text = "".join([
            "# TYPE ray_gptoss_prefix_cache_queries_total counter\n",
            f'ray_gptoss_prefix_cache_queries_total{{{ray},model_name="m",replica="a"}} {100.0 * on_a}\n',
            f'ray_gptoss_prefix_cache_queries_total{{{ray},model_name="m",replica="b"}} {100.0 * on_b}\n',
            "# TYPE ray_gptoss_prefix_cache_hits_total counter\n",
            f'ray_gptoss_prefix_cache_hits_total{{{ray},model_name="m",replica="a"}} {60.0 * on_a}\n',
            f'ray_gptoss_prefix_cache_hits_total{{{ray},model_name="m",replica="b"}} {20.0 * on_b}\n',
            "# TYPE ray_gptoss_routing_decisions_total counter\n",
            f'ray_gptoss_routing_decisions_total{{{ray},deployment="AttentionReplica",reason="prefix"}} {float(n)}\n',
            "# TYPE ray_other_app_hits_total counter\n",
            'ray_other_app_hits_total{replica="a"} 5.0\n'])
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class FakeServer:
    def __init__(self) -> None:
        self.seen: Counter = Counter()
        self.chats: list[list[dict]] = []  # every chat request's messages, in arrival order
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))  # the port is ours from here on: no race for a "free" port
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(_fake_app(self.seen, self.chats), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def server():
    with FakeServer() as fake:
        yield fake


@pytest.fixture
def fresh(server):
    server.seen.clear()
    server.chats.clear()
    return server


def _config(server: FakeServer, **kw) -> LoadConfig:
    defaults = dict(url=server.url, endpoint="completions", model="fake-ok", concurrency=4, num_requests=12,
                    input_len=32, output_len=8, timeout=10.0)
    return LoadConfig(**(defaults | kw))


def _run(config: LoadConfig):
    return asyncio.run(run_load(config))


# --------------------------------------------------------------------------- workload


def test_length_draws_stay_within_bounds():
    rng = random.Random(0)
    fixed = LengthSampler.build(dist="fixed", mean=100)
    assert {fixed.draw(rng) for _ in range(100)} == {100}
    uniform = LengthSampler.build(dist="uniform", mean=100, range_ratio=0.25)
    draws = [uniform.draw(rng) for _ in range(5000)]
    assert (uniform.low, uniform.high) == (75, 125) and min(draws) == 75 and max(draws) == 125
    for mean, sigma in ((216, 1.0), (200, 0.8), (30, 1.0)):
        sharegpt = LengthSampler.build(dist="sharegpt", mean=mean, sigma=sigma)
        draws = [sharegpt.draw(rng) for _ in range(20000)]
        assert sharegpt.low <= min(draws) and max(draws) <= sharegpt.high == 5 * mean
        assert abs(statistics.mean(draws) - mean) < 0.04 * mean
        assert statistics.median(draws) < mean  # skewed right, as ShareGPT's lengths are


def test_prompts_have_exact_token_counts_and_are_reproducible():
    tok = load_tokenizer()
    rng = random.Random(1)
    for length in (1, 2, 7, 100, 1024, 3000):
        assert len(tok.encode(make_prompt(tok, length, rng))) == length
    config = LoadConfig(url="http://127.0.0.1:1", concurrency=1, num_requests=1, length_dist="uniform",
                        input_len=64, output_len=16, seed=3)
    a, b = Workload.from_config(config), Workload.from_config(config)
    other = Workload.from_config(config.replace(seed=4))
    for i in range(20):
        spec = a.spec(i)
        assert len(tok.encode(spec.prompt)) == spec.prompt_len and 32 <= spec.prompt_len <= 96
        assert 8 <= spec.output_len <= 24
        assert spec == b.spec(i) and spec.prompt != other.spec(i).prompt


def test_arrival_gaps_have_the_asked_mean():
    for burstiness in (1.0, 0.5):
        gaps = list(islice(arrival_gaps(rate=20.0, burstiness=burstiness, seed=0), 20000))
        assert abs(statistics.mean(gaps) - 0.05) < 0.003
        # the coefficient of variation of a gamma is 1/sqrt(shape): burstier means more spread
        assert abs(statistics.stdev(gaps) / statistics.mean(gaps) - burstiness ** -0.5) < 0.05


# --------------------------------------------------------------------------- safety and options


def test_only_loopback_targets_unless_allowed(capsys):
    for url in ("http://127.0.0.1:8000", "http://127.9.9.9", "http://[::1]:8000/", "http://localhost:1"):
        check_target(url)
    for url in ("http://10.0.0.1:8000", "http://example.com", "http://8.8.8.8", "ftp://127.0.0.1"):
        with pytest.raises(UnsafeTargetError):
            check_target(url)
    assert check_target("http://Bench-Box:8000", allow_hosts=["bench-box"]) == "bench-box"
    with pytest.raises(UnsafeTargetError):
        asyncio.run(run_load(LoadConfig(url="http://192.0.2.1", concurrency=1, num_requests=1)))
    with pytest.raises(SystemExit) as exit_:
        main(["--url", "http://192.0.2.1:8000", "--concurrency", "1", "--num-requests", "1", "--no-progress"])
    assert exit_.value.code == 2
    assert "refusing to send load to '192.0.2.1'" in capsys.readouterr().err


def test_bad_options_are_refused():
    for kw in (dict(num_requests=None), dict(concurrency=None), dict(concurrency=0), dict(range_ratio=1.0),
               dict(goodput={"latency": 5})):
        with pytest.raises(ConfigError):
            LoadConfig(**(dict(url="http://127.0.0.1", concurrency=1, num_requests=1) | kw)).validate()
    assert parse_goodput(["ttft:500", "TPOT:50.5"]) == {"ttft": 500.0, "tpot": 50.5}
    with pytest.raises(ConfigError):
        parse_goodput(["ttft=500"])


# --------------------------------------------------------------------------- figures


def test_concurrency_run_figures_match_the_server(fresh):
    result = _run(_config(fresh, concurrency=4, num_requests=12, goodput={"ttft": 5000}))
    assert (result.completed, result.failed, result.cancelled) == (12, 0, 0)
    assert fresh.seen["fake-ok"] == 12
    assert result.total_output_tokens == 12 * 8
    assert result.total_input_tokens == sum(r.prompt_len for r in result.records) == 12 * 32
    assert result.max_concurrent_requests == 4
    assert FIRST_DELAY * 1000 <= result.ttft.median < FIRST_DELAY * 1000 + 150  # stats are in ms
    assert TOKEN_DELAY * 1000 <= result.tpot.median < TOKEN_DELAY * 1000 + 20
    assert result.itl.count == 12 * 7 and result.e2el.count == 12
    assert result.e2el.p99 >= result.e2el.p90 >= result.e2el.median >= result.ttft.median
    assert result.output_throughput == pytest.approx(96 / result.duration)
    assert result.request_goodput == pytest.approx(result.request_throughput)
    assert result.errors_by_status == {}


def test_chat_counts_reasoning_chunks_and_templated_prompt(fresh):
    result = _run(_config(fresh, endpoint="chat", model=None, num_requests=6, goodput={"ttft": 1}))
    assert result.model == "fake-ok"  # taken from GET /v1/models
    assert (result.completed, result.failed) == (6, 0)
    assert result.total_input_tokens == 6 * (32 + CHAT_TEMPLATE_TOKENS)
    # the empty role chunk is not a token; the first reasoning chunk is
    assert all(r.chunks == 8 for r in result.records)
    assert result.ttft.median >= FIRST_DELAY * 1000
    assert result.request_goodput == 0.0  # nobody answers within 1 ms


def test_failures_are_counted_by_reason_and_not_retried(fresh):
    result = _run(_config(fresh, model="fake-errors", num_requests=12, concurrency=3))
    assert fresh.seen["fake-errors"] == 12  # no retries
    assert (result.completed, result.failed) == (2, 10)
    assert result.errors_by_status == {"429": 2, "missing_done": 2, "missing_usage": 2, "stream_error": 2,
                                       "token_mismatch": 2}
    assert result.total_output_tokens == 2 * 8  # failures never count as throughput
    assert "engine died" in result.error_examples["stream_error"]


def test_timeouts_malformed_streams_and_refused_connections(fresh):
    slow = _run(_config(fresh, model="fake-slow", num_requests=2, timeout=0.3))
    assert slow.errors_by_status == {"timeout": 2} and slow.duration < 1.5
    garbled = _run(_config(fresh, model="fake-malformed", num_requests=2))
    assert garbled.errors_by_status == {"malformed_sse": 2}
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        refused = _run(_config(fresh, url=url, num_requests=3))
        assert refused.errors_by_status == {"connection": 3} and refused.completed == 0
        # with no --model, the run stops at the model lookup and says so
        assert main(["--url", url, "--concurrency", "1", "--num-requests", "1", "--no-progress"]) == 1


def test_poisson_run_stops_at_its_duration(fresh):
    begin = time.monotonic()
    result = _run(_config(fresh, concurrency=None, request_rate=40.0, num_requests=100_000, duration=0.5))
    assert time.monotonic() - begin < 3.0
    assert 5 <= result.num_prompts <= 60  # about 20 expected
    assert result.completed == result.num_prompts and result.failed == 0
    assert result.to_json_dict()["request_rate"] == 40.0


def test_requests_still_running_after_the_grace_period_are_cancelled(fresh):
    begin = time.monotonic()
    result = _run(_config(fresh, model="fake-slow", concurrency=2, num_requests=50, duration=0.2,
                          grace_period=0.2))
    assert time.monotonic() - begin < 1.5
    assert (result.num_prompts, result.cancelled, result.failed, result.completed) == (2, 2, 0, 0)


def test_result_json_has_vllm_keys(fresh):
    data = _run(_config(fresh, num_requests=4)).to_json_dict(detailed=True)
    assert data.keys() >= VLLM_KEYS
    assert {"errors_by_status", "p90_ttft_ms", "p90_tpot_ms", "p90_itl_ms", "p90_e2el_ms"} <= data.keys()
    assert data["request_rate"] == "inf" and data["max_concurrency"] == 4
    assert len(data["ttfts"]) == 4 and data["output_lens"] == [8] * 4
    json.dumps(data, allow_nan=False)  # strict JSON: no NaN or Infinity


def test_sweep_writes_json_table_and_png_with_a_comparison(fresh, tmp_path, capsys):
    common = ["--url", fresh.url, "--endpoint", "completions", "--model", "fake-ok", "--num-requests", "6",
              "--input-len", "16", "--output-len", "4", "--no-progress"]
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert main([*common, "--sweep", "--concurrencies", "1,3", "--label", "ours", "--result-json", str(first)]) == 0
    sweep = json.loads(first.read_text())
    assert sweep["swept"] == "max_concurrency" and [p["max_concurrency"] for p in sweep["points"]] == [1, 3]
    assert all(p["completed"] == 6 and p["total_output_tokens"] == 24 for p in sweep["points"])
    assert "out tok/s" in capsys.readouterr().out
    plot = tmp_path / "cmp.png"
    assert main([*common, "--sweep", "--request-rates", "50,100", "--label", "theirs", "--result-json",
                 str(second), "--plot", str(plot), "--compare", str(first)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert [p["request_rate"] for p in json.loads(second.read_text())["points"]] == [50.0, 100.0]


def test_reasoning_sent_under_both_names_counts_once():
    from gptoss_serve.bench.loadtest.sse import chunk_text

    both = {"choices": [{"delta": {"reasoning": "think", "reasoning_content": "think", "content": "!"}}]}
    older = {"choices": [{"delta": {"reasoning_content": "think"}}]}
    assert chunk_text(both, chat=True) == "think!" and chunk_text(older, chat=True) == "think"


# --------------------------------------------------------------------------- the conversation workload


def _answer(n: int) -> str:
    """All the text the fake server streams for n tokens (reasoning and content)."""
    return "".join(f" t{i}" for i in range(n))


def test_conversations_share_the_system_prompt_and_grow_turn_by_turn(fresh):
    result = _run(_config(fresh, endpoint="chat", workload="conversation", concurrency=3, num_requests=12,
                          system_prompt_len=300, turns=3, input_len=20, output_len=8))
    assert (result.completed, result.failed) == (12, 0) and result.max_concurrent_requests == 3
    system = fresh.chats[0][0]
    assert system["role"] == "system" and len(load_tokenizer().encode(system["content"])) == 300
    sent = {json.dumps(messages) for messages in fresh.chats}
    for messages in fresh.chats:
        assert messages[0] == system  # one system prompt for every user and conversation
        roles = [m["role"] for m in messages[1:]]
        turns = len(roles) // 2 + 1
        assert 1 <= turns <= 3 and roles == ["user", "assistant"] * (turns - 1) + ["user"]
        assert all(m["content"] == _answer(8) for m in messages[2::2])  # the answers, as streamed
        if turns > 1:  # the request before it, its answer, a new message
            assert json.dumps(messages[:-2]) in sent
    # 12 turns of at most 3 a conversation: 4 conversations at least, each opened by its own first message
    first_messages = [m[1]["content"] for m in fresh.chats if len(m) == 2]
    assert len(first_messages) >= 4 and len(set(first_messages)) == len(first_messages)
    assert sum(r.turn == 1 for r in result.records) == len(first_messages)
    # the server counted what we counted, plus its template
    assert all(r.prompt_tokens == r.prompt_len + CHAT_TEMPLATE_TOKENS for r in result.records)
    by_turn = result.to_json_dict()["by_turn"]
    assert [t["turn"] for t in by_turn] == [1, 2, 3] and sum(t["completed"] for t in by_turn) == 12
    inputs = [t["mean_input_tokens"] for t in by_turn]
    assert inputs == sorted(inputs) and inputs[0] > 300
    # the share of prompt tokens the server said it had cached: all but the new message (20 tokens)
    shares = [t["cached_token_share"] for t in by_turn]
    assert shares[0] == pytest.approx((300 + CHAT_TEMPLATE_TOKENS) / (320 + CHAT_TEMPLATE_TOKENS))
    assert shares == sorted(shares) and result.cached_share_by_turn[3] == shares[2]
    assert all(t["median_ttft_ms"] >= FIRST_DELAY * 1000 for t in by_turn)


def test_a_failed_turn_starts_a_new_conversation(fresh):
    # fake-errors fails five requests in six: none of them may be followed by a turn built on it
    result = _run(_config(fresh, endpoint="chat", model="fake-errors", workload="conversation", concurrency=1,
                          num_requests=6, system_prompt_len=16, turns=3, input_len=8, output_len=4))
    assert (result.completed, result.failed) == (1, 5)
    assert [r.turn for r in result.records] == [1] * 6
    assert all(len(messages) == 2 for messages in fresh.chats)


def test_conversation_runs_from_the_command_line(fresh, tmp_path, capsys):
    out = tmp_path / "conv.json"
    assert main(["--url", fresh.url, "--model", "fake-ok", "--workload", "conversation", "--concurrency", "2",
                 "--num-requests", "4", "--system-prompt-len", "64", "--turns", "2", "--input-len", "8",
                 "--output-len", "4", "--no-progress", "--result-json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["workload"] == "conversation" and data["system_prompt_len"] == 64 and data["completed"] == 4
    assert [t["turn"] for t in data["by_turn"]] == [1, 2]
    assert "Median TTFT by conversation turn" in capsys.readouterr().out


def test_conversation_options_are_checked():
    base = dict(url="http://127.0.0.1", workload="conversation", concurrency=2, num_requests=4)
    for kw in (dict(request_rate=2.0), dict(concurrency=None, request_rate=2.0),
               dict(turns=0), dict(system_prompt_len=-1), dict(workload="replay")):
        with pytest.raises(ConfigError):
            LoadConfig(**(base | kw)).validate()
    LoadConfig(**base).validate()
    LoadConfig(**(base | dict(endpoint="completions"))).validate()


def test_completions_turns_are_transcripts_that_extend_the_turn_before(fresh):
    result = _run(_config(fresh, endpoint="completions", workload="conversation", concurrency=2, num_requests=6,
                          system_prompt_len=50, system_prompts=2, turns=3, input_len=6, output_len=4))
    assert (result.completed, result.failed) == (6, 0)
    prompts = [p for p in fresh.chats if isinstance(p, str)]
    assert len(prompts) == 6 and all(p.startswith("system: ") and p.endswith("assistant:") for p in prompts)
    assert len({p.split("\n\n")[0] for p in prompts}) == 2  # one system prompt a user, first in the transcript
    for prompt in prompts:
        paragraphs = prompt.split("\n\n")
        turn = (len(paragraphs) - 1) // 2  # system, then a user message and an answer a turn (the last unanswered)
        assert [p.split(":")[0] for p in paragraphs[1:-1]] == ["user", "assistant"] * (turn - 1) + ["user"]
        if turn > 1:  # the transcript before it, the answer as streamed, a new message
            before = "\n\n".join(paragraphs[:-3]) + "\n\nassistant:"
            assert before in prompts and paragraphs[-3] == "assistant: " + _answer(4)
    assert sorted(r.turn for r in result.records) == [1, 1, 2, 2, 3, 3]
    assert all(r.ttft >= FIRST_DELAY and r.prompt_tokens > r.prompt_len for r in result.records)


def test_users_spread_over_system_prompts_hand_count(fresh):
    # 4 users, 2 system prompts, 3 turns, 12 requests: each user holds one conversation of exactly 3 turns
    result = _run(_config(fresh, endpoint="chat", workload="conversation", concurrency=4, num_requests=12,
                          system_prompt_len=40, system_prompts=2, turns=3, input_len=6, output_len=4))
    assert (result.completed, result.failed) == (12, 0) and len(fresh.chats) == 12
    systems = {m[0]["content"] for m in fresh.chats}
    assert len(systems) == 2 and all(len(load_tokenizer().encode(p)) == 40 for p in systems)
    firsts = [m for m in fresh.chats if len(m) == 2]  # one per user; its user is found by its seed-fixed message
    assert len(firsts) == 4
    for messages in fresh.chats:  # each turn's prompt extends the one before: 3 turns, a chain of 3
        later = [m for m in fresh.chats if len(m) > len(messages) and m[:len(messages)] == messages]
        assert len(later) == 3 - len(messages) // 2  # turn t has 2t messages
    openers = {m[1]["content"]: m[0]["content"] for m in firsts}
    from gptoss_serve.bench.loadtest.conversation import Conversations
    conv = Conversations.from_config(_config(fresh, endpoint="chat", workload="conversation", concurrency=4,
                                             num_requests=12, system_prompt_len=40, system_prompts=2, turns=3,
                                             input_len=6, output_len=4))
    for user in range(4):  # user u held prompt u % 2: users 0 and 2 one, 1 and 3 the other
        turn = conv.next_turn(user)
        assert turn.system_prompt == user % 2 and openers[turn.messages[1]["content"]] == turn.instructions
    assert sum(1 for o in openers.values() if o == conv.system_prompts[0]) == 2
    assert [t["turn"] for t in result.to_json_dict()["by_turn"]] == [1, 2, 3]


def test_responses_turns_follow_the_previous_response(fresh):
    result = _run(_config(fresh, endpoint="responses", workload="conversation", concurrency=4, num_requests=12,
                          system_prompt_len=40, system_prompts=2, turns=3, input_len=6, output_len=4,
                          ignore_eos=False))
    assert (result.completed, result.failed) == (12, 0)
    bodies = [b for b in fresh.chats if isinstance(b, dict)]
    assert len(bodies) == 12 and all(b["stream"] is True and b["store"] is True for b in bodies)
    ids = {f"resp_{i}": b for i, b in enumerate(bodies)}
    assert len({b["instructions"] for b in bodies}) == 2
    firsts = [b for b in bodies if "previous_response_id" not in b]
    assert len(firsts) == 4
    for b in bodies:
        if "previous_response_id" in b:  # a later turn: the new message only, after an earlier response
            before = ids[b["previous_response_id"]]
            assert before["instructions"] == b["instructions"] and before["input"] != b["input"]
            assert bodies.index(before) < bodies.index(b)
    # 4 users x 2 later turns, each following a different response
    followed = [b["previous_response_id"] for b in bodies if "previous_response_id" in b]
    assert len(followed) == 8 and len(set(followed)) == 8
    assert all(r.ttft >= FIRST_DELAY for r in result.records)


def test_think_time_is_respected(fresh):
    think = 0.3
    result = _run(_config(fresh, endpoint="chat", workload="conversation", concurrency=1, num_requests=3,
                          system_prompt_len=16, turns=3, input_len=6, output_len=2, think_time=think))
    records = sorted(result.records, key=lambda r: r.start)
    assert result.completed == 3
    for before, after in zip(records, records[1:]):
        assert after.start - (before.start + before.latency) >= think


def test_new_conversation_options_are_refused():
    base = dict(url="http://127.0.0.1", workload="conversation", concurrency=2, num_requests=4)
    for kw, words in ((dict(system_prompts=0), "system_prompts"), (dict(think_time=-1.0), "think_time"),
                      (dict(think_time=float("inf")), "think_time"),
                      (dict(system_prompts=2, system_prompt_len=0), "system_prompt_len"),
                      (dict(endpoint="responses"), "--no-ignore-eos"),
                      (dict(endpoint="responses", workload="random", ignore_eos=False), "conversation")):
        with pytest.raises(ConfigError, match=words):
            LoadConfig(**(base | kw)).validate()
    LoadConfig(**(base | dict(endpoint="responses", ignore_eos=False, system_prompts=2, think_time=0.5))).validate()


# --------------------------------------------------------------------------- the server's own counters


def test_the_servers_prefix_hit_rate_and_routing_come_from_its_metrics(fresh, capsys, tmp_path):
    """12 requests after 0 seen: 6 on each replica, 60 and 20 of 100 tokens hits -> 0.6, 0.2, 0.4 overall."""
    result = _run(_config(fresh, metrics_url=f"{fresh.url}/metrics", metrics_settle=0.0))
    assert result.completed == 12
    server = result.server
    assert server.prefix_queries == {"a": 600.0, "b": 600.0} and server.hit_rate == pytest.approx(0.4)
    assert server.hit_rate_by_replica == pytest.approx({"a": 0.6, "b": 0.2})
    assert server.routing == {"prefix": 12.0}
    assert result.to_json_dict()["server_metrics"]["prefix_cache_hit_rate"] == pytest.approx(0.4)
    # a second run counts only its own requests (the counters' change), from the command line
    out = tmp_path / "r.json"
    assert main(["--url", fresh.url, "--model", "fake-ok", "--endpoint", "completions", "--concurrency", "2",
                 "--num-requests", "4", "--input-len", "16", "--output-len", "4", "--no-progress",
                 "--metrics-url", f"{fresh.url}/metrics", "--metrics-settle", "0", "--result-json", str(out)]) == 0
    assert json.loads(out.read_text())["server_metrics"]["routing_decisions"] == {"prefix": 4.0}
    printed = capsys.readouterr().out
    assert "Prefix-cache hit rate, prompt tokens:" in printed and "Routed by prefix:" in printed


def test_a_metrics_url_that_cannot_be_read_is_named(fresh, capsys):
    assert main(["--url", fresh.url, "--model", "fake-ok", "--endpoint", "completions", "--concurrency", "1",
                 "--num-requests", "1", "--input-len", "8", "--output-len", "2", "--no-progress",
                 "--metrics-url", f"{fresh.url}/no-such-page"]) == 1
    assert f"--metrics-url {fresh.url}/no-such-page: HTTPStatusError" in capsys.readouterr().err
    with pytest.raises(UnsafeTargetError):  # the same rule as the load's own target
        _run(_config(fresh, metrics_url="http://192.0.2.1:8080/metrics"))


def test_counters_of_a_restarted_replica_count_from_zero():
    from gptoss_serve.bench.loadtest.server_metrics import ServerCounters

    before = ServerCounters(prefix_queries={"a": 500.0, "b": 100.0}, prefix_hits={"a": 400.0, "b": 0.0})
    after = ServerCounters(prefix_queries={"a": 700.0, "b": 30.0, "c": 10.0}, prefix_hits={"a": 500.0, "b": 30.0})
    delta = after.since(before)
    assert delta.prefix_queries == {"a": 200.0, "b": 30.0, "c": 10.0}  # b restarted: its 30 are all new
    assert delta.prefix_hits == {"a": 100.0, "b": 30.0}
    assert delta.hit_rate == pytest.approx(130 / 240)
