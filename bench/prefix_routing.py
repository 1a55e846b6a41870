"""Prefix-aware routing against routing by room, through the served app: the same multi-turn conversation load on
several attention replicas, routed each way, and the prefix-cache hit rate the app's own counters report.

    python -m gptoss_serve.bench.prefix_routing [--replicas 4] [--users 64] [--turns 6] [--system-prompts 4]
        [--system-prompt-len 320] [--input-len 32] [--output-len 16] [--json FILE]          # tiny model, CPU
    python -m gptoss_serve.bench.prefix_routing --model /tmp/c20 --load-format dummy --device cuda \\
        --replicas 2 --system-prompt-len 8192 --input-len 256 --output-len 128 --max-model-len 16384 \\
        --endpoint completions                                                                  # a GPU each
        ... --gpus-per-replica 0.5 --kv-cache-gib 20                                            # both on one GPU

For each of attention_routing=prefix and most_room: a local Ray cluster serves the app (bench/local_app.py) with
Ray's metrics agent on --metrics-port; the load tester runs --users conversations of --turns turns each (a user's
next turn once its answer is complete), the users spread over --system-prompts shared system prompts, and reads the
app's counters before and after (bench/loadtest/server_metrics.py): the prompt tokens found in a replica's prefix
cache over those looked up, per replica and overall, and the router's decisions; and, per turn, the cached tokens
each answer's usage reports over its prompt tokens. The load starts once the metrics agent answers (it can come up
after the app); if it does not within METRICS_WAIT_S, the run goes on with the answers' usage and the TTFTs alone
and says so. Prints one row per routing, with the median TTFT of the first turn and of the later ones; --json FILE
writes everything.

--endpoint completions sends each turn as the conversation's plain-text transcript (bench/loadtest/conversation.py)
instead of chat messages. Use it for TTFTs on random weights: their output never forms a harmony header, so a chat
stream holds back its first 32 tokens (the parser's header limit) and TTFT would count 32 decode steps too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

from gptoss_serve.bench.local_app import local_app
from gptoss_serve.bench.loadtest import LoadConfig, run_load
from gptoss_serve.bench.loadtest.server_metrics import ServerCounters
from gptoss_serve.model.synthetic import write_preset

ROUTINGS = ("prefix", "most_room")


METRICS_WAIT_S = 60.0  # the agent comes up beside the app, and on a busy machine after it


def metrics_agent_up(url: str, seconds: float) -> bool:
    """Whether Ray's metrics agent serves `url` within `seconds` (polled)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            httpx.get(url, timeout=5.0).raise_for_status()
            return True
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)


def run_routing(routing: str, args: argparse.Namespace, model_dir: str) -> dict:
    app = {"model": model_dir, "load_format": args.load_format, "device": args.device,
           "num_attention_replicas": args.replicas, "attention_routing": routing,
           "num_gpus_per_replica": args.gpus_per_replica if args.device == "cuda" else 0,
           "num_cpus_per_replica": 1 if args.device == "cuda" else 0.5,
           "engine": {"max_model_len": args.max_model_len, "max_num_seqs": max(args.users, 8),
                      **({"kv_cache_gib": args.kv_cache_gib} if args.kv_cache_gib else {})}}
    with local_app(app, num_cpus=args.num_cpus, port=args.port, metrics_export_port=args.metrics_port) as url:
        metrics_url = f"http://127.0.0.1:{args.metrics_port}/metrics"
        if not metrics_agent_up(metrics_url, METRICS_WAIT_S):
            print(f"{routing}: Ray's metrics agent did not answer at {metrics_url} within {METRICS_WAIT_S:.0f} s: "
                  "the replicas' hit rates and the router's decisions are left out (the answers' usage still "
                  "gives the cached share by turn)", flush=True)
            metrics_url = None
        config = LoadConfig(url=url, endpoint=args.endpoint, workload="conversation", concurrency=args.users,
                            num_requests=args.users * args.turns, turns=args.turns,
                            system_prompts=args.system_prompts, system_prompt_len=args.system_prompt_len,
                            input_len=args.input_len, output_len=args.output_len, timeout=args.timeout,
                            metrics_url=metrics_url, label=routing)
        result = asyncio.run(run_load(config))
    server = result.server or ServerCounters()
    queries = dict(server.prefix_queries)
    mean_load = statistics.mean(queries.values()) if queries else 0.0
    later = [r.ttft for r in result.records if r.ok and r.turn and r.turn > 1 and r.ttft is not None]
    first = [r.ttft for r in result.records if r.ok and r.turn == 1 and r.ttft is not None]
    return {"routing": routing, "completed": result.completed, "failed": result.failed,
            "hit_rate": server.hit_rate, "hit_rate_by_replica": server.hit_rate_by_replica,
            "hit_rate_by_turn": dict(result.cached_share_by_turn),
            "prompt_tokens_by_replica": queries,
            "max_over_mean_load": max(queries.values()) / mean_load if mean_load else None,
            "routing_decisions": dict(server.routing),
            "ttft_first_turn_median_ms": statistics.median(first) * 1e3 if first else None,
            "ttft_later_turns_median_ms": statistics.median(later) * 1e3 if later else None,
            "load": result.to_json_dict()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the tiny random preset, written to --write-to)")
    p.add_argument("--write-to", default="/tmp/gptoss-prefix-routing-model")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--replicas", type=int, default=4, help="attention replicas")
    p.add_argument("--users", type=int, default=64, help="conversations in flight")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-prompts", type=int, default=4, help="shared system prompts (user u holds u % G)")
    p.add_argument("--system-prompt-len", type=int, default=320)
    p.add_argument("--input-len", type=int, default=32, help="tokens of each new user message")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                   help="completions: turns as plain-text transcripts, TTFT without the chat stream's header hold-back")
    p.add_argument("--gpus-per-replica", type=float, default=1.0,
                   help="with --device cuda: 0.5 puts two replicas on one GPU (give each --kv-cache-gib)")
    p.add_argument("--kv-cache-gib", type=float, help="engine.kv_cache_gib of each replica (replicas sharing a GPU)")
    p.add_argument("--num-cpus", type=int, default=8, help="Ray CPUs (logical: may exceed the cores)")
    p.add_argument("--port", type=int, default=8000, help="the app's HTTP port on 127.0.0.1")
    p.add_argument("--metrics-port", type=int, default=18080, help="Ray's metrics agent (Prometheus) port")
    p.add_argument("--timeout", type=float, default=600.0, help="limit on one request, seconds")
    p.add_argument("--routings", nargs="+", choices=ROUTINGS, default=list(ROUTINGS))
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    model_dir = args.model or str(write_preset(args.write_to, "tiny", seed=1))
    rows = [run_routing(routing, args, model_dir) for routing in args.routings]
    print(f"\n{args.replicas} attention replicas, {args.users} conversations x {args.turns} turns, "
          f"{args.system_prompts} system prompts of {args.system_prompt_len} tokens")
    print(f"{'routing':>10}  {'hit rate':>8}  {'max/mean load':>13}  {'TTFT turn 1 ms':>14}  {'TTFT later ms':>13}  "
          f"decisions")
    for r in rows:
        load = f"{r['max_over_mean_load']:.2f}" if r["max_over_mean_load"] else "-"
        hit = f"{r['hit_rate']:.3f}" if r["hit_rate"] is not None else "-"
        first = f"{r['ttft_first_turn_median_ms']:.1f}" if r["ttft_first_turn_median_ms"] else "-"
        later = f"{r['ttft_later_turns_median_ms']:.1f}" if r["ttft_later_turns_median_ms"] else "-"
        print(f"{r['routing']:>10}  {hit:>8}  {load:>13}  {first:>14}  {later:>13}  {r['routing_decisions']}")
        print(f"{'':>10}  hit rate by turn (answers' usage): "
              + ", ".join(f"{turn}: {rate:.3f}" for turn, rate in r["hit_rate_by_turn"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
