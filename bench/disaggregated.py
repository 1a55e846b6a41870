"""Disaggregated serving (attention replicas + MoE workers over NCCL) beside colocated replicas, through Serve and
HTTP, on the GPUs of one host, app after app (each stopped before the next starts):

    python -m gptoss_serve.bench.disaggregated --model DIR [--load-format dummy] [--concurrency 1 64 256]
        [--apps colocated data-parallel disaggregated] [--attention-replicas 1] [--moe-workers 1] [--faults]
        [--micro-batches 2] [--reference PATH] [--json PATH]

- colocated: one replica on one GPU, its experts in process (the reference outputs).
- disaggregated: `--attention-replicas` attention replicas and `--moe-workers` MoE workers, each on a GPU of its
  own (4 GPUs and 120b: `--attention-replicas 2 --moe-workers 2`, or `3` and `1`). `--micro-batches 1` turns the
  ping-pong off (the app's default is 2): run the app both ways to see what the overlap is worth.
- data-parallel: as many colocated replicas as the disaggregated app has GPUs.
A dozen prompts get 64 greedy tokens from each app, one request at a time (the outputs must equal the colocated
app's: on random weights the logits are so flat that any change in how a batch is composed, and so in which GEMM
kernels run, flips the argmax; one sequence at a time both apps run the same kernels; --reference keeps the colocated
app's outputs in a file for a later run on the same machine that leaves that app out); then bursts of
streaming completions at each concurrency (prompts 128, outputs 128, ignore_eos) give output tok/s, per GPU, and
TPOT. --faults then runs on the disaggregated app (last by default, so that a failed fault costs no figure),
under load: kill -9 of a MoE worker, and SIGSTOP of one for 30 s: how long until the affected requests failed, how
long until a request succeeds again, and whether any hung.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import threading
import time

import httpx

from gptoss_serve.bench.served_vs_engine import stream_completion, workload

URL = "http://127.0.0.1:8000"
GREEDY_PROMPTS = 12
GREEDY_TOKENS = 64
# a fault's streams that have not ended by then count as hung; service not back by then counts as not back
CLIENT_TIMEOUT_S = 90.0
BACK_WITHIN_S = 150.0


def start_app(args: argparse.Namespace, app: str) -> int:
    """Deploys one app; -> the GPUs it holds."""
    from ray import serve

    from gptoss_serve.deployments.builder import build_app

    engine = {"max_model_len": 1024, "max_num_seqs": args.max_num_seqs,
              "gpu_memory_utilization": args.gpu_memory_utilization}
    base = {"model": args.model, "load_format": args.load_format, "engine": engine,
            "max_ongoing_requests": 2048, "max_queued_requests": 0, "max_waiting_per_replica": 2048}
    if app == "colocated":
        config, gpus = {**base, "num_gpus_per_replica": 1}, 1
    elif app == "disaggregated":
        config = {**base, "num_gpus_per_replica": 1, "num_attention_replicas": args.attention_replicas,
                  "num_moe_workers": args.moe_workers, "num_gpus_per_moe_worker": 1,
                  "expert_timeout_s": args.expert_timeout_s, "micro_batches": args.micro_batches}
        gpus = args.attention_replicas + args.moe_workers
    else:
        gpus = args.attention_replicas + args.moe_workers
        config = {**base, "num_gpus_per_replica": 1, "num_attention_replicas": gpus}
    serve.run(build_app(config), name="gptoss", route_prefix="/")
    return gpus


async def greedy_outputs(prompts: list[list[int]]) -> list[list[int]]:
    async with httpx.AsyncClient(timeout=60) as client:
        async def one(prompt) -> list[str]:
            r = await client.post(URL + "/v1/completions", json={
                "model": "gpt-oss", "prompt": prompt, "max_tokens": GREEDY_TOKENS, "temperature": 0,
                "ignore_eos": True, "logprobs": 0})
            r.raise_for_status()
            choice = r.json()["choices"][0]
            return choice["logprobs"]["tokens"]
        return [await one(p) for p in prompts]


async def burst(concurrency: int, seconds_cap: float = 120) -> dict:
    requests = workload(concurrency, (128, 128), (128, 128), seed=concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(seconds_cap), limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_completion(client, URL, p, n) for p, n in requests))
        wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    tpots = [(r["end"] - r["ttft"]) / max(1, r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    return {"concurrency": concurrency, "ok": len(ok), "tok_s": tokens / wall,
            "tpot_ms": statistics.median(tpots) * 1e3 if tpots else float("nan"),
            "ttft_ms": statistics.median(r["ttft"] for r in ok) * 1e3 if ok else float("nan")}


def fault(kind: str, worker_pid: int, stop_s: float) -> dict:
    """Streams 8 long requests, hits a MoE worker, and times the failures and the recovery."""
    outcomes: list[dict] = []

    def client() -> None:
        start, result = time.monotonic(), {"error_at": None, "status": None}
        try:
            with httpx.stream("POST", URL + "/v1/completions", timeout=CLIENT_TIMEOUT_S, json={
                    "model": "gpt-oss", "prompt": [1000 + i for i in range(64)], "max_tokens": 900,
                    "ignore_eos": True, "stream": True}) as r:
                result["status"] = r.status_code
                for line in r.iter_lines():
                    if '"error"' in line:
                        result["error_at"] = time.monotonic()
        except httpx.HTTPError as e:
            result["error_at"], result["exception"] = time.monotonic(), type(e).__name__
        result["ended_at"] = time.monotonic()
        print(f"[fault {kind}] a client ended {result['ended_at'] - hit_at:.1f} s after the fault, status "
              f"{result['status']}, error {result['error_at'] is not None}", flush=True)
        result["started_at"] = start
        outcomes.append(result)

    hit_at = time.monotonic()  # reset when the worker is hit
    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(5)  # all streaming
    hit_at = time.monotonic()
    print(f"[fault {kind}] hitting the worker (pid {worker_pid})", flush=True)
    os.kill(worker_pid, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
    resumed: list[bool] = []
    if kind == "stop":
        def resume() -> None:
            try:
                os.kill(worker_pid, signal.SIGCONT)
                resumed.append(True)
            except ProcessLookupError:  # the ExpertPool's health loop took it for hung and had it killed
                resumed.append(False)
        threading.Timer(stop_s, resume).start()
    for t in threads:
        t.join(timeout=CLIENT_TIMEOUT_S + 10)
    hung = sum(t.is_alive() for t in threads)
    failed = [o["error_at"] - hit_at for o in outcomes if o["error_at"] is not None]
    back_at = None
    while time.monotonic() - hit_at < BACK_WITHIN_S:
        try:
            r = httpx.post(URL + "/v1/completions", timeout=30, json={
                "model": "gpt-oss", "prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True})
            if r.status_code == 200:
                back_at = time.monotonic()
                break
            print(f"[fault {kind}] {time.monotonic() - hit_at:.1f} s: {r.status_code} {r.text[:120]}", flush=True)
        except httpx.HTTPError as e:
            print(f"[fault {kind}] {time.monotonic() - hit_at:.1f} s: {type(e).__name__}", flush=True)
        time.sleep(1)
    if kind == "stop":
        print(f"[fault stop] the stopped worker was {'resumed' if resumed and resumed[0] else 'killed by the pool'}",
              flush=True)
    return {"fault": kind, "clients": len(threads), "hung": hung, "failed": len(failed),
            "failed_within_s": max(failed) if failed else None,
            "service_back_after_s": back_at - hit_at if back_at else None}


def worker_pid() -> int:
    import ray

    from gptoss_serve.deployments.expert_pool import worker_name

    return ray.get(ray.get_actor(worker_name("gptoss", 0)).ping.remote())["pid"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    parser.add_argument("--moe-workers", type=int, default=1)
    parser.add_argument("--attention-replicas", type=int, default=1, help="of the disaggregated app, a GPU each")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="0.95 for 120b on an 80 GB GPU")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    # the disaggregated app last: its fault runs come after every app's figures (a failed fault cannot cost them)
    parser.add_argument("--apps", nargs="+", default=["colocated", "data-parallel", "disaggregated"])
    parser.add_argument("--expert-timeout-s", type=float, default=10.0)
    parser.add_argument("--micro-batches", type=int, default=2, help="of the disaggregated app's steps (ping-pong)")
    parser.add_argument("--faults", action="store_true")
    parser.add_argument("--reference", help="the colocated app's greedy outputs: written by a run that has that app, "
                        "read by one that has not")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    prompts = [p for p, _ in workload(GREEDY_PROMPTS, (16, 200), (1, 1), seed=7)]
    figures: dict = {"apps": {}}
    reference = None
    if args.reference and "colocated" not in args.apps:
        with open(args.reference) as f:
            reference = json.load(f)
    for app in args.apps:
        t = time.perf_counter()
        gpus = start_app(args, app)
        row: dict = {"gpus": gpus, "start_s": time.perf_counter() - t}
        print(f"[{app}] ready after {row['start_s']:.1f} s", flush=True)
        outputs = asyncio.run(greedy_outputs(prompts))
        if app == "colocated":
            reference = outputs
            if args.reference:
                with open(args.reference, "w") as f:
                    json.dump(outputs, f)
        if reference is not None:
            row["greedy_equal_prompts"] = sum(a == b for a, b in zip(outputs, reference))
            row["greedy_equal_tokens"] = sum(x == y for a, b in zip(outputs, reference) for x, y in zip(a, b))
        row["bursts"] = [asyncio.run(burst(c)) for c in args.concurrency]
        for b in row["bursts"]:
            b["tok_s_per_gpu"] = b["tok_s"] / gpus
            print(f"[{app}] concurrency {b['concurrency']:4d}: {b['tok_s']:9.1f} tok/s ({b['tok_s_per_gpu']:8.1f} a "
                  f"GPU), TPOT {b['tpot_ms']:6.2f} ms, TTFT {b['ttft_ms']:7.1f} ms, ok {b['ok']}", flush=True)
        if "greedy_equal_prompts" in row:
            print(f"[{app}] greedy outputs equal to colocated: {row['greedy_equal_prompts']}/{GREEDY_PROMPTS} prompts, "
                  f"{row['greedy_equal_tokens']}/{GREEDY_PROMPTS * GREEDY_TOKENS} tokens", flush=True)
        if app == "disaggregated" and args.faults:
            row["faults"] = []
            for kind in ("kill", "stop"):
                result = fault(kind, worker_pid(), stop_s=30)
                row["faults"].append(result)
                print(f"[{app}] fault {result}", flush=True)
        figures["apps"][app] = row
        serve.delete("gptoss")
        time.sleep(5)  # the GPUs' memory goes back before the next app
    serve.shutdown()
    ray.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
