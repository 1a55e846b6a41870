"""The engine core process: same tokens as the engine in-process, batched messages, aborts, bad requests, and a
core that dies, or hangs past an expert deadline, is replaced while its requests fail with 503."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time

import pytest
import torch

from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.engine_core_client import STALL_GRACE_S, EngineCoreClient, EngineCoreError
from gptoss_serve.cluster.engine_protocol import EngineRequest
from gptoss_serve.cluster.expert_parallel.step_watch import StepWatch
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer

CONFIG = EngineConfig(max_num_seqs=8, num_kv_blocks=128)


def build_tiny(path: str, config: EngineConfig = CONFIG):
    """Runs in the core process (picklable: a module-level function and its arguments)."""
    return LLMEngine(load_model(path, dtype=torch.float32), load_tokenizer(), config), None


def build_broken():
    raise FileNotFoundError("no checkpoint at /nowhere")


class Collector:
    """Gathers what the client reports, per request, and counts step messages."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.text: dict[str, str] = {}
        self.finished: dict[str, str] = {}
        self.failed: dict[str, tuple[str, int]] = {}
        self.steps = 0
        self.done = asyncio.Event()
        self.expect: set[str] = set()

    def on_step(self, outputs, stats) -> None:
        self.steps += 1
        for out in outputs:
            self.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            self.text[out.request_id] = self.text.get(out.request_id, "") + out.new_text
            if out.finished:
                self.finished[out.request_id] = out.finish_reason
        self._check()

    def on_failure(self, request_id, message, status) -> None:
        self.failed[request_id] = (message, status)
        self._check()

    def _check(self) -> None:
        if self.expect <= self.finished.keys() | self.failed.keys():
            self.done.set()

    async def wait(self, ids, timeout=120) -> None:
        self.expect, self.done = set(ids), asyncio.Event()
        self._check()
        await asyncio.wait_for(self.done.wait(), timeout)


@pytest.fixture(scope="module")
def core(tiny_bf16):
    seen = Collector()
    client = EngineCoreClient(functools.partial(build_tiny, str(tiny_bf16)), on_step=seen.on_step,
                              on_failure=seen.on_failure)
    yield client, seen
    client.shutdown()


def test_core_matches_the_engine_in_process(core, tiny_bf16):
    client, seen = core
    prompts = [[1, 2, 3, 4, 5], list(range(100, 140)), [7] * 20]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = LLMEngine(load_model(tiny_bf16, dtype=torch.float32), load_tokenizer(), CONFIG).generate(
        prompts, params)

    async def main():
        ids = [f"same-{i}" for i in range(len(prompts))]
        steps_before = seen.steps
        client.add([EngineRequest(i, p, params) for i, p in zip(ids, prompts)])
        await seen.wait(ids)
        assert [seen.tokens[i] for i in ids] == [e.token_ids for e in expected]
        assert [seen.text[i] for i in ids] == [e.text for e in expected]
        # one message per step for the whole batch: 12 tokens each came in about 12 messages, not 36
        assert seen.steps - steps_before <= 14

    asyncio.run(main())


def test_bad_request_is_rejected_alone_and_abort_frees(core):
    client, seen = core

    async def main():
        long = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)  # until the context is full
        client.add([EngineRequest("bad", [10**9], long), EngineRequest("long", [1, 2, 3], long)])
        await seen.wait(["bad"])
        assert seen.failed["bad"][1] == 400 and "token ids" in seen.failed["bad"][0]
        while len(seen.tokens.get("long", [])) < 2:
            await asyncio.sleep(0.01)
        client.abort(["long"])
        while client.stats.running or client.open:
            await asyncio.sleep(0.01)
        assert "long" not in seen.finished and client.stats.running == 0
        assert client.stats.free_blocks == client.stats.num_blocks - 1  # every block back (0 is the null one)

    asyncio.run(main())


def test_a_dead_core_fails_its_requests_and_is_replaced(core):
    client, seen = core

    async def main():
        params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
        client.add([EngineRequest("doomed", [1, 2, 3], params)])
        while not seen.tokens.get("doomed"):
            await asyncio.sleep(0.01)
        os.kill(client.process.pid, signal.SIGKILL)
        await seen.wait(["doomed"], timeout=30)
        assert seen.failed["doomed"][1] == 503
        assert client.restarting  # the replica stays healthy meanwhile (a new core loads in seconds)
        while client.restarting or not client.alive:  # a new core is started in the background (it is alive a
            await asyncio.sleep(0.1)  # moment before the restart is counted)
        assert client.restarts == 1 and client.deaths == {"died": 1, "stalled": 0}
        client.add([EngineRequest("after", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3))])
        await seen.wait(["after"])
        assert seen.finished["after"] == "length"

    asyncio.run(main())


def test_a_core_that_cannot_start_says_why():
    with pytest.raises(EngineCoreError, match="FileNotFoundError: no checkpoint at /nowhere"):
        EngineCoreClient(build_broken)


class _DeadLink:
    def abort(self) -> None:  # an abort that frees nothing: the step stays blocked
        pass


class _NeverFires:
    def query(self) -> bool:
        return False


def _stuck_step(engine):
    """A step whose exchange never completes and whose host stays blocked after the link's abort (as a CUDA call
    waiting on a stuck stream does, GIL held)."""
    watch = StepWatch(_DeadLink(), timeout_s=0.5, period_s=0.02)
    watch.watch(_NeverFires())
    time.sleep(3600)


def build_stuck(path: str):
    engine, extra = build_tiny(path)
    engine.step = functools.partial(_stuck_step, engine)
    return engine, extra


def test_a_core_stuck_past_its_expert_deadline_is_killed_and_replaced(tiny_bf16, capfd):
    seen = Collector()
    client = EngineCoreClient(functools.partial(build_stuck, str(tiny_bf16)), on_step=seen.on_step,
                              on_failure=seen.on_failure)

    async def main():
        start = time.monotonic()
        client.add([EngineRequest("stuck", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4))])
        await seen.wait(["stuck"], timeout=30)
        # the watch's deadline (0.5 s) plus the parent's grace, not the client's patience
        assert time.monotonic() - start < 0.5 + STALL_GRACE_S + 5
        message, status = seen.failed["stuck"]
        assert status == 503
        assert client.error and "stuck" in client.error and "expert timeout" in client.error
        while client.restarting or not client.alive:
            await asyncio.sleep(0.1)
        assert client.restarts == 1 and client.deaths == {"died": 0, "stalled": 1}

    try:
        asyncio.run(main())
    finally:
        client.shutdown()
    # before it was killed, the core wrote where it was stuck to the log
    assert "in _stuck_step" in capfd.readouterr().err
