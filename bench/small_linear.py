"""gpt-oss's dense projections at a handful of tokens: kernels/small_linear.py against F.linear (cuBLAS), in graph
replays, with the bytes each reads against the device's copy bandwidth measured in the same run.

    python -m gptoss_serve.bench.small_linear [--rows 1 4 16 64] [--json PATH]

Bytes: the bf16 weight and bias, the activations in and out. Shapes: QKV (2880 -> 5120), o_proj (4096 -> 2880), the
router (2880 -> 32 for 20b, 2880 -> 128 for 120b; the other shapes are the same in both) and the unembedding
(2880 -> 201,088). A few tile choices are timed too (--sweep).
"""

from __future__ import annotations

import argparse
import json

import torch

from gptoss_serve.bench.moe_kernel import copy_bandwidth, events_median, graphed

# (out features, in features, bias): 20b and 120b share every shape but the router's (32 or 128 experts)
SHAPES = {"qkv": (5120, 2880, True), "o_proj": (2880, 4096, True), "router": (32, 2880, True),
          "router_120b": (128, 2880, True), "unembed": (201088, 2880, False)}
TILES = {"n32-k256-s4-w4": dict(block_n=32, block_k=256, num_stages=4, num_warps=4),
         "n16-k256-s4-w4": dict(block_n=16, block_k=256, num_stages=4, num_warps=4),
         "n16-k512-s3-w4": dict(block_n=16, block_k=512, num_stages=3, num_warps=4),
         "n64-k128-s4-w4": dict(block_n=64, block_k=128, num_stages=4, num_warps=4),
         "n32-k128-s6-w4": dict(block_n=32, block_k=128, num_stages=6, num_warps=4),
         "n16-k128-s8-w2": dict(block_n=16, block_k=128, num_stages=8, num_warps=2),
         # each program's whole weight tile asked of L2 first (kernels/l2_prefetch.py)
         "n32-k256-s4-w4-prefetch": dict(block_n=32, block_k=256, num_stages=4, num_warps=4, prefetch=True),
         "n64-k128-s4-w4-prefetch": dict(block_n=64, block_k=128, num_stages=4, num_warps=4, prefetch=True),
         "n16-k256-s2-w4-prefetch": dict(block_n=16, block_k=256, num_stages=2, num_warps=4, prefetch=True)}


def main(argv: list[str] | None = None) -> None:
    from gptoss_serve.kernels.small_linear import small_linear

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--sweep", action="store_true", help="also time the other tile choices")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy / 1e12:.2f} TB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows_out = []
    for name, (n, k, has_bias) in SHAPES.items():
        weight = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).bfloat16()
        bias = torch.randn(n, device="cuda", generator=gen).bfloat16() if has_bias else None
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
            nbytes = (n * k + (n if has_bias else 0) + m * (k + n)) * 2
            ours, out = graphed(lambda: small_linear(x, weight, bias))
            theirs, ref = graphed(lambda: torch.nn.functional.linear(x, weight, bias))
            row = dict(shape=name, rows=m, bytes=nbytes, ours_us=events_median([ours], 200) * 1e6,
                       cublas_us=events_median([theirs], 200) * 1e6,
                       diff=((out.float() - ref.float()).norm() / ref.float().norm()).item())
            if args.sweep:
                row["sweep_us"] = {}
                for tile, kw in TILES.items():
                    try:
                        replay, _ = graphed(lambda kw=kw: small_linear(x, weight, bias, **kw))
                        row["sweep_us"][tile] = events_median([replay], 200) * 1e6
                    except Exception as e:  # noqa: BLE001 - a tile that does not compile must not end the sweep
                        print(f"  {tile}: {str(e).splitlines()[0][:160]}", flush=True)
            rows_out.append(row)
            print(f"{name:>11} rows {m:>3}: ours {row['ours_us']:7.1f} us ({nbytes / row['ours_us'] / 1e3:6.0f} GB/s, "
                  f"{100 * nbytes / (row['ours_us'] * 1e-6) / copy:3.0f}% of copy)  cuBLAS "
                  f"{row['cublas_us']:7.1f} us ({100 * nbytes / (row['cublas_us'] * 1e-6) / copy:3.0f}%)  "
                  f"diff {row['diff']:.1e}" + ("  sweep: " + ", ".join(f"{t} {v:.1f}" for t, v in
                                                                        row.get("sweep_us", {}).items())
                                                if args.sweep else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bytes_per_s=copy, rows=rows_out), f, indent=1)


if __name__ == "__main__":
    main()
