"""The request metrics vLLM's dashboards and alerts read: each request's queue, prefill and decode times (stamped by
the engine core as its milestones happen), its prompt and generated tokens, preemptions and tokens per step; and
the attention replica recording them (in-process, no Ray, over a real engine core)."""

from __future__ import annotations

import asyncio
import functools
import time

import pytest
import torch

from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.engine_core import engine_stats
from gptoss_serve.cluster.engine_protocol import EngineRequest, RequestOutput, RequestTimes
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.cluster.scheduler import Scheduler
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.attention_replica import AttentionReplica
from gptoss_serve.deployments.metrics import ReplicaMetrics
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer
from tests.scripted_model import follow_chain

SENTENCE = " Hello world, see you tomorrow!"
# the cache and budget of tests/test_engine.py's preemption test: these four requests cannot all fit at once
PREEMPTING = {"num_kv_blocks": 24, "max_model_len": 200, "max_num_batched_tokens": 32}
PREEMPTED_PROMPTS = (60, 45, 70, 52)


def greedy(max_tokens: int, **more) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **more)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 200_000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def model(tiny_bf16):
    return load_model(tiny_bf16, dtype=torch.float32)


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def make_engine(request, model):
    def make(**config) -> LLMEngine:
        return LLMEngine(model, load_tokenizer(), EngineConfig(**{"num_kv_blocks": 128, "max_model_len": 512,
                                                                  "async_scheduling": request.param, **config}))
    return make


def scripted_engine(path: str, *, detokenize: bool) -> LLMEngine:
    """The tiny model scripted to say SENTENCE after "Say goodbye:" (tests/scripted_model.py)."""
    tokenizer = load_tokenizer()
    model = load_model(path, dtype=torch.float32)
    follow_chain(model, [tokenizer.encode("Say goodbye:")[-1], *tokenizer.encode(SENTENCE)])
    return LLMEngine(model, tokenizer, EngineConfig(num_kv_blocks=64, max_model_len=256), detokenize=detokenize)


def run(eng: LLMEngine) -> tuple[dict[str, list[RequestOutput]], dict[str, float], list[int]]:
    """Steps to the end -> each request's outputs, when the step that finished it returned, and each step's
    step_tokens."""
    outputs: dict[str, list[RequestOutput]] = {}
    returned: dict[str, float] = {}
    steps = []
    while eng.has_unfinished_requests:
        for out in eng.step():
            outputs.setdefault(out.request_id, []).append(out)
            if out.finished:
                returned[out.request_id] = time.time()
        steps.append(eng.step_tokens)
    return outputs, returned, steps


def check_times(outs: list[RequestOutput]) -> RequestTimes:
    """The first token's output and the last one carry the request's times (no other does), in milestone order;
    -> the last one's."""
    first, last = outs[0].times, outs[-1].times
    assert first is not None and last is not None and last.last_token
    assert all(o.times is None for o in outs[1:-1])
    assert first == RequestTimes(last.arrival, last.scheduled, last.first_token)  # the same milestones, then
    assert 0 < last.arrival <= last.scheduled <= last.first_token <= last.last_token
    return last


# ---- the engine stamps its requests' milestones ---------------------------------------------------------------
def test_queue_prefill_and_decode_add_up_to_each_requests_time_in_the_engine(make_engine):
    eng = make_engine(max_num_seqs=1, max_num_batched_tokens=32, enable_prefix_caching=False)  # b waits for a
    added = {}
    for name, n, seed in (("a", 100, 1), ("b", 20, 2)):  # a's 100 tokens take four 32-token prefill chunks
        added[name] = time.time()
        eng.add_request(name, prompt(n, seed), greedy(40))
    outputs, returned, _ = run(eng)
    a, b = (check_times(outputs[name]) for name in "ab")
    for name, times in (("a", a), ("b", b)):
        assert added[name] <= times.arrival and times.last_token <= returned[name]
        phases = times.queue_time + times.prefill_time + times.decode_time(times.last_token)
        # the request's wall time (b's includes its wait for all of a: a queue time stamped late would miss it)
        assert phases == pytest.approx(returned[name] - added[name], rel=0.05, abs=0.05), name
        assert times.prefill_time > 0 and times.decode_time(times.last_token) > 0  # 40 tokens: 39 decode steps
    assert b.scheduled >= a.last_token  # one sequence at a time: b's queue time is a's whole run
    assert b.queue_time >= a.last_token - a.scheduled > 10 * a.queue_time


def test_finished_outputs_count_the_requests_prompt_and_generated_tokens(make_engine):
    eng = make_engine()
    free = eng.generate([prompt(10, 3)], greedy(12))[0].token_ids
    stop_id = free[4]
    eng.add_request("length", prompt(10, 3), greedy(12))
    eng.add_request("stop", prompt(10, 3), SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]))
    outputs, _, _ = run(eng)
    received = {name: [t for o in outs for t in o.new_token_ids] for name, outs in outputs.items()}
    assert received["length"] == free and received["stop"] == free[:free.index(stop_id) + 1]
    for name, outs in outputs.items():
        assert outs[-1].finished and outs[-1].num_prompt_tokens == 10, name
        assert outs[-1].num_output_tokens == len(received[name]), name
        check_times(outs)


def test_a_stop_string_the_engine_finds_ends_the_requests_times(tiny_bf16):
    eng = scripted_engine(str(tiny_bf16), detokenize=True)
    eng.add_request("s", load_tokenizer().encode("Say goodbye:"), SamplingParams(temperature=0, max_tokens=20,
                                                                                 stop=["o w"]))
    outputs, _, _ = run(eng)
    assert outputs["s"][-1].finish_reason == "stop" and outputs["s"][-1].stop_reason == "o w"
    check_times(outputs["s"])


def test_a_failed_request_carries_the_milestones_it_reached(make_engine):
    """A failed step ends its requests without a last token: the replica ends their decode time at that step."""
    def broken(scheduled, pending_tokens=None):
        raise ValueError("the device failed")

    eng = make_engine()
    eng.add_request("early", prompt(9, 5), greedy(40))
    eng.runner.launch, launch = broken, eng.runner.launch
    [early] = eng.step()  # its first step fails: scheduled, no token
    assert early.finish_reason == "error" and early.times.scheduled >= early.times.arrival > 0
    assert early.times.first_token == early.times.last_token == 0
    eng.runner.launch = launch
    eng.add_request("late", prompt(9, 6), greedy(40))
    outputs = []
    while sum(len(o.new_token_ids) for o in outputs) < 3:
        outputs += eng.step()
    eng.runner.launch = broken
    [late] = eng.step()
    assert late.finish_reason == "error" and late.times == outputs[0].times  # its first token's, and no last one


def test_preemptions_are_counted_and_keep_the_first_scheduling(make_engine, monkeypatch):
    preempted: list[tuple[str, float]] = []  # (request, its scheduled time when it was preempted)
    preempt = Scheduler._preempt

    def spy(self, seq):
        preempted.append((seq.request_id, seq.times.scheduled))
        preempt(self, seq)

    monkeypatch.setattr(Scheduler, "_preempt", spy)
    eng = make_engine(**PREEMPTING)
    for i, n in enumerate(PREEMPTED_PROMPTS):
        eng.add_request(f"r{i}", prompt(n, 10 + i), greedy(40))
    outputs, _, _ = run(eng)
    assert preempted and engine_stats(eng).num_preemptions == len(preempted) == eng.scheduler.num_preemptions
    for name, scheduled in preempted:  # coming back did not restart its queue time
        assert check_times(outputs[name]).scheduled == scheduled, name


def test_step_tokens_are_the_prefill_and_decode_tokens_each_step_computed(make_engine):
    eng = make_engine(max_num_batched_tokens=32, enable_prefix_caching=False)
    lengths = (70, 9, 33)
    for i, n in enumerate(lengths):
        eng.add_request(f"r{i}", prompt(n, 20 + i), greedy(6))
    _, _, steps = run(eng)
    # every prompt token and every generated token but the last (sampled, never fed back) is computed once
    assert sum(steps) == sum(n + 6 - 1 for n in lengths)
    assert max(steps) == 32 and steps.count(32) >= 2  # the 70-token prompt fills whole 32-token chunks
    assert engine_stats(eng).step_tokens == 0  # stats not sent after a step have none


# ---- the replica records them ---------------------------------------------------------------------------------
class Recorded:
    """Stands in for a ray.util.metrics Histogram or Counter: every value, in order."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, value, tags=None) -> None:
        self.values.append(value)

    inc = observe


NEW_SERIES = ("queue_time", "prefill_time", "decode_time", "request_prompt_tokens", "request_generation_tokens",
              "preemptions", "step_tokens")


def recording(metrics: ReplicaMetrics) -> ReplicaMetrics:
    for name in NEW_SERIES:
        setattr(metrics, name, Recorded())
    return metrics


def values(metrics: ReplicaMetrics) -> dict[str, list[float]]:
    return {name: getattr(metrics, name).values for name in NEW_SERIES}


def test_record_finished_observes_each_phase_whose_ends_were_reached():
    m = recording(ReplicaMetrics(model="m", replica="r"))
    out = RequestOutput("r", [], None, True, "length", num_prompt_tokens=7, num_output_tokens=3)
    m.record_finished(out, RequestTimes(10.0, 11.0, 13.0, 16.0), step_time=99.0)  # the engine ended it: 16
    m.record_finished(out, RequestTimes(10.0, 11.0, 13.0), step_time=17.5)  # ended beside it, in a step at 17.5
    m.record_finished(out, RequestTimes(10.0, 12.0), step_time=20.0)  # failed before its first token
    m.record_finished(out, None, step_time=20.0)  # failed before it was scheduled
    assert values(m) == {"queue_time": [1.0, 1.0, 2.0], "prefill_time": [2.0, 2.0], "decode_time": [3.0, 4.5],
                         "request_prompt_tokens": [7] * 4, "request_generation_tokens": [3] * 4,
                         "preemptions": [], "step_tokens": []}


def build_preempting(path: str):
    return LLMEngine(load_model(path, dtype=torch.float32), load_tokenizer(),
                     EngineConfig(**PREEMPTING, enable_prefix_caching=False), detokenize=False), None


def build_scripted(path: str):
    return scripted_engine(path, detokenize=False), None


async def finish(replica: AttentionReplica, requests: list[EngineRequest]) -> dict[str, list[RequestOutput]]:
    """Runs a batch to its end and waits for the engine's idle report -> each request's outputs."""
    outputs: dict[str, list[RequestOutput]] = {}
    stream = replica.generate_batch(requests)
    assert await stream.__anext__() == replica.replica_id
    async for items in stream:
        for item in items:
            assert item.error is None, item
            outputs.setdefault(item.request_id, []).append(item.output)
    deadline = time.monotonic() + 10
    while not replica.stats.idle:
        assert time.monotonic() < deadline, replica.stats
        await asyncio.sleep(0.01)
    return outputs


def test_the_replica_records_phases_tokens_preemptions_and_step_tokens(tiny_bf16):
    replica = AttentionReplica(AppArgs(), build=functools.partial(build_preempting, str(tiny_bf16)))
    try:
        m = recording(replica.metrics)
        requests = [EngineRequest(f"r{i}", prompt(n, 10 + i), greedy(40), arrival_time=time.time())
                    for i, n in enumerate(PREEMPTED_PROMPTS)]
        started = time.time()
        outputs = asyncio.run(finish(replica, requests))
        took = time.time() - started
        seen = values(m)
        assert sorted(seen["request_prompt_tokens"]) == sorted(PREEMPTED_PROMPTS)
        assert seen["request_generation_tokens"] == [40] * 4
        assert sum(seen["preemptions"]) == replica.stats.num_preemptions > 0  # all of them, once
        for name in ("queue_time", "prefill_time", "decode_time"):
            assert len(seen[name]) == 4 and all(v >= 0 for v in seen[name]), (name, seen[name])
        for q, p, d in zip(seen["queue_time"], seen["prefill_time"], seen["decode_time"]):
            assert 0 < q + p + d <= took
        assert max(seen["queue_time"]) > 0  # a step takes 32 tokens: the others waited for the first's
        # each step's tokens, within the budget; preempted sequences are computed again, so at least once each
        assert all(1 <= n <= 32 for n in seen["step_tokens"])
        assert sum(seen["step_tokens"]) >= sum(n + 40 - 1 for n in PREEMPTED_PROMPTS)
        assert len(outputs) == 4 and not replica.first_token_times  # what it kept for them is gone
    finally:
        replica.core.shutdown()


def test_a_stop_string_found_beside_the_core_ends_its_decode_time_in_that_step(tiny_bf16):
    """The core never ends such a request itself: its decode time runs from the first token the core stamped to
    the core's stamp of the step whose token completed the stop string."""
    replica = AttentionReplica(AppArgs(), build=functools.partial(build_scripted, str(tiny_bf16)))
    try:
        m = recording(replica.metrics)
        steps = []
        on_step = replica._on_step
        replica.core.on_step = lambda outputs, stats: (steps.append((outputs, stats)), on_step(outputs, stats))
        request = EngineRequest("s", load_tokenizer().encode("Say goodbye:"),
                                SamplingParams(temperature=0, max_tokens=20, stop=["o w"]), arrival_time=time.time())
        outputs = asyncio.run(finish(replica, [request]))["s"]
        assert outputs[-1].finish_reason == "stop" and outputs[-1].times is None  # the core had not ended it
        first = outputs[0].times
        ended = next(stats.time for outs, stats in steps if any(o.num_output_tokens == outputs[-1].num_output_tokens
                                                                for o in outs))
        seen = values(m)
        assert seen["decode_time"] == [pytest.approx(ended - first.first_token)]
        assert seen["queue_time"] == [first.queue_time] and seen["prefill_time"] == [first.prefill_time]
        assert seen["request_generation_tokens"] == [outputs[-1].num_output_tokens]
        # the core's own end of it, from a step launched before it heard of the stop, counts nothing again
        m.requests = Recorded()
        late = RequestOutput("s", [7], None, True, "length", num_prompt_tokens=3, num_output_tokens=20,
                             times=first)
        replica._on_step([late], replica.stats)
        assert m.requests.values == [] and values(m)["request_generation_tokens"] == [outputs[-1].num_output_tokens]
    finally:
        replica.core.shutdown()
