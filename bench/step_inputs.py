"""The host's cost of building a step's inputs (cluster/step_inputs.py), the part of every step the host does per
sequence, against the device's time for the step: under async scheduling it runs while the device computes the step
before, and a host slower than the device leaves the device idle.

    python -m gptoss_serve.bench.step_inputs [--batches 1 8 64 256] [--context 500] [--chunk 128] [--repeat 200]

Decode steps of B sequences (each `--context` tokens, its newest token still PENDING on the host, as under async
scheduling), and the same with one prompt chunk of `--chunk` tokens beside them; block size 16, a full and a
sliding-window table per sequence. Prints the best mean of 5 rounds in µs. No model, no device: CPU only.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from gptoss_serve.cluster.block_manager import FULL, SLIDING
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.cluster.sequence import PENDING, Sequence
from gptoss_serve.cluster.step_inputs import StepInputs

BLOCK_SIZE = 16
PARAMS = SamplingParams(temperature=0, max_tokens=16)


def decoding(index: int, context: int, rng: random.Random) -> Sequence:
    """A sequence of `context` tokens whose newest, sampled by the step in flight, is PENDING."""
    seq = Sequence(f"d{index}", [rng.randrange(1000, 100_000) for _ in range(context - 2)], PARAMS)
    seq.output_token_ids += [rng.randrange(1000, 100_000), PENDING]
    seq.pending_row = index
    seq.num_computed_tokens = context - 1
    blocks = -(-context // BLOCK_SIZE)
    seq.block_tables = {FULL: [1 + index * blocks + i for i in range(blocks)],
                        SLIDING: [1 + index * blocks + i for i in range(blocks)]}
    return seq


def chunking(chunk: int, rng: random.Random) -> Sequence:
    """A prompt twice the chunk long, its first chunk computed."""
    seq = Sequence("prompt", [rng.randrange(1000, 100_000) for _ in range(2 * chunk)], PARAMS)
    seq.num_computed_tokens = chunk
    blocks = -(-2 * chunk // BLOCK_SIZE)
    seq.block_tables = {FULL: list(range(1, blocks + 1)), SLIDING: list(range(1, blocks + 1))}
    return seq


def time_build(scheduled: list[tuple[Sequence, int]], repeat: int) -> float:
    """Best of 5 rounds of the mean time of one build, in µs."""
    pending = torch.zeros(len(scheduled), dtype=torch.int64)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            StepInputs.build(scheduled, block_size=BLOCK_SIZE, device=torch.device("cpu"), pending_tokens=pending)
        best = min(best, (time.perf_counter() - start) / repeat)
    return best * 1e6


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--context", type=int, default=500, help="tokens of each decoding sequence")
    p.add_argument("--chunk", type=int, default=128, help="the prompt chunk beside the decodes")
    p.add_argument("--repeat", type=int, default=200)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    rng = random.Random(0)
    rows = []
    print(f"{'sequences':>10}{'decode step µs':>16}{'with a ' + str(args.chunk) + '-token chunk µs':>30}")
    for batch in args.batches:
        decodes = [(decoding(i, args.context, rng), 1) for i in range(batch)]
        row = {"batch": batch, "decode_us": time_build(decodes, args.repeat),
               "mixed_us": time_build(decodes + [(chunking(args.chunk, rng), args.chunk)], args.repeat)}
        rows.append(row)
        print(f"{batch:>10}{row['decode_us']:>16.1f}{row['mixed_us']:>30.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"context": args.context, "chunk": args.chunk, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
