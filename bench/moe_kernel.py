"""One MoE layer at gpt-oss's shape: the MXFP4 Triton kernel against the bf16 grouped GEMM, per token count.

    python -m gptoss_serve.bench.moe_kernel [--preset 20b|120b] [--tokens 1 16 64 256 1024 4096]
        [--sweep [--sweep-tokens ...]] [--prefetch] [--json PATH] [--dump DIR]

Measures the device's copy bandwidth first (a 1 GiB device-to-device copy, bytes read + written), then per token
count (uniform random top-4 routing over the preset's experts: 32 for 20b, 128 for 120b; hidden = intermediate =
2880 in both) the layer's time: the median of
single CUDA-graph replays timed with events (the queue filled ahead by a sleep kernel, several input sets in
rotation), and eagerly (back-to-back calls, launch costs included). The bf16 path is LocalExperts' grouped GEMM
(torch._grouped_mm) on the same weights dequantized, forward_grouped, eagerly and in a graph. Bytes moved count the packed weights of the experts a batch touches
(blocks + scales + bias) plus the activations in and out; for bf16, the same experts' bf16 weights. "diff" is
||mxfp4 - bf16|| / ||bf16|| of the two outputs; TFLOP/s is the MXFP4 layer's matrix-product FLOPs a second against
the bf16 peak measured first (an 8192^3 torch.matmul), for the token counts bound by the products, and "tiles" the
preset the call picks. Each row also gives the per-kernel GPU time (torch.profiler).
--sweep also times every tile preset, the plain-Triton decode and presets at the other load depth at --sweep-tokens,
to choose the defaults; --prefetch times the picked tensor-core tiles with and without L2 prefetches of the weight
rows (kernels/l2_prefetch.py); --dump prints registers/spills of every compiled variant and writes one gate_up's
TTGIR/PTX.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from collections.abc import Callable

import torch

from gptoss_serve.kernels.moe_reference import packed_bytes_per_expert, relative_error
from gptoss_serve.model import mxfp4
from gptoss_serve.model.config import GptOssConfig
from gptoss_serve.model.experts import LocalExperts
from gptoss_serve.model.packed_experts import bf16_copy, random_packed_experts
from gptoss_serve.model.synthetic import preset_config

INPUT_SETS = 4  # routings in rotation, so repeated runs do not find one batch's experts in L2


def events_median(fns: list[Callable[[], object]], reps: int) -> float:
    """Median seconds of single calls, timed with events, fns taken in rotation, the queue filled ahead."""
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time, while the host queues the runs behind it
    for i in range(reps):
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def eager_mean(fns: list[Callable[[], object]], reps: int) -> float:
    """Mean seconds per call of back-to-back eager calls (launch costs included), events around the batch."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(reps):
        fns[i % len(fns)]()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def graphed(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], object], torch.Tensor]:
    """fn captured in a CUDA graph (after a warm-up call): (replay, the graph's output tensor)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    return graph.replay, out


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 256, (1 << 30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = events_median([lambda: dst.copy_(src)], 30)
    return 2 * src.numel() / seconds


def matmul_peak(size: int = 8192) -> float:
    """FLOP/s of a bf16 [size, size] x [size, size] torch.matmul (cuBLAS), the device's practical tensor-core peak."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    return 2 * size**3 / events_median([lambda: a @ b], 30)


def bf16_experts(packed: dict[str, torch.Tensor], config: GptOssConfig) -> LocalExperts:
    """LocalExperts of the config's shape holding the same weights, dequantized to bf16 on the GPU."""
    with torch.device("meta"):
        experts = LocalExperts(config)
    experts = experts.to(torch.bfloat16).to_empty(device="cuda").requires_grad_(False)
    for e in range(config.num_local_experts):
        experts.gate_up_proj[e].copy_(mxfp4.dequantize(packed["gate_up_blocks"][e], packed["gate_up_scales"][e]).T)
        experts.down_proj[e].copy_(mxfp4.dequantize(packed["down_blocks"][e], packed["down_scales"][e]).T)
    experts.gate_up_proj_bias.copy_(packed["gate_up_bias"])
    experts.down_proj_bias.copy_(packed["down_bias"])
    return experts


def inputs(num_tokens: int, config: GptOssConfig,
           gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """INPUT_SETS (hidden [T, H], expert ids [T, K], routing weights [T, K]) on the GPU, ids uniformly random."""
    top_k = config.num_experts_per_tok
    sets = []
    for _ in range(INPUT_SETS):
        hidden = torch.randn(num_tokens, config.hidden_size, generator=gen).bfloat16()
        ids = torch.rand(num_tokens, config.num_local_experts, generator=gen).topk(top_k, dim=-1).indices
        weights = torch.softmax(torch.randn(num_tokens, top_k, generator=gen), dim=-1).bfloat16()
        sets.append((hidden.cuda(), ids.cuda(), weights.cuda()))
    return sets


def layer_bytes(num_tokens: int, touched: float, config: GptOssConfig) -> tuple[float, float]:
    """(MXFP4, bf16) bytes a layer must move: the touched experts' weights (blocks + scales + bias), the activations
    in and out, the ids and routing weights."""
    H, I, K = config.hidden_size, config.intermediate_size, config.num_experts_per_tok
    activations = num_tokens * H * 2 * 2 + num_tokens * K * (8 + 2)
    return (touched * packed_bytes_per_expert(H, I) + activations,
            touched * (3 * H * I + 2 * I + H) * 2 + activations)


def layer_flops(num_tokens: int, config: GptOssConfig) -> float:
    """The layer's matrix-product FLOPs: each token's K experts, gate_up (H x 2I) and down (I x H)."""
    H, I, K = config.hidden_size, config.intermediate_size, config.num_experts_per_tok
    return 2 * num_tokens * K * 3 * H * I


def tile_name(tiles: dict) -> str:
    """The preset whose tiles these are (the call's own pick), or "custom"."""
    from gptoss_serve.kernels.mxfp4_moe import PRESETS

    return next((name for name, preset in PRESETS.items() if preset.__dict__ == tiles), "custom")


def measure(num_tokens: int, experts, dense: LocalExperts, config: GptOssConfig, gen: torch.Generator, *,
            sweep: bool, prefetch: bool = False) -> dict:
    from gptoss_serve.kernels.mxfp4_moe import pick_tiles
    from gptoss_serve.kernels.mxfp4_moe_widened import widened_bytes

    sets = inputs(num_tokens, config, gen)
    reps = max(20, min(300, 20_000 // max(num_tokens, 64)))
    touched = statistics.mean(len(torch.unique(ids)) for _, ids, _ in sets)
    mxfp4_bytes, bf16_bytes = layer_bytes(num_tokens, touched, config)
    row = dict(tokens=num_tokens, experts_touched=touched,
               tiles=pick_tiles(num_tokens * config.num_experts_per_tok, config.num_local_experts,
                                widened_bytes=widened_bytes(config.num_local_experts, config.hidden_size,
                                                            config.intermediate_size),
                                resident=experts.keywords["experts"].resident).__dict__,
               mxfp4_bytes=mxfp4_bytes, bf16_bytes=bf16_bytes)

    replays, outs = zip(*(graphed(lambda s=s: experts(*s)) for s in sets))
    row["mxfp4_s"] = events_median(list(replays), reps)
    row["mxfp4_eager_s"] = eager_mean([lambda s=s: experts(*s) for s in sets], reps)
    try:
        dense_replays, dense_outs = zip(*(graphed(lambda s=s: dense.forward_grouped(*s)) for s in sets))
    except RuntimeError as e:  # not capturable after all: per-call events, eagerly
        print(f"bf16 graph capture failed ({str(e).splitlines()[0]}); timing it eagerly", flush=True)
        torch.cuda.synchronize()
        dense_replays = [lambda s=s: dense.forward_grouped(*s) for s in sets]
        dense_outs = [fn() for fn in dense_replays]
    row["bf16_s"] = events_median(list(dense_replays), reps)
    row["bf16_eager_s"] = eager_mean([lambda s=s: dense.forward_grouped(*s) for s in sets], reps)
    row["rel_diff_vs_bf16"] = max(relative_error(a, b) for a, b in zip(outs, dense_outs))
    del replays, dense_replays
    try:
        row["kernels_us"] = kernel_breakdown(experts, sets)
    except Exception as e:  # noqa: BLE001 - diagnostics only
        row["kernels_us"] = {"error": repr(e)}
    for key, variants in (("sweep", sweep_variants(num_tokens) if sweep else {}),
                          ("prefetch", prefetch_variants(row["tiles"]) if prefetch else {})):
        if variants:
            row[key] = {}
        for name, (tiles, use_asm) in variants.items():
            try:
                fns = [graphed(lambda s=s: experts(*s, tiles=tiles, use_asm=use_asm))[0] for s in sets]
            except Exception as e:  # noqa: BLE001 - one variant that does not compile must not end the sweep
                print(f"       {name}: {str(e).splitlines()[0][:200]}", flush=True)
                continue
            row[key][name] = events_median(fns, reps)
    return row


def prefetch_variants(picked: dict) -> dict:
    """name -> (tiles, use_asm): the call's own pick as it is, then with each weight row's bytes asked of L2 ahead of
    the loads, 128-512 bytes at a time, in bulk or a line at a time (the matrix-vector kernels: each program's whole
    row tile before its loop)."""
    from dataclasses import replace

    from gptoss_serve.kernels.mxfp4_moe import Tiles

    tiles = Tiles(**picked)
    if tiles.scaled or tiles.widened:
        return {}
    variants = {"as picked": (tiles, True)}
    if tiles.gemv:  # one contiguous row tile a program: the whole of it, first (and down's share, once done)
        variants["whole tile"] = (replace(tiles, prefetch=128, prefetch_bulk=True), True)
        variants["whole tile + down's"] = (replace(tiles, prefetch=128, prefetch_bulk=True, prefetch_down=True), True)
        variants["down's only"] = (replace(tiles, prefetch_down=True), True)
        return variants
    for window in (128, 256, 512):
        for bulk in (False, True):
            variants[f"{window} B {'bulk' if bulk else 'lines'}"] = (
                replace(tiles, prefetch=window, prefetch_bulk=bulk), True)
    return variants


def sweep_variants(num_tokens: int) -> dict:
    """name -> (tiles, use_asm): every preset, the plain-Triton decodes, presets with the other load depth, the
    matrix-vector kernels' tile sizes and warps, float32 and fp16-pair products (up to 16 tokens), and the
    scaled-dot kernels' tiles and stages."""
    from dataclasses import replace

    from gptoss_serve.kernels.mxfp4_moe import PRESETS, Tiles

    variants = {name: (tiles, True) for name, tiles in PRESETS.items()}
    variants["decode-plain"] = (PRESETS["decode"], False)
    variants["decode-d3"] = (replace(PRESETS["decode"], depth=3), True)
    for name in ("decode_wide", "medium"):
        variants[f"{name}-d1"] = (replace(PRESETS[name], depth=1), True)
    variants["prefill-d3"] = (replace(PRESETS["prefill"], depth=3), True)
    # down over 128 columns a program: the activation tile serves twice the weight rows (sm_90 machine code, Triton
    # 3.6: medium's down 11.25 -> 7.53 instructions a value with 8 warps, which it needs not to spill; decode_wide's
    # 7.02 -> 6.12), for half as many programs
    variants["medium-dn128-dw8"] = (replace(PRESETS["medium"], down_n=128, down_warps=8), True)
    variants["decode_wide-dn128"] = (replace(PRESETS["decode_wide"], down_n=128), True)
    for m, n, groups, down_n, warps, stages in ((16, 32, 4, 64, 4, 4), (16, 64, 4, 128, 4, 6), (16, 64, 8, 128, 4, 3),
                                                (16, 128, 2, 256, 8, 4), (16, 64, 2, 64, 4, 4),
                                                (32, 64, 4, 128, 4, 6), (64, 64, 4, 128, 4, 3), (64, 128, 2, 128, 8, 3)):
        variants[f"scaled-m{m}-n{n}-g{groups}-d{down_n}-w{warps}-s{stages}"] = (Tiles(
            block_m=m, gate_up_n=n, gate_up_groups=groups, down_n=down_n, down_groups=groups, num_warps=warps,
            scaled=True, stages=stages), True)
    if num_tokens > 16:
        return variants
    variants["gemv-plain"] = (PRESETS["gemv"], False)
    for n, groups, warps in ((8, 8, 2), (8, 16, 2), (8, 16, 4), (16, 8, 4), (16, 16, 4), (16, 8, 2), (4, 16, 1),
                             (8, 8, 1), (4, 8, 1), (16, 16, 8), (32, 16, 8)):
        variants[f"gemv-n{n}-g{groups}-w{warps}"] = (replace(PRESETS["gemv"], gate_up_n=n, down_n=n,
                                                             gate_up_groups=groups, down_groups=groups,
                                                             num_warps=warps), True)
    for n, groups, warps in ((8, 16, 1), (16, 8, 1), (16, 8, 2), (4, 8, 1), (16, 16, 2)):  # fp16 pairs
        variants[f"gemv_h2-n{n}-g{groups}-w{warps}"] = (replace(PRESETS["gemv_h2"], gate_up_n=n, down_n=n,
                                                                gate_up_groups=groups, down_groups=groups,
                                                                num_warps=warps), True)
    return variants


def kernel_breakdown(experts, sets, calls: int = 10) -> dict[str, float]:
    """Mean GPU microseconds per call of each kernel of the layer (torch.profiler over eager calls)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            experts(*sets[i % len(sets)])
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.key_averages():
        total = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if total and event.key.lstrip("_").split("_")[0] in ("route", "gate", "down", "combine"):
            times[event.key] = total / calls
    return times


def dump_kernels(directory: str) -> None:
    """Prints registers, spills and shared memory of every compiled variant, and writes the first gate_up kernel's
    TTGIR and PTX to `directory` (Triton's cache layout varies between versions: best effort)."""
    from gptoss_serve.kernels import mxfp4_moe

    for name in ("_route", "_gate_up", "_down", "_combine", "_gate_up_scaled", "_down_scaled"):
        try:
            kernels = [k for cache, *_ in getattr(mxfp4_moe, name).device_caches.values() for k in cache.values()]
        except Exception as e:  # noqa: BLE001 - diagnostics only
            print(f"{name}: no cache to read ({e!r})")
            continue
        for i, kernel in enumerate(kernels):
            try:
                md = kernel.metadata
                print(f"{name}[{i}]: regs {kernel.n_regs} spills {kernel.n_spills} shared {md.shared} "
                      f"warps {md.num_warps} stages {md.num_stages}")
                if name in ("_gate_up", "_gate_up_scaled") and i == 0 and directory:
                    for ext in ("ttgir", "ptx"):
                        with open(f"{directory}/{name.strip('_')}.{ext}", "w") as f:
                            f.write(str(kernel.asm.get(ext, "")))
            except Exception as e:  # noqa: BLE001 - diagnostics only
                print(f"{name}[{i}]: {e!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["20b", "120b"], default="20b", help="the layer's shape")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096])
    parser.add_argument("--sweep", action="store_true", help="also time every tile preset, with and without PTX")
    parser.add_argument("--sweep-tokens", type=int, nargs="+", default=[1, 64, 256, 1024, 4096])
    parser.add_argument("--bf16-expert-copy", action="store_true",
                        help="the experts hold a bf16 copy beside the packed weights (Mxfp4Experts.keep_bf16_copy): "
                             "the widened path multiplies it, and is picked from fewer tokens an expert")
    parser.add_argument("--prefetch", action="store_true",
                        help="also time the picked tensor-core tiles with L2 prefetches of the weight rows")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--dump", help="a folder for the compiled decode kernel's TTGIR and PTX")
    args = parser.parse_args(argv)
    from gptoss_serve.kernels.mxfp4_moe import PackedExperts, mxfp4_moe

    torch.backends.cuda.matmul.allow_tf32 = False
    config = preset_config(args.preset)
    gen = torch.Generator().manual_seed(0)
    packed = {k: v.cuda() for k, v in random_packed_experts(
        config.num_local_experts, config.hidden_size, config.intermediate_size, generator=gen).items()}
    copy = bf16_copy(packed) if args.bf16_expert_copy else {}
    experts = functools.partial(mxfp4_moe, experts=PackedExperts.of(**packed, **copy), first=0, alpha=1.702,
                                limit=7.0)
    dense = bf16_experts(packed, config)
    copy, peak = copy_bandwidth(), matmul_peak()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy bandwidth {copy / 1e12:.2f} TB/s (1 GiB device-to-device, read + write), bf16 matmul "
          f"{peak / 1e12:.0f} TFLOP/s (8192^3 torch.matmul); {args.preset}'s layer ({config.num_local_experts} "
          f"experts, top-{config.num_experts_per_tok})", flush=True)
    rows = []
    header = (f"{'tokens':>6} {'experts':>7} {'MB':>6} {'mxfp4 us':>8} {'GB/s':>5} {'%copy':>5} {'eager us':>8} "
              f"{'bf16 MB':>7} {'bf16 us':>8} {'GB/s':>5} {'%copy':>5} {'eager us':>8} {'speedup':>7} {'diff':>7} "
              f"{'TFLOP/s':>7} {'%peak':>5} {'tiles':>8}")
    print(header, flush=True)
    for num_tokens in args.tokens:
        row = measure(num_tokens, experts, dense, config, gen, sweep=args.sweep and num_tokens in args.sweep_tokens,
                      prefetch=args.prefetch)
        rows.append(row)
        bw, bw16 = row["mxfp4_bytes"] / row["mxfp4_s"], row["bf16_bytes"] / row["bf16_s"]
        flops = layer_flops(num_tokens, config) / row["mxfp4_s"]
        print(f"{num_tokens:>6} {row['experts_touched']:>7.1f} {row['mxfp4_bytes'] / 1e6:>6.1f} "
              f"{row['mxfp4_s'] * 1e6:>8.1f} {bw / 1e9:>5.0f} {100 * bw / copy:>4.0f}% "
              f"{row['mxfp4_eager_s'] * 1e6:>8.1f} {row['bf16_bytes'] / 1e6:>7.1f} {row['bf16_s'] * 1e6:>8.1f} "
              f"{bw16 / 1e9:>5.0f} {100 * bw16 / copy:>4.0f}% {row['bf16_eager_s'] * 1e6:>8.1f} "
              f"{row['bf16_s'] / row['mxfp4_s']:>6.2f}x {row['rel_diff_vs_bf16']:>7.1e} {flops / 1e12:>7.1f} "
              f"{100 * flops / peak:>4.0f}% {tile_name(row['tiles']):>8}", flush=True)
        print("       kernels (us): " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in row["kernels_us"].items()), flush=True)
        for key in ("sweep", "prefetch"):
            if key in row:
                print(f"       {key} (graph us): " + ", ".join(f"{k} {v * 1e6:.1f}" for k, v in row[key].items()),
                      flush=True)
    if args.dump is not None:
        dump_kernels(args.dump)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, preset=args.preset, copy_bytes_per_s=copy, matmul_flop_per_s=peak, rows=rows),
                      f, indent=1)


if __name__ == "__main__":
    main()
