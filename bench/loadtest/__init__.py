"""HTTP load generator for OpenAI-compatible streaming servers (ours, vLLM, ...), with vLLM bench serve's figures.

    python -m gptoss_serve.bench.loadtest --url http://127.0.0.1:8000 --concurrency 8 --num-requests 100
    python -m gptoss_serve.bench.loadtest --url http://127.0.0.1:8000 --workload conversation --concurrency 8 \
        --system-prompt-len 16384 --turns 8 --num-requests 64      # long, growing multi-turn chats

From code:

    result = await run_load(LoadConfig(url=..., concurrency=8, num_requests=100))
    result.completed, result.ttft.median, result.to_json_dict()

How the figures are taken, where it matters for comparing with `vllm bench serve`:
- TTFT is timed at the first chunk that carries text (content, or reasoning_content for reasoning models);
  vLLM's client stops at the first chunk with choices, which for chat is usually an empty role chunk.
- ITL is the gap between consecutive text chunks; TPOT is (e2e - ttft) / (completion_tokens - 1), using
  the server's usage; input and output token totals are the server's usage, summed over completed requests.
- A request counts as completed only if its stream is well-formed, ends in [DONE], carries usage, and
  usage.completion_tokens is the number of tokens asked for (ignore_eos); anything else is a failure by
  reason, in errors_by_status, and never counts as throughput.
- load_generator_cpu is the share of a core this process used: near 1, the figures bound the server rather
  than measure it (one Python event loop read about 8-9k chunks/s on the core we tried).
"""

from gptoss_serve.bench.loadtest.client import ServerError
from gptoss_serve.bench.loadtest.config import ConfigError, LoadConfig, parse_goodput
from gptoss_serve.bench.loadtest.conversation import Conversations, Turn
from gptoss_serve.bench.loadtest.metrics import LatencyStats, LoadResult
from gptoss_serve.bench.loadtest.record import RequestRecord
from gptoss_serve.bench.loadtest.runner import run_load
from gptoss_serve.bench.loadtest.safety import UnsafeTargetError, check_target
from gptoss_serve.bench.loadtest.sweep import SweepResult, run_sweep
from gptoss_serve.bench.loadtest.workload import RequestSpec, Workload, make_prompt

__all__ = ["ConfigError", "Conversations", "LatencyStats", "LoadConfig", "LoadResult", "RequestRecord", "RequestSpec",
           "ServerError", "SweepResult", "Turn", "UnsafeTargetError", "Workload", "check_target", "make_prompt",
           "parse_goodput", "run_load", "run_sweep"]
