"""Steady load for a long while: does the attention replica's memory, or its KV-cache use, grow?

    python -m gptoss_serve.bench.soak                                           # 600 s, tiny model, CPU
    python -m gptoss_serve.bench.soak --duration 60 --sample-every 10 --warmup 20

Starts the Serve app (one attention replica) and keeps `--concurrency` streaming completions in flight for
`--duration` seconds (bench.loadtest, closed loop, prompt and output lengths drawn uniformly around their means).
Every `--sample-every` seconds it asks the replica for its resident memory (its own process and its engine core's)
and the KV blocks in use. Prints a table, then exits 1 if, from the first sample after `--warmup` to the last,
resident memory grew by more than `--rss-tolerance-mib`, or blocks in use by more than the requests in flight can
hold; or if any block is still in use once the load has stopped; or if a request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import dataclass, field

from gptoss_serve.bench.disconnect_storm import seconds_until_idle
from gptoss_serve.bench.local_app import local_app
from gptoss_serve.bench.loadtest import LoadConfig, LoadResult, run_load
from gptoss_serve.model.synthetic import write_preset

MIB = 1 << 20


@dataclass(frozen=True)
class Sample:
    at_s: float  # since the load started
    replica_rss: int  # bytes
    core_rss: int
    kv_blocks_in_use: int
    running: int
    waiting: int

    @property
    def rss(self) -> int:
        return self.replica_rss + self.core_rss


@dataclass
class SoakResult:
    samples: list[Sample]
    load: LoadResult
    blocks_in_use_after: int  # once the load has stopped and the replica is idle
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class SoakConfig:
    url: str
    app: str = "gptoss"
    model: str = "gpt-oss"
    duration_s: float = 600.0
    sample_every_s: float = 60.0
    warmup_s: float = 120.0
    concurrency: int = 8
    input_len: int = 48
    output_len: int = 32
    rss_tolerance_mib: float = 32.0
    block_size: int = 16

    @property
    def blocks_in_flight(self) -> int:
        """The most blocks the requests in flight can hold: the longest prompt and output of each (uniform lengths
        reach 1.5 x the mean), in full-attention and sliding-window blocks, each with one being filled."""
        longest = math.ceil(1.5 * (self.input_len + self.output_len))
        return self.concurrency * 2 * (math.ceil(longest / self.block_size) + 1)


async def sample(app: str, since: float) -> Sample:
    from ray import serve

    d = await serve.get_deployment_handle("AttentionReplica", app_name=app).describe.remote()
    return Sample(time.monotonic() - since, d["rss_bytes"], d["core_rss_bytes"], d["kv_blocks_in_use"],
                  d["running"], d["waiting"])


async def soak(config: SoakConfig) -> SoakResult:
    """Runs the load, samples the replica meanwhile, and checks what it saw (result.problems)."""
    load = LoadConfig(url=config.url, endpoint="completions", model=config.model, concurrency=config.concurrency,
                      duration=config.duration_s, grace_period=60, timeout=120, input_len=config.input_len,
                      output_len=config.output_len, length_dist="uniform", temperature=0.0)
    start = time.monotonic()
    running = asyncio.create_task(run_load(load))
    samples = []
    while (due := start + (len(samples) + 1) * config.sample_every_s) <= start + config.duration_s + 1e-6:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        samples.append(await sample(config.app, start))
    result = await running
    await asyncio.to_thread(seconds_until_idle, config.app, timeout=60)
    after = (await sample(config.app, start)).kv_blocks_in_use
    soaked = SoakResult(samples, result, after)
    soaked.problems = check(soaked, config)
    return soaked


def check(result: SoakResult, config: SoakConfig) -> list[str]:
    """What went wrong: growth past the tolerances between the first sample after the warm-up and the last,
    blocks left in use at the end, failed requests."""
    problems = []
    steady = [s for s in result.samples if s.at_s >= config.warmup_s - 1e-6]
    if len(steady) < 2:
        problems.append(f"fewer than 2 samples after the {config.warmup_s:.0f} s warm-up: nothing to compare")
    else:
        first, last = steady[0], steady[-1]
        grown = (last.rss - first.rss) / MIB
        if grown > config.rss_tolerance_mib:
            problems.append(f"resident memory grew by {grown:.0f} MiB from {first.at_s:.0f} s to {last.at_s:.0f} s "
                            f"(tolerance {config.rss_tolerance_mib:.0f} MiB)")
        blocks = last.kv_blocks_in_use - first.kv_blocks_in_use
        if blocks > config.blocks_in_flight:
            problems.append(f"KV blocks in use grew by {blocks} from {first.at_s:.0f} s to {last.at_s:.0f} s, more "
                            f"than the {config.blocks_in_flight} the requests in flight can hold")
    if result.blocks_in_use_after:
        problems.append(f"{result.blocks_in_use_after} KV blocks still in use with no request left")
    if result.load.failed or result.load.cancelled:
        problems.append(f"{result.load.failed} requests failed and {result.load.cancelled} were cancelled: "
                        f"{dict(result.load.errors_by_status)}")
    return problems


def table(result: SoakResult) -> str:
    lines = ["| at | replica RSS MiB | engine core RSS MiB | KV blocks in use | running | waiting |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in result.samples:
        lines.append(f"| {s.at_s:.0f} s | {s.replica_rss / MIB:.0f} | {s.core_rss / MIB:.0f} | {s.kv_blocks_in_use} "
                     f"| {s.running} | {s.waiting} |")
    load = result.load
    lines.append("")
    lines.append(f"{load.completed} requests completed, {load.failed} failed, {load.output_throughput:.0f} output "
                 f"tok/s; KV blocks in use after the load: {result.blocks_in_use_after}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--preset", default="tiny", choices=["tiny", "20b"])
    p.add_argument("--write-to", default="/tmp/gptoss-bench-model")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--num-cpus", type=int, default=4)
    p.add_argument("--port", type=int, default=8000)
    defaults = SoakConfig(url="")
    p.add_argument("--duration", type=float, default=defaults.duration_s)
    p.add_argument("--sample-every", type=float, default=defaults.sample_every_s)
    p.add_argument("--warmup", type=float, default=defaults.warmup_s)
    p.add_argument("--concurrency", type=int, default=defaults.concurrency)
    p.add_argument("--input-len", type=int, default=defaults.input_len)
    p.add_argument("--output-len", type=int, default=defaults.output_len)
    p.add_argument("--rss-tolerance-mib", type=float, default=defaults.rss_tolerance_mib)
    args = p.parse_args(argv)
    model = args.model or str(write_preset(args.write_to, args.preset))
    app = {"model": model, "num_gpus_per_replica": 1 if args.device == "cuda" else 0, "engine": {"max_model_len": 1024}}
    with local_app(app, num_cpus=args.num_cpus, port=args.port) as url:
        config = SoakConfig(url=url, duration_s=args.duration, sample_every_s=args.sample_every, warmup_s=args.warmup,
                            concurrency=args.concurrency, input_len=args.input_len, output_len=args.output_len,
                            rss_tolerance_mib=args.rss_tolerance_mib)
        result = asyncio.run(soak(config))
    print(table(result))
    for problem in result.problems:
        print(f"FAIL: {problem}")
    print("no growth" if not result.problems else f"{len(result.problems)} problem(s)")
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
