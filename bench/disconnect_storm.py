"""Clients that leave after their first token: how fast the server frees everything, and serves on.

    python -m gptoss_serve.bench.disconnect_storm --preset tiny --clients 600          # CPU
    python -m gptoss_serve.bench.disconnect_storm --model DIR --device cuda --clients 600

Starts the Serve app, times a plain request, then opens `--clients` streaming completions at once (every other
one with n=2), each asking for 2,000 tokens and closing its connection after its first token. Prints how long
after the last client left the replicas report no running and no waiting request and every KV block free,
then times the plain request again.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx

from gptoss_serve.bench.loadtest.connections import ClientShards
from gptoss_serve.bench.local_app import local_app
from gptoss_serve.model.synthetic import write_preset

PLAIN = {"model": "gpt-oss", "prompt": "Hi", "max_tokens": 16, "temperature": 0, "ignore_eos": True}


async def leave_after_first(clients: ClientShards, n: int, *, model: str, max_tokens: int) -> int:
    """One client: a streaming completion (n choices) it leaves after the first chunk; its HTTP status."""
    body = {"model": model, "prompt": "go on", "n": n, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    slot, client = clients.acquire()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return r.status_code
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return 200
        return 200
    finally:
        clients.release(slot)


async def storm(url: str, clients: int, *, model: str = "gpt-oss", max_tokens: int = 2000) -> dict[int, int]:
    """`clients` streams at once (every other one with n=2), each left after its first chunk: status -> count.
    Returns when every client has left."""
    async with ClientShards(base_url=url, timeout=600) as shards:
        statuses = await asyncio.gather(*(leave_after_first(shards, 1 + i % 2, model=model, max_tokens=max_tokens)
                                          for i in range(clients)))
    counts: dict[int, int] = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    return counts


def replica_stats(app: str = "gptoss") -> dict:
    from ray import serve

    return serve.get_deployment_handle("AttentionReplica", app_name=app).describe.remote().result()


def is_idle(stats: dict) -> bool:
    """No request running or waiting, and every KV block free (block 0 is the null block; cached prefixes
    count as free)."""
    return not stats["running"] and not stats["waiting"] and not stats["kv_blocks_in_use"]


def seconds_until_idle(app: str = "gptoss", *, timeout: float = 600) -> float:
    """How long until the (one) attention replica is idle; TimeoutError with its stats if it is not in time."""
    start = time.perf_counter()
    while not is_idle(stats := replica_stats(app)):
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"the replica was not idle within {timeout:.0f} s: {stats}")
        time.sleep(0.05)
    return time.perf_counter() - start


def plain_seconds(url: str) -> float:
    start = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json=PLAIN, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--preset", default="tiny", choices=["tiny", "20b"])
    p.add_argument("--write-to", default="/tmp/gptoss-bench-model")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--clients", type=int, default=600)
    p.add_argument("--num-cpus", type=int, default=4)
    args = p.parse_args(argv)
    model = args.model or str(write_preset(args.write_to, args.preset))
    # room for every client's requests: the point is aborts, not admission
    app = {"model": model, "num_gpus_per_replica": 1 if args.device == "cuda" else 0,
           "max_ongoing_requests": args.clients + 8, "max_queued_requests": 0,
           "max_waiting_per_replica": 2 * args.clients, "engine": {"max_model_len": 4096}}
    with local_app(app, num_cpus=args.num_cpus) as url:
        plain_seconds(url)  # warm-up
        before = plain_seconds(url)
        statuses = asyncio.run(storm(url, args.clients))
        freed = seconds_until_idle()
        after = plain_seconds(url)
    print(f"{args.clients} clients (half with n=2), statuses {statuses}")
    print(f"all requests stopped and every KV block free {freed:.2f} s after the last client left")
    print(f"a plain request ({PLAIN['max_tokens']} tokens): {before * 1e3:.0f} ms before, {after * 1e3:.0f} ms after")


if __name__ == "__main__":
    main()
