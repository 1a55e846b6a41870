"""The AttentionReplica in-process (no Ray) over a real engine core: admission against the engine's real queue,
aborts that free blocks at once, text decoded beside the core and stop strings that stop it."""

from __future__ import annotations

import asyncio
import functools
import time

import pytest
import torch

from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.attention_replica import AttentionReplica
from gptoss_serve.cluster.engine_protocol import EngineRequest
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer
from tests.scripted_model import follow_chain


SENTENCE = " Hello world, see you tomorrow!"


def build_scripted(path: str):
    """As the app builds it (text decoded by the replica, not the core), the tiny model scripted to say SENTENCE
    after "Say goodbye:" (tests/scripted_model.py)."""
    tokenizer = load_tokenizer()
    model = load_model(path, dtype=torch.float32)
    follow_chain(model, [tokenizer.encode("Say goodbye:")[-1], *tokenizer.encode(SENTENCE)])
    config = EngineConfig(num_kv_blocks=64, max_model_len=256)
    return LLMEngine(model, tokenizer, config, detokenize=False), None


def build_small(path: str):
    """One running sequence at a time: the rest of a batch waits in the engine's queue."""
    config = EngineConfig(max_num_seqs=1, num_kv_blocks=64, max_model_len=256)
    return LLMEngine(load_model(path, dtype=torch.float32), load_tokenizer(), config), None


@pytest.fixture(scope="module")
def replica(tiny_bf16):
    args = AppArgs(max_waiting_per_replica=1, engine={"max_num_seqs": 1})  # what build_small's engine has
    replica = AttentionReplica(args, build=functools.partial(build_small, str(tiny_bf16)))
    yield replica
    replica.core.shutdown()


def requests(n: int, max_tokens: int, tag: str) -> list[EngineRequest]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [EngineRequest(f"{tag}-{i}", [1, 2, 3 + i], params, arrival_time=time.time()) for i in range(n)]


def test_a_full_engine_queue_refuses_at_once_and_the_rest_complete(replica):
    async def main():
        stream = replica.generate_batch(requests(4, 6, "adm"))
        assert await stream.__anext__() == replica.replica_id
        first = await stream.__anext__()
        # one runs, one may wait (max_waiting_per_replica=1): the other two are refused before any step
        refused = sorted((i.request_id, i.status) for i in first if i.error is not None)
        assert refused == [("adm-2", 429), ("adm-3", 429)]
        assert all("queue is full" in i.error for i in first if i.error is not None)
        done: dict[str, list[int]] = {}
        for items in [first] + [items async for items in stream]:
            for item in items:
                if item.output is not None:
                    done.setdefault(item.request_id, []).extend(item.output.new_token_ids)
        assert sorted(done) == ["adm-0", "adm-1"] and all(len(t) == 6 for t in done.values())

    asyncio.run(main())


def test_a_batch_refused_whole_yields_its_429s(replica):
    """Every request of a batch refused (the engine's queue full with another call's): the call still yields a 429 for
    each, never ends without them (the router would answer 503 "ended the stream early")."""
    async def main():
        holder = replica.generate_batch(requests(2, 200, "hold"))  # one runs, one waits: the queue is full
        assert await holder.__anext__() == replica.replica_id
        await holder.__anext__()
        refused = replica.generate_batch(requests(3, 6, "late"))
        assert await refused.__anext__() == replica.replica_id
        items = [item for chunk in [chunk async for chunk in refused] for item in chunk]
        assert sorted((i.request_id, i.status) for i in items) == [("late-0", 429), ("late-1", 429), ("late-2", 429)]
        await holder.aclose()

    asyncio.run(main())


def test_abort_frees_the_engine_within_a_step(replica):
    async def main():
        stream = replica.generate_batch(requests(2, 200, "ab"))
        await stream.__anext__()
        await stream.__anext__()  # the first running request has a token
        await replica.abort(["ab-0", "ab-1"])
        deadline = time.monotonic() + 5
        while replica.stats.running or replica.stats.waiting or replica.core.open:
            assert time.monotonic() < deadline, replica.stats
            await asyncio.sleep(0.01)
        assert replica.stats.free_blocks == replica.stats.num_blocks - 1
        await stream.aclose()

    asyncio.run(main())


def test_the_replica_decodes_and_stops_at_a_stop_string_for_its_core(tiny_bf16):
    """The core sends tokens only; the replica decodes them once, ends the request at a stop string spanning
    two tokens, and stops it in the core."""
    replica = AttentionReplica(AppArgs(), build=functools.partial(build_scripted, str(tiny_bf16)))
    prompt = load_tokenizer().encode("Say goodbye:")

    async def main():
        params = SamplingParams(temperature=0, max_tokens=20, stop=["o w"])
        stream = replica.generate_batch([EngineRequest("s", prompt, params, arrival_time=time.time())])
        assert await stream.__anext__() == replica.replica_id
        outputs = [item.output async for items in stream for item in items]
        assert "".join(o.new_text for o in outputs) == " Hell"
        assert outputs[-1].finished and outputs[-1].finish_reason == "stop" and outputs[-1].stop_reason == "o w"
        deadline = time.monotonic() + 5
        while replica.stats.running or replica.core.open:  # the core stopped it too
            assert time.monotonic() < deadline, replica.stats
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
    finally:
        replica.core.shutdown()
