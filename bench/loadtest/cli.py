"""Command line: python -m gptoss_serve.bench.loadtest --url URL (--concurrency N | --request-rate R)
    (--num-requests N | --duration S) [--sweep ...] [--result-json F] [--plot F]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gptoss_serve.bench.loadtest.client import ServerError
from gptoss_serve.bench.loadtest.config import (ENDPOINTS, LENGTH_DISTS, WORKLOADS, ConfigError, LoadConfig,
                                                parse_goodput)
from gptoss_serve.bench.loadtest.lengths import SHAREGPT_SIGMA_INPUT, SHAREGPT_SIGMA_OUTPUT
from gptoss_serve.bench.loadtest.metrics import CPU_BOUND
from gptoss_serve.bench.loadtest.plot import PLOT_STATS, plot_curves
from gptoss_serve.bench.loadtest.report import CLIENT_BOUND_WARNING, format_result, format_sweep
from gptoss_serve.bench.loadtest.runner import run_load
from gptoss_serve.bench.loadtest.safety import UnsafeTargetError, check_target
from gptoss_serve.bench.loadtest.server_metrics import MetricsScrapeError
from gptoss_serve.bench.loadtest.sweep import curve_of, load_curve, run_sweep

EPILOG = f"""
examples:
  python -m gptoss_serve.bench.loadtest --url http://127.0.0.1:8000 --concurrency 16 --num-requests 200
  python -m gptoss_serve.bench.loadtest --url http://127.0.0.1:8000 --request-rate 4 --duration 60 --goodput ttft:500 tpot:50
  python -m gptoss_serve.bench.loadtest --url http://127.0.0.1:8000 --sweep --concurrencies 1,8,32 --num-requests 100 \\
      --label ours --result-json ours.json --plot ours.png --compare vllm.json
  python -m gptoss_serve.bench.loadtest --url http://127.0.0.1:8000 --workload conversation --concurrency 8 \\
      --system-prompt-len 16384 --turns 8 --input-len 256 --output-len 256 --num-requests 128

lengths: fixed and uniform default to 1024 prompt / 128 output tokens (vLLM's random dataset); sharegpt draws
a lognormal truncated to [4, 5x mean] whose mean is --input-len/--output-len, 216 and 200 by default
(spread sigma {SHAREGPT_SIGMA_INPUT} for prompts, {SHAREGPT_SIGMA_OUTPUT} for outputs).
--workload conversation: each of --concurrency users shares one --system-prompt-len system prompt and holds a
conversation that grows every turn (its answer and a new --input-len message appended), --turns turns long; the
table adds the median TTFT of each turn. --system-prompts G spreads the users over G system prompts (user u gets
prompt u % G); --think-time S makes each user wait S seconds between an answer and its next turn. Chat,
--endpoint responses (each turn after the first sends its new message and previous_response_id; needs
--no-ignore-eos), or --endpoint completions (the conversation as a plain-text transcript: TTFT without the chat
template's parsing, e.g. for random checkpoints). Closed loop (no --request-rate).
Only loopback URLs are accepted unless --allow-host names the host.
"""


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gptoss_serve.bench.loadtest", epilog=EPILOG,
                                description="Load generator for OpenAI-compatible streaming servers.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_argument_group("target")
    target.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    target.add_argument("--endpoint", choices=ENDPOINTS, default="chat",
                        help="chat: /v1/chat/completions, completions: /v1/completions (default chat)")
    target.add_argument("--model", help="model name to send (default: the first id of GET /v1/models)")
    target.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    target.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                        help="allow this non-loopback host (repeatable)")
    load = p.add_argument_group("load shape and bounds")
    load.add_argument("--concurrency", type=int, help="requests in flight (with --request-rate: a cap)")
    load.add_argument("--request-rate", type=float, help="arrivals per second (Poisson unless --burstiness)")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1: Poisson)")
    load.add_argument("--num-requests", type=int, help="stop after this many requests")
    load.add_argument("--duration", type=float, help="stop sending after this many seconds")
    load.add_argument("--grace-period", type=float, default=30.0,
                      help="seconds requests in flight at the end of --duration may take before being cancelled")
    load.add_argument("--timeout", type=float, default=300.0, help="hard limit on one request, seconds")
    work = p.add_argument_group("workload")
    work.add_argument("--workload", choices=WORKLOADS, default="random",
                      help="random: independent prompts; conversation: users in growing multi-turn chats")
    work.add_argument("--system-prompt-len", type=int, default=16384,
                      help="conversation: tokens of the system prompt all users share")
    work.add_argument("--turns", type=int, default=8, help="conversation: turns before a user starts anew")
    work.add_argument("--system-prompts", type=int, default=1, metavar="G",
                      help="conversation: distinct system prompts; user u gets prompt u %% G")
    work.add_argument("--think-time", type=float, default=0.0, metavar="S",
                      help="conversation: seconds a user waits between an answer and its next turn")
    work.add_argument("--input-len", type=int, help="prompt tokens (mean for uniform/sharegpt; conversation: "
                                                    "each new user message)")
    work.add_argument("--output-len", type=int, help="output tokens (mean for uniform/sharegpt)")
    work.add_argument("--length-dist", choices=LENGTH_DISTS, default="fixed")
    work.add_argument("--range-ratio", type=float, default=0.5, help="uniform: lengths in [len*(1-r), len*(1+r)]")
    work.add_argument("--temperature", type=float, default=0.0)
    work.add_argument("--no-ignore-eos", action="store_true",
                      help="do not send ignore_eos/min_tokens (servers without vLLM's extra fields); then an "
                           "answer may be shorter than asked")
    work.add_argument("--seed", type=int, default=0, help="same seed, same prompts, lengths and arrivals")
    work.add_argument("--extra-body", type=json.loads, default={}, help="JSON object merged into each request")
    work.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS",
                      help="latency targets, e.g. ttft:500 tpot:50 e2el:10000")
    sweep = p.add_argument_group("sweep")
    sweep.add_argument("--sweep", action="store_true", help="run one point per value of the list given")
    sweep.add_argument("--concurrencies", type=_ints, help="e.g. 1,8,32")
    sweep.add_argument("--request-rates", type=_floats, help="e.g. 1,2,4")
    out = p.add_argument_group("output")
    out.add_argument("--metrics-url", help="the app's Prometheus endpoint (e.g. http://127.0.0.1:8080/metrics): "
                     "its prefix-cache hit rate and routing decisions over the run")
    out.add_argument("--metrics-settle", type=float, default=12.0, metavar="S",
                     help="seconds after the run before the last scrape (Ray's exporters report every 10 s)")
    out.add_argument("--label", help="name of this run in tables, JSON and plots")
    out.add_argument("--result-json", type=Path, help="write the figures (all points for a sweep)")
    out.add_argument("--save-detailed", action="store_true", help="add per-request figures to --result-json")
    out.add_argument("--plot", type=Path, help="write a PNG: output tok/s against TTFT and TPOT")
    out.add_argument("--plot-stat", choices=PLOT_STATS, default="median")
    out.add_argument("--compare", nargs="+", type=Path, default=[], metavar="JSON",
                     help="earlier --result-json files drawn as extra curves")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    if not isinstance(args.extra_body, dict):
        raise ConfigError("--extra-body must be a JSON object")
    return LoadConfig(
        url=args.url, endpoint=args.endpoint, model=args.model, concurrency=args.concurrency,
        request_rate=args.request_rate, burstiness=args.burstiness, num_requests=args.num_requests,
        duration=args.duration, grace_period=args.grace_period, timeout=args.timeout, workload=args.workload,
        system_prompt_len=args.system_prompt_len, turns=args.turns, system_prompts=args.system_prompts,
        think_time=args.think_time, input_len=args.input_len,
        output_len=args.output_len, length_dist=args.length_dist, range_ratio=args.range_ratio,
        temperature=args.temperature, ignore_eos=not args.no_ignore_eos, seed=args.seed,
        extra_body=args.extra_body, goodput=parse_goodput(args.goodput), allow_hosts=tuple(args.allow_host),
        api_key=args.api_key, label=args.label, metrics_url=args.metrics_url, metrics_settle=args.metrics_settle,
    )


async def _run(args: argparse.Namespace, config: LoadConfig) -> tuple[dict[str, Any], str, int]:
    """(JSON to write, table to print, completed requests)."""
    progress = not args.no_progress
    if args.sweep or args.concurrencies or args.request_rates:
        result = await run_sweep(config, concurrencies=args.concurrencies or (),
                                 request_rates=args.request_rates or (), progress=progress)
        data = result.to_json_dict(detailed=args.save_detailed)
        table = format_sweep(data["points"], swept=result.swept, title=f"{result.label}: {config.url}")
        return data, table, sum(p.completed for p in result.points)
    config.validate()
    single = await run_load(config, progress=progress)
    return single.to_json_dict(detailed=args.save_detailed), format_result(single), single.completed


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        check_target(config.url, allow_hosts=config.allow_hosts)
        compare = [load_curve(path) for path in args.compare]  # unreadable files fail before any load is sent
        if args.plot and importlib.util.find_spec("matplotlib") is None:
            raise ConfigError("--plot needs matplotlib: pip install -e '.[bench]'")
        data, table, completed = asyncio.run(_run(args, config))
    except (ConfigError, UnsafeTargetError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")  # the message, without a page of usage around it
    except ServerError as exc:  # only the model lookup raises; requests record their own failures
        print(f"loadtest: {config.url}: {exc}", file=sys.stderr)
        return 1
    except MetricsScrapeError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("loadtest: interrupted", file=sys.stderr)
        return 130
    print(table)
    if any((p.get("load_generator_cpu") or 0) >= CPU_BOUND for p in data.get("points", [data])):
        print(f"loadtest: {CLIENT_BOUND_WARNING}", file=sys.stderr)
    if args.result_json:
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.result_json}", file=sys.stderr)
    if args.plot:
        curves = [curve_of(data, label=args.label), *compare]
        plot_curves(curves, args.plot, stat=args.plot_stat)
        print(f"wrote {args.plot}", file=sys.stderr)
    if not completed:
        print("loadtest: no request completed", file=sys.stderr)
        return 1
    return 0
