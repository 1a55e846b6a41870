"""How fast the MoE kernels' weight reads can go, without their decode or products: the access pattern alone.

    python -m gptoss_serve.bench.weight_stream [--experts 32] [--json PATH]

One layer's gate_up blocks at gpt-oss's shape (int32 words [E, 5760, 90, 4], 265 MB for 20b's 32 experts: more than
L2 holds) are read by kernels/weight_stream.py in the pieces the MoE kernels read them (row tiles of 64-128 rows,
2-8 blocks of 16 bytes a row a step, the next step's loads out before this step's are used), with the programs an
SM set as the real kernels run (~3 at the decode tiles) or one a tile. Each row prints GB/s and its share of the
copy bandwidth measured first (1 GiB device-to-device, bytes read + written: a read-only stream can pass it a
little). Variants: the checkpoint's layout as the kernels read it today; the same with each row's bytes asked of L2
a window ahead (a bulk prefetch a row, or one line prefetch a 128 bytes); the weights re-laid in 512-byte tiles of
16 rows x 2 blocks; and torch's own sum over the tensor (a plain stream). Every variant's checksums are checked
against the reference's first.

If the checkpoint layout's row here is far under the tiled or prefetched ones at the decode tiles' concurrency,
the layout (not the decode) holds the MoE kernels near 38% of copy bandwidth; kernels/NOTES-mxfp4-moe.md.
"""

from __future__ import annotations

import argparse
import json

import torch

from gptoss_serve.bench.moe_kernel import copy_bandwidth, events_median

ROWS, GROUPS = 5760, 90  # gate_up's rows (2 x 2,880) and 32-value blocks a row (2,880 / 32)

# (name, stream_checksums keyword arguments; "per_sm" -> programs = SMs x per_sm, None: one program a row tile)
VARIANTS = [
    ("checkpoint 128 rows x 2 blocks (decode_wide gate_up)", dict(block_rows=128, groups=2, per_sm=3)),
    ("  the same, one program a tile", dict(block_rows=128, groups=2, per_sm=None)),
    ("  4 blocks a step", dict(block_rows=128, groups=4, per_sm=3)),
    ("  8 blocks a step", dict(block_rows=64, groups=8, per_sm=3)),
    ("checkpoint 64 rows x 4 blocks (decode_wide down)", dict(block_rows=64, groups=4, per_sm=3)),
    ("checkpoint 128 x 2, bulk prefetch 256 B a row", dict(block_rows=128, groups=2, per_sm=3, prefetch_bytes=256)),
    ("checkpoint 128 x 2, bulk prefetch 512 B a row", dict(block_rows=128, groups=2, per_sm=3, prefetch_bytes=512)),
    ("checkpoint 128 x 2, line prefetch 256 B a row", dict(block_rows=128, groups=2, per_sm=3, prefetch_bytes=256,
                                                           bulk=False)),
    ("checkpoint 128 x 2, line prefetch 512 B a row", dict(block_rows=128, groups=2, per_sm=3, prefetch_bytes=512,
                                                           bulk=False)),
    ("tiled 128 rows x 2 blocks", dict(block_rows=128, groups=2, per_sm=3, tiled=True)),
    ("  the same, one program a tile", dict(block_rows=128, groups=2, per_sm=None, tiled=True)),
    ("tiled 64 rows x 4 blocks", dict(block_rows=64, groups=4, per_sm=3, tiled=True)),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=32, help="experts in the tensor (20b: 32)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.experts < 1:
        parser.error("--experts must be at least 1")
    from gptoss_serve.kernels.weight_stream import stream_checksums, tile_rows
    from gptoss_serve.kernels.weight_stream_reference import stream_checksums_reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    words = torch.randint(-2**31, 2**31 - 1, (args.experts, ROWS, GROUPS, 4), generator=gen, device="cuda",
                          dtype=torch.int64).to(torch.int32)
    tiled = tile_rows(words)
    nbytes = words.numel() * 4
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy bandwidth {copy / 1e12:.2f} TB/s (1 GiB device-to-device, read + write); "
          f"{nbytes / 1e6:.0f} MB of gate_up blocks ({args.experts} experts), {sms} SMs", flush=True)
    references = {}
    rows = []
    print(f"{'variant':52} {'programs':>8} {'us':>8} {'GB/s':>6} {'%copy':>6}", flush=True)
    for name, spec in VARIANTS:
        spec = dict(spec)
        per_sm = spec.pop("per_sm")
        programs = sms * per_sm if per_sm else None
        source = tiled if spec.get("tiled") else words
        if spec["block_rows"] not in references:
            references[spec["block_rows"]] = stream_checksums_reference(words, spec["block_rows"]).cuda()
        out = stream_checksums(source, programs=programs, **spec)
        if not torch.equal(out, references[spec["block_rows"]]):
            raise SystemExit(f"{name}: checksums differ from the reference: the kernel misread the weights")
        seconds = events_median([lambda: stream_checksums(source, programs=programs, out=out, **spec)], 30)
        rows.append(dict(name=name.strip(), programs=programs or out.numel(), seconds=seconds, **spec,
                         bytes_per_s=nbytes / seconds))
        print(f"{name:52} {programs or out.numel():>8} {seconds * 1e6:>8.1f} {nbytes / seconds / 1e9:>6.0f} "
              f"{100 * nbytes / seconds / copy:>5.0f}%", flush=True)
    seconds = events_median([lambda: words.sum(dtype=torch.int64)], 30)
    rows.append(dict(name="torch sum", seconds=seconds, bytes_per_s=nbytes / seconds))
    print(f"{'torch sum over the tensor (a plain stream)':52} {'':>8} {seconds * 1e6:>8.1f} "
          f"{nbytes / seconds / 1e9:>6.0f} {100 * nbytes / seconds / copy:>5.0f}%", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, copy_bytes_per_s=copy, bytes=nbytes, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
