"""Instructions a weight value costs in the MXFP4 MoE kernels' reduction loop, read from their machine code: no GPU
needed. The kernels are compiled for sm_90 on this machine (Triton's own ptxas), disassembled (its nvdisasm), and
the loop with the most instructions is counted.

    python -m gptoss_serve.bench.kernel_sass [--presets decode_wide medium] [--dump DIR]

Triton is imported in the functions (this repository keeps module-level Triton imports in kernels/). The decode
loop is held back by instruction issue as much as by stalls (kernels/NOTES-mxfp4-moe.md): an H100 issues about 4 warp-instructions a clock per
multiprocessor, ~0.9 T warp-instructions a second over 132 of them, so streaming MXFP4 (~0.53 bytes a value) at
3 TB/s allows ~5.3 thread-instructions a value with nothing stalled. This prints that figure for each kernel, so a
change to the loop can be judged before a GPU is lent. The figures depend on the Triton of this machine, which may
not be the GPU machine's: compare versions within one run.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

HIDDEN = INTER = 2880  # gpt-oss's
EXPERTS_PAD = 32
POINTERS = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*u8", b_ptr="*fp32", pair_ptr="*i32", start_ptr="*i32",
                act_ptr="*bf16", part_ptr="*fp32", route_ptr="*fp32", y_ptr="*fp32", ids_ptr="*i64",
                down_w_ptr="*i32", down_s_ptr="*u8")
FLOATS = {"alpha", "limit"}


def compile_for_sm90(kernel, constants: dict, num_warps: int, pointers: dict | None = None,
                     multiples_of_16: tuple[str, ...] = ()):
    """kernel compiled for an H100: pointers as POINTERS updated by `pointers` (16-byte aligned), other runtime
    arguments i32 or fp32; those named in multiples_of_16 marked so, as Triton marks such values at run time (2,880
    is one), which lets it widen the accesses they index."""
    pointer_types = POINTERS | (pointers or {})
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name], constexprs[name] = "constexpr", constants[name]
        elif name in pointer_types:
            signature[name] = pointer_types[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
            if name in multiples_of_16:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps})


def disassemble(cubin: bytes) -> str:
    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def largest_loop(sass: str) -> list[str]:
    """Opcodes of the longest run from a label to a branch back to it."""
    ops, labels, best = [], {}, (0, -1)
    for line in sass.splitlines():
        if label := re.match(r"\s*\.(L_x_\d+):", line):
            labels[label.group(1)] = len(ops)
        elif code := re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);", line):
            ops.append(code.group(1))
            target = re.search(r"\.(L_x_\d+)", code.group(2))
            if code.group(1).startswith("BRA") and target and labels.get(target.group(1), len(ops)) < len(ops):
                start = labels[target.group(1)]
                if len(ops) - start > best[1] - best[0]:
                    best = (start, len(ops) - 1)
    return ops[best[0]:best[1] + 1]


def loop_figures(preset: str, which: str) -> dict:
    from gptoss_serve.kernels import mxfp4_moe_gemv as gemv
    from gptoss_serve.kernels import mxfp4_moe_kernels as kernels
    from gptoss_serve.kernels.mxfp4_moe import PRESETS, act_shift
    from gptoss_serve.model.config import GptOssConfig

    tiles = PRESETS[preset]
    common = dict(EXPERTS_PAD=EXPERTS_PAD, USE_ASM=True, INTERPRET=False, DEPTH=tiles.depth, SPLIT_K=tiles.split_k,
                  BLOCK_M=tiles.block_m, PREFETCH=tiles.prefetch, BULK=tiles.prefetch_bulk)
    pointers = {}
    if tiles.gemv:  # one token a program: its rows times one vector (HALF2: act as f16x2 words)
        shift = act_shift(GptOssConfig.swiglu_limit) if tiles.half2 else 0  # what the launcher passes for gpt-oss
        half2 = dict(HALF2=tiles.half2, ACT_SHIFT=shift, PREFETCH=tiles.prefetch > 0)
        if which == "gate_up":
            half2["PREFETCH_DOWN"] = tiles.prefetch_down
        if which == "gate_up":
            kernel, n, groups, rows = gemv._gate_up_gemv, tiles.gate_up_n, tiles.gate_up_groups, 2 * tiles.gate_up_n
            constants = dict(TOP_K=4, BLOCK_N=n, GROUPS=groups, USE_ASM=True, **half2)
        else:
            kernel, n, groups, rows = gemv._down_gemv, tiles.down_n, tiles.down_groups, tiles.down_n
            constants = dict(BLOCK_N=n, GROUPS=groups, USE_ASM=True, **half2)
            pointers = dict(act_ptr="*i32") if tiles.half2 else {}
    elif which == "gate_up":
        kernel, n, groups, rows = kernels._gate_up, tiles.gate_up_n, tiles.gate_up_groups, 2 * tiles.gate_up_n
        constants = dict(common, TOP_K=4, BLOCK_N=n, GROUPS=groups)
    else:
        kernel, n, groups, rows = kernels._down, tiles.down_n, tiles.down_groups, tiles.down_n
        constants = dict(common, BLOCK_N=n, GROUPS=groups)
    warps = tiles.down_warps or tiles.num_warps if which == "down" else tiles.num_warps
    compiled = compile_for_sm90(kernel, constants, warps, pointers)
    sass = disassemble(compiled.asm["cubin"])
    loop = largest_loop(sass)
    values = rows * groups * 32  # weight values a program decodes per step
    threads = 32 * warps
    mix = collections.Counter(op.split(".")[0] for op in loop)
    return dict(preset=preset, kernel=which, loop_instructions=len(loop), values_per_step=values,
                per_value=len(loop) * threads / values, mix=mix, sass=sass)


def main(argv: list[str] | None = None) -> None:
    import triton

    from gptoss_serve.kernels.mxfp4_moe import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+",
                        default=["gemv", "gemv_h2", "decode", "decode_wide", "medium", "prefill"],
                        choices=[p for p, t in PRESETS.items() if not t.scaled and not t.widened])
    parser.add_argument("--dump", help="write each kernel's disassembly here")
    args = parser.parse_args(argv)
    print(f"Triton {triton.__version__}, sm_90; thread-instructions a weight value in the reduction loop "
          f"(~5.3 is an H100's issue limit at 3 TB/s)")
    for preset in args.presets:
        for which in ("gate_up", "down"):
            f = loop_figures(preset, which)
            top = ", ".join(f"{op} {count}" for op, count in f["mix"].most_common(8))
            print(f"{preset:>12} {which:>8}: {f['loop_instructions']:5d} a thread a step, {f['values_per_step']:6d} "
                  f"values -> {f['per_value']:5.2f} a value   [{top}]", flush=True)
            if args.dump:
                os.makedirs(args.dump, exist_ok=True)
                with open(os.path.join(args.dump, f"{preset}-{which}.sass"), "w") as out:
                    out.write(f["sass"])


if __name__ == "__main__":
    main()
