"""The typed messages that cross processes: picklable, torch-free, and the ingress imports no torch."""

from __future__ import annotations

import pickle
import subprocess
import sys

from gptoss_serve.cluster.engine_protocol import (AddRequests, EngineRequest, EngineStats, RequestOutput, RoutingLoad,
                                                  StepDone, StreamItem, TokenLogprobs)
from gptoss_serve.cluster.sampling_params import SamplingParams

PROBE = """
import sys
import gptoss_serve.deployments.openai_ingress, gptoss_serve.deployments.batching_router
import gptoss_serve.deployments.prefix_aware_router  # Serve runs it in the router's process
import gptoss_serve.deployments.responses.api, gptoss_serve.cluster.engine_protocol
heavy = sorted(m for m in ("torch", "triton", "safetensors", "gptoss_serve.cluster.engine") if m in sys.modules)
print("heavy:" + ",".join(heavy))
"""


def test_the_ingress_and_router_import_no_torch():
    """The CPU-only ingress and router load no engine: importing them must not pull in torch or the model."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "heavy:", f"imported: {out.stdout.strip()}"


def test_messages_survive_a_pipe():
    params = SamplingParams(temperature=0, max_tokens=3, stop=("x",))
    logprobs = [TokenLogprobs(1, -0.5, 1, [(1, -0.5)])]
    out = RequestOutput("r", [1, 2], "ab", True, finish_reason="stop", logprobs=logprobs)
    for message in (AddRequests([EngineRequest("r", [5, 6], params, arrival_time=1.0)]),
                    StepDone([out], EngineStats(running=1, extra={"bytes": 3})), StreamItem("r", output=out)):
        assert pickle.loads(pickle.dumps(message)) == message


def test_routing_load_round_trips_through_serve_stats():
    engine = EngineStats(running=3, waiting=2, free_blocks=10, num_blocks=41, time=5.0)
    load = RoutingLoad.of_engine(engine)
    assert load == RoutingLoad(queued=5, free_blocks=10, num_blocks=41, time=5.0)
    assert RoutingLoad.from_stats(load.as_stats()) == load
    empty = RoutingLoad.from_stats(None)  # no report yet: idle, with room
    assert empty.queued == 0 and empty.free_fraction == 1.0
