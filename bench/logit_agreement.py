"""Logits of the serving path (bf16 activations, MXFP4 experts packed, Triton kernels on a GPU) against the float32
PyTorch reference path on the same weights: top-1 agreement and relative logit error.

    python -m gptoss_serve.bench.logit_agreement --model DIR [--load-format dummy] [--reference-device cpu|cuda]
        [--batch 4] [--length 300] [--baseline] [--expert-tokens N] [--json PATH]

The model is loaded once on --device in bf16 and run; the same module is then widened to float32 (packed blocks
and scales stay as they are, so its experts run the PyTorch reference, which decodes each expert in float32) and
run on --reference-device. Prompts are random token ids, longer than the sliding window (128).

On random weights the router's top-4 margins are small: bf16 rounding alone moves some tokens to another expert,
which changes their layer output a lot, and the change grows through the layers. So two more figures separate
the kernels' numerics from routing: the bf16 run again with every layer's expert choice taken from the float32
run (its weights still its own softmax), and with --baseline the bf16 path with experts widened to bf16 at load (no
packed kernel; what transformers computes in bf16), free routing, against the same reference.

A forward pass hands the experts every position at once, which picks the kernels for many tokens an expert. With
--expert-tokens N the bf16 runs hand them N positions a call instead (1: the kernels a batch-1 decode step runs), so
the whole model's logits check those kernels too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from gptoss_serve.model.loader import load_model
from gptoss_serve.model.moe import MoE, ExpertRouter


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """[..., vocab] logits against reference logits -> top-1 agreement over positions, relative L2 error."""
    logits, reference = logits.double(), reference.double()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).double().mean().item()
    error = ((logits - reference).norm() / reference.norm()).item()
    return {"positions": reference[..., 0].numel(), "top1_agreement": top1, "relative_error": error}


def run(model, ids: torch.Tensor, *, record: list | None = None, replay: list | None = None) -> torch.Tensor:
    """Logits on the CPU; records each layer's expert ids in order, or replays recorded ones (own weights)."""
    routers = [m for m in model.modules() if isinstance(m, ExpertRouter)]

    def hook(router, inputs, output):
        if record is not None:
            record.append(output[0].cpu())
            return output
        chosen = replay[routers.index(router)].to(output[0].device)
        logits = torch.nn.functional.linear(inputs[0], router.weight, router.bias)
        return chosen, torch.softmax(logits.gather(-1, chosen), dim=-1)

    hooks = [r.register_forward_hook(hook) for r in routers] if record is not None or replay else []
    try:
        with torch.no_grad():
            return model(ids.to(model.device)).cpu()
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def experts_in_chunks(model, tokens: int | None) -> Iterator[None]:
    """Within it, every MoE layer's experts take `tokens` positions a call (None: all at once, unchanged)."""
    experts = [m.experts for m in model.modules() if isinstance(m, MoE)] if tokens else []

    def chunked(forward):
        def call(hidden, expert_ids, weights):
            return torch.cat([forward(*parts) for parts in zip(hidden.split(tokens), expert_ids.split(tokens),
                                                                 weights.split(tokens))])
        return call

    for e in experts:
        e.forward = chunked(e.forward)
    try:
        yield
    finally:
        for e in experts:
            del e.forward  # the class's own again


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (config.json alone with dummy)")
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reference-device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", action="store_true", help="also bf16 with dequantized experts")
    parser.add_argument("--expert-tokens", type=int, help="bf16 runs: positions a call of the experts (default all)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.expert_tokens is not None and args.expert_tokens < 1:
        parser.error(f"--expert-tokens must be >= 1, got {args.expert_tokens}")

    model = load_model(args.model, device=args.device, dtype=torch.bfloat16, load_format=args.load_format)
    config = model.config
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, min(config.vocab_size, 199_998), (args.batch, args.length), generator=gen)
    start = time.perf_counter()
    with experts_in_chunks(model, args.expert_tokens):
        served = run(model, ids)
    served_s = time.perf_counter() - start
    routes: list[torch.Tensor] = []
    model = model.float().to(args.reference_device)
    start = time.perf_counter()
    reference = run(model, ids, record=routes)
    reference_s = time.perf_counter() - start
    model = model.bfloat16().to(args.device)  # exact: every value was a bf16 value
    with experts_in_chunks(model, args.expert_tokens):
        same_routing = agreement(run(model, ids, replay=routes), reference)
    baseline = None
    if args.baseline:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        widened = load_model(args.model, device=args.device, dtype=torch.bfloat16, load_format=args.load_format,
                             dequantize_experts=True)
        baseline = agreement(run(widened, ids), reference)
        del widened
    result = agreement(served, reference) | {
        "same_routing_as_reference": same_routing, "bf16_dequantized_baseline": baseline,
        "model": args.model, "load_format": args.load_format, "layers": config.num_hidden_layers,
        "experts": config.num_local_experts, "device": args.device, "reference_device": args.reference_device,
        "batch": args.batch, "length": args.length, "expert_tokens": args.expert_tokens, "served_s": served_s,
        "reference_s": reference_s,
        "machine": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    print(f"{result['positions']} positions, bf16 on {args.device} vs float32 on {args.reference_device}:")
    print(f"  packed experts:                        top-1 agreement {result['top1_agreement']:.4f}, relative "
          f"logit error {result['relative_error']:.3e}")
    print(f"  packed experts, the reference's routes: top-1 agreement {same_routing['top1_agreement']:.4f}, "
          f"relative logit error {same_routing['relative_error']:.3e}")
    if baseline:
        print(f"  experts dequantized to bf16 at load:   top-1 agreement {baseline['top1_agreement']:.4f}, relative "
              f"logit error {baseline['relative_error']:.3e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
