"""A layer's small fused kernels (residual add + RMSNorm, rotary, the router's top-k + softmax) at gpt-oss's shapes
(20b and 120b share them but for the router: 32 or 128 experts, both timed), against the device's copy bandwidth and
the PyTorch references they replace (graph replays for both, so launch costs do not count, then the references'
eager time, which is what a step paid before).

    python -m gptoss_serve.bench.layer_kernels [--tokens 1 64 256 2048] [--json PATH]

Bytes: the norm reads x, the residual and the weight and writes two rows; the rotary kernel reads q and k and
writes them rotated (cos/sin are small); the top-k reads 32 or 128 logits a token and writes 4 ids and weights. GB/s
against a 1 GiB device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import json

import torch

from gptoss_serve.bench.moe_kernel import copy_bandwidth, eager_mean, events_median, graphed
from gptoss_serve.kernels.rms_norm_reference import add_rms_norm_reference
from gptoss_serve.kernels.rotary_reference import rotary_qk_reference
from gptoss_serve.kernels.router_reference import top_k_softmax_reference
from gptoss_serve.model.moe import ExpertRouter
from gptoss_serve.model.synthetic import preset_config

HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM = 2880, 64, 8, 64


def time_pair(kernel, reference, nbytes: int) -> dict:
    kernel_replay, _ = graphed(kernel)
    reference_replay, _ = graphed(reference)
    seconds = events_median([kernel_replay], 200)
    return {"us": seconds * 1e6, "bytes": nbytes, "bytes_per_s": nbytes / seconds,
            "reference_graph_us": events_median([reference_replay], 200) * 1e6,
            "reference_eager_us": eager_mean([reference], 200) * 1e6}


def main(argv: list[str] | None = None) -> None:
    from gptoss_serve.kernels.rms_norm import add_rms_norm
    from gptoss_serve.kernels.rotary import rotary_qk
    from gptoss_serve.kernels.router import top_k_softmax

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 256, 2048])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy / 1e12:.2f} TB/s")
    print(f"{'kernel':>10} {'tokens':>6} {'us':>7} {'GB/s':>7} {'%copy':>6} {'ref graph us':>12} {'ref eager us':>12}")
    rows = []
    for n in args.tokens:
        x, residual = (torch.randn(n, HIDDEN, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        weight = torch.rand(HIDDEN, dtype=torch.bfloat16, device="cuda") + 0.5
        norm = time_pair(lambda: add_rms_norm(x, residual, weight, 1e-5)[0],
                         lambda: add_rms_norm_reference(x, residual, weight, 1e-5)[0], 2 * (4 * n + 1) * HIDDEN)
        qkv = torch.randn(n, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        q = qkv[:, :Q_HEADS * HEAD_DIM].unflatten(-1, (Q_HEADS, HEAD_DIM))  # views, as the model passes them
        k = qkv[:, Q_HEADS * HEAD_DIM:(Q_HEADS + KV_HEADS) * HEAD_DIM].unflatten(-1, (KV_HEADS, HEAD_DIM))
        angles = torch.rand(n, HEAD_DIM // 2, device="cuda") * 100
        cos, sin = angles.cos(), angles.sin()
        rotary = time_pair(lambda: rotary_qk(q, k, cos, sin)[0],
                           lambda: rotary_qk_reference(q, k, cos, sin)[0],
                           2 * 2 * n * (Q_HEADS + KV_HEADS) * HEAD_DIM + 2 * 4 * n * HEAD_DIM // 2)
        timed = [("norm", norm), ("rotary", rotary)]
        for preset in ("20b", "120b"):  # the only kernel whose shape differs between the two: 32 or 128 experts
            router = ExpertRouter(preset_config(preset)).to(dtype=torch.bfloat16, device="cuda")
            torch.nn.init.normal_(router.weight, std=HIDDEN**-0.5)
            torch.nn.init.zeros_(router.bias)
            logits = torch.nn.functional.linear(x, router.weight, router.bias)
            timed.append((f"top-k {router.weight.shape[0]}", time_pair(
                lambda logits=logits: top_k_softmax(logits, 4)[1],
                lambda logits=logits: top_k_softmax_reference(logits, 4)[1], 2 * logits.numel() + 8 * 4 * n)))
        for name, r in timed:
            rows.append({"kernel": name, "tokens": n, **r})
            print(f"{name:>10} {n:6d} {r['us']:7.1f} {r['bytes_per_s'] / 1e9:7.0f} {r['bytes_per_s'] / copy:6.1%} "
                  f"{r['reference_graph_us']:12.1f} {r['reference_eager_us']:12.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bytes_per_s": copy, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
