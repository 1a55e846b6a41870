"""Mxfp4Experts: an expert shard whose MXFP4 weights stay packed, as the checkpoint stores them, in memory.

A layer's experts take a quarter of the bytes they would in bf16 (gpt-oss-20b's weights fit in 14 GB, 120b's on
one 80 GB GPU), and a decode step reads a quarter of the bytes. On a CUDA GPU with bf16 activations the Triton
kernels in kernels/mxfp4_moe.py decode FP4 inside the matrix products; anywhere else (the CPU, float32) the
PyTorch reference in kernels/moe_reference.py decodes each expert while it is used. With hundreds of tokens an
expert (prefill), gpt-oss-20b's layers can be widened to bf16 for the call instead (kernels/mxfp4_moe_widened.py,
~1.6 GB of transient GPU memory at an 8,192-token step; off until timed on a GPU, see kernels/mxfp4_moe.py), or
multiplied from a bf16 copy kept beside the packed weights (`keep_bf16_copy`: the load option bf16_expert_copy,
3x the packed experts' memory), which costs no widening a call.
"""

from __future__ import annotations

import torch

from gptoss_serve.kernels.dispatch import TritonOp
from gptoss_serve.kernels.moe_reference import moe_reference
from gptoss_serve.model import mxfp4
from gptoss_serve.model.checkpoint import CheckpointReader, expert_prefix
from gptoss_serve.model.config import GptOssConfig
from gptoss_serve.model.experts import ExpertShard, LocalExperts

# the kernels are written for bf16 activations; float32 ones (and the CPU) take the reference. The two are called
# differently (the kernels take a PackedExperts view and an output buffer), so _run asks which one and calls it.
_mxfp4_moe = TritonOp("mxfp4_moe.mxfp4_moe", reference=moe_reference,
                      when=lambda hidden: hidden.dtype == torch.bfloat16)


class Mxfp4Experts(ExpertShard):
    """Experts [first, first + count) of one layer; buffers named like the reference's arguments:
      gate_up_blocks uint8 [E, 2I, H / 32, 16], gate_up_scales uint8 [E, 2I, H / 32], gate_up_bias [E, 2I]
      down_blocks    uint8 [E, H, I / 32, 16],  down_scales    uint8 [E, H, I / 32],  down_bias    [E, H]
    (the checkpoint's `*_proj_blocks`, `*_proj_scales` and `*_proj_bias` rows of this shard, unchanged)."""

    def __init__(self, config: GptOssConfig, *, first: int = 0, count: int | None = None) -> None:
        super().__init__(config, first=first, count=count)
        E, H, I, G = self.count, config.hidden_size, config.intermediate_size, mxfp4.BLOCK_SIZE
        for name, shape, dtype in (
                ("gate_up_blocks", (E, 2 * I, H // G, G // 2), torch.uint8),
                ("gate_up_scales", (E, 2 * I, H // G), torch.uint8),
                ("gate_up_bias", (E, 2 * I), torch.float32),  # biases take the model's dtype with it
                ("down_blocks", (E, H, I // G, G // 2), torch.uint8),
                ("down_scales", (E, H, I // G), torch.uint8),
                ("down_bias", (E, H), torch.float32)):
            self.register_buffer(name, torch.empty(shape, dtype=dtype))
        self._dense_shapes = {"gate_up_proj": (E, H, 2 * I), "down_proj": (E, I, H)}
        self._kernel_view = None  # the kernels' view of the buffers, made on the first GPU call
        for name in ("gate_up_widened", "down_widened"):  # keep_bf16_copy's [E, 2I, H] and [E, H, I], if asked for
            self.register_buffer(name, None, persistent=False)

    PACKED = ("gate_up_blocks", "gate_up_scales", "gate_up_bias", "down_blocks", "down_scales", "down_bias")

    @property
    def bf16_copy_bytes(self) -> int:
        """What keep_bf16_copy holds: every packed value as two bytes."""
        return sum(getattr(self, f"{part}_blocks").numel() * 2 * 2 for part in ("gate_up", "down"))

    def keep_bf16_copy(self) -> None:
        """Also holds the weights widened to bf16 ([E, 2I, H] and [E, H, I]: the checkpoint's rows, exactly
        mxfp4.dequantize's values), beside the packed ones: steps of many tokens an expert then multiply these
        (kernels/mxfp4_moe_widened.py) with no widening a call, and the fused kernels still take the few-token steps.
        Costs 3x the packed experts' memory again (gpt-oss-20b: +38 GB). Widened one expert at a time (transients
        of one expert). The copies are not part of the state dict (nothing is saved twice)."""
        for name, copy in bf16_copy(self.packed_tensors()).items():
            self.register_buffer(name, copy, persistent=False)
        self._kernel_view = None

    def load_weights(self, reader: CheckpointReader, layer: int) -> None:
        """Copies this shard's rows of the layer's stored blocks, scales and biases in, as they are."""
        prefix, rows = expert_prefix(layer), slice(self.first, self.first + self.count)
        with torch.no_grad():
            for proj, shape in self._dense_shapes.items():
                blocks, scales = reader.read_packed(prefix + proj, rows=rows, expect=shape)
                part = proj.removesuffix("_proj")
                getattr(self, f"{part}_blocks").copy_(blocks)
                getattr(self, f"{part}_scales").copy_(scales)
                bias = getattr(self, f"{part}_bias")
                bias.copy_(reader.read(f"{prefix}{proj}_bias", dtype=bias.dtype, rows=rows, expect=tuple(bias.shape)))

    def forward(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self._run(hidden, expert_ids, weights, out_dtype=hidden.dtype)

    def partial(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self._run(hidden, expert_ids, weights, out_dtype=torch.float32)  # the kernels add in float32

    def _run(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, *,
             out_dtype: torch.dtype) -> torch.Tensor:
        if _mxfp4_moe.uses_kernel(hidden):
            out = torch.empty(hidden.shape, dtype=out_dtype, device=hidden.device)  # [N, H]
            # tiles and summation order of the whole layer: shards add up to it exactly (see mxfp4_moe)
            return _mxfp4_moe.kernel(hidden, expert_ids, weights, self.kernel_view(), first=self.first,
                                     alpha=self.alpha, limit=self.limit, out=out, layer_experts=self.layer_experts)
        out = moe_reference(hidden, expert_ids, weights, **self.packed_tensors(), first=self.first, alpha=self.alpha,
                            limit=self.limit)  # [N, H] float32
        return out.to(out_dtype)

    def never_waits_for_host(self, dtype: torch.dtype) -> bool:
        probe = torch.empty(0, dtype=dtype, device=self.gate_up_blocks.device)
        return _mxfp4_moe.uses_kernel(probe)  # the kernels never wait; the reference syncs once per expert

    def warm_up(self, max_tokens: int, top_k: int) -> None:
        """On a GPU, one call at each token count where the kernels switch tiles (few to many tokens an expert), so
        Triton compiles them all at start-up rather than in the steps of the first long prompts."""
        if not self.gate_up_blocks.is_cuda:
            return
        for hidden, ids, weights in self.warm_up_calls(max_tokens, top_k):
            self(hidden, ids, weights)
        torch.cuda.synchronize(self.gate_up_blocks.device)

    def warm_up_calls(self, max_tokens: int, top_k: int,
                      dtype: torch.dtype = torch.bfloat16) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(hidden, expert ids, routing weights) of each warm-up call, as the model passes them: activations and
        weights in `dtype` (the router's weights come in its logits' dtype; a kernel compiled for float32 weights
        would leave the bf16 variant to compile in the first prompt's step), ids int64."""
        per_expert_steps = (1, 16, 64, 128)  # kernels/mxfp4_moe.pick_tiles: pairs an expert where the tiles change
        counts = sorted({min(max_tokens, max(1, -(-n * self.layer_experts // top_k))) for n in per_expert_steps}
                        | {1, max_tokens})  # 1: the matrix-vector kernels of a handful of tokens
        device = self.gate_up_blocks.device
        gen = torch.Generator(device).manual_seed(0)
        calls = []
        for n in counts:
            hidden = torch.randn(n, self.gate_up_blocks.shape[2] * mxfp4.BLOCK_SIZE, device=device, generator=gen,
                                 dtype=dtype)
            scores = torch.rand(n, self.count, device=device, generator=gen)
            ids = scores.topk(min(top_k, self.count), dim=-1).indices + self.first
            calls.append((hidden, ids, torch.full(ids.shape, 1 / ids.shape[1], device=device, dtype=dtype)))
        return calls

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """The six packed buffers by name (moe_reference's keyword arguments)."""
        return {name: getattr(self, name) for name in self.PACKED}

    def kernel_view(self):
        if self._kernel_view is None:
            from gptoss_serve.kernels.mxfp4_moe import PackedExperts  # Triton: only ever called on a GPU

            self._kernel_view = PackedExperts.of(**self.packed_tensors(), gate_up_widened=self.gate_up_widened,
                                                 down_widened=self.down_widened)
        return self._kernel_view

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), to_empty(): the buffers move, so any view made is stale
        self._kernel_view = None
        return super()._apply(fn, recurse)


def bf16_copy(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Packed experts (Mxfp4Experts' buffer names) -> their weights widened to bf16, exactly mxfp4.dequantize's
    values: {"gate_up_widened": [E, 2I, H], "down_widened": [E, H, I]}, PackedExperts.of's keyword arguments. One
    expert at a time, so the transients are one expert's."""
    copies = {}
    for part in ("gate_up", "down"):
        blocks, scales = packed[f"{part}_blocks"], packed[f"{part}_scales"]
        copy = torch.empty(blocks.shape[:2] + (blocks.shape[2] * mxfp4.BLOCK_SIZE,), dtype=torch.bfloat16,
                           device=blocks.device)
        for e in range(blocks.shape[0]):
            copy[e] = mxfp4.dequantize(blocks[e], scales[e])
        copies[f"{part}_widened"] = copy
    return copies


def random_packed_experts(num_experts: int, hidden: int, inter: int, *, generator: torch.Generator,
                          bias_std: float = 0.1) -> dict[str, torch.Tensor]:
    """Fresh random packed expert weights of one layer (CPU tensors), named as Mxfp4Experts' buffers and
    `moe_reference`'s arguments, for tests and benchmarks.

    Uniform random FP4 codes with scales near 2 ** round(log2(fan_in ** -0.5 / FP4_RMS)), jittered by one either
    way (as mxfp4.random_part makes them): about 2**-7 .. 2**-5 at H = 2880, so outputs stay O(1).
    """
    def part(name: str, rows: int, fan_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        groups = fan_in // mxfp4.BLOCK_SIZE
        blocks = mxfp4.random_part(name + mxfp4.BLOCKS, (num_experts, rows, groups, mxfp4.BLOCK_SIZE // 2), generator)
        scales = mxfp4.random_part(name + mxfp4.SCALES, (num_experts, rows, groups), generator)
        return blocks, scales

    gate_up_blocks, gate_up_scales = part("gate_up_proj", 2 * inter, hidden)  # [E, 2I, H / 32, 16], [E, 2I, H / 32]
    down_blocks, down_scales = part("down_proj", hidden, inter)  # [E, H, I / 32, 16], [E, H, I / 32]
    return dict(
        gate_up_blocks=gate_up_blocks, gate_up_scales=gate_up_scales,
        gate_up_bias=(torch.randn(num_experts, 2 * inter, generator=generator) * bias_std).bfloat16(),
        down_blocks=down_blocks, down_scales=down_scales,
        down_bias=(torch.randn(num_experts, hidden, generator=generator) * bias_std).bfloat16(),
    )


def expert_shard_class(config: GptOssConfig, *, dequantize: bool = False) -> type[ExpertShard]:
    """Packed experts for an MXFP4 checkpoint (unless asked to dequantize them at load); dense ones otherwise."""
    return Mxfp4Experts if config.quantization == "mxfp4" and not dequantize else LocalExperts
