"""The token bitmask kernel (kernels/token_bitmask.py) on a batch's float32 logits, against the device's copy
bandwidth and against the same job in PyTorch on the device (bits unpacked by shifts, then a masked fill), both
replayed from CUDA graphs so that launch costs do not count.

    python -m gptoss_serve.bench.token_bitmask [--rows 1 64 256] [--vocab 201088] [--json PATH]

Bytes: the mask read (rows x ceil(vocab / 32) int32 words) plus -inf written over each forbidden token. Two masks:
one allowing 1% of the vocabulary (a position in the JSON's structure: nearly every logit is written) and one
allowing 99% (inside a string: nearly none is).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from gptoss_serve.bench.moe_kernel import copy_bandwidth, events_median, graphed
from gptoss_serve.cluster.grammar import bitmask_width

VOCAB = 201_088  # o200k_harmony's


def random_bitmask(rows: int, vocab: int, allowed: float, gen: torch.Generator) -> torch.Tensor:
    """int32 [rows, ceil(vocab / 32)] on the GPU allowing each token with probability `allowed`."""
    bits = torch.rand(rows, bitmask_width(vocab) * 32, generator=gen) < allowed  # [R, 32W]
    words = (bits.view(rows, -1, 32).to(torch.int64) << torch.arange(32)).sum(-1)  # [R, W], 0 .. 2^32 - 1
    return words.to(torch.int32).cuda()  # wraps to the same 32 bits


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 [R, W] -> bool [R, vocab], on the device: True where the token is allowed. Not the reference's
    unpack_token_bitmask, which reads the mask back to the host (NumPy's unpackbits, 17x faster on a CPU than these
    shifts) and so cannot be captured in a CUDA graph."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]


def apply_in_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    logits[rows] = logits[rows].masked_fill(~unpack(bitmask, logits.shape[1]), -math.inf)


def main(argv: list[str] | None = None) -> None:
    from gptoss_serve.kernels.token_bitmask import apply_token_bitmask

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy / 1e12:.2f} TB/s")
    print(f"{'rows':>5} {'allowed':>7} {'us':>7} {'GB/s':>7} {'%copy':>6} {'torch us':>9}")
    gen, results = torch.Generator().manual_seed(0), []
    for n in args.rows:
        for allowed in (0.01, 0.99):
            logits = torch.randn(n, args.vocab, device="cuda")  # [B, V] float32, as the sampler masks them
            bitmask, rows = random_bitmask(n, args.vocab, allowed, gen), torch.arange(n, device="cuda")
            forbidden = int((~unpack(bitmask, args.vocab)).sum())
            nbytes = bitmask.numel() * 4 + 4 * forbidden
            kernel, _ = graphed(lambda: apply_token_bitmask(logits, bitmask, rows))
            torch_version, _ = graphed(lambda: apply_in_torch(logits, bitmask, rows))
            seconds, torch_seconds = events_median([kernel], 200), events_median([torch_version], 200)
            results.append({"rows": n, "allowed": allowed, "us": seconds * 1e6, "bytes": nbytes,
                            "bytes_per_s": nbytes / seconds, "torch_us": torch_seconds * 1e6})
            print(f"{n:5d} {allowed:7.0%} {seconds * 1e6:7.1f} {nbytes / seconds / 1e9:7.0f} "
                  f"{nbytes / seconds / copy:6.1%} {torch_seconds * 1e6:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bytes_per_s": copy, "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
