"""Mxfp4Experts: an expert shard whose MXFP4 weights stay packed, as the checkpoint stores them, in memory.

A layer's experts take a quarter of the bytes they would in bf16 (gpt-oss-20b's weights fit in 14 GB, 120b's on
one 80 GB GPU), and a decode step reads a quarter of the bytes. On a CUDA GPU with bf16 activations the Triton
kernels in kernels/mxfp4_moe.py decode FP4 inside the matrix products; anywhere else (the CPU, float32) the
PyTorch reference in kernels/moe_reference.py decodes each expert while it is used.
"""

from __future__ import annotations

import torch
from torch import nn

from gptoss_serve.model import mxfp4
from gptoss_serve.model.checkpoint import CheckpointReader, expert_prefix
from gptoss_serve.model.config import GptOssConfig
from gptoss_serve.model.experts import ExpertShard, LocalExperts


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
        if hidden.is_cuda and hidden.dtype == torch.bfloat16:
            from gptoss_serve.kernels.mxfp4_moe import mxfp4_moe  # Triton: imported only where a GPU is

            out = torch.empty(hidden.shape, dtype=out_dtype, device=hidden.device)
            # tiles and summation order of the whole layer: shards add up to it exactly (see mxfp4_moe)
            return mxfp4_moe(hidden, expert_ids, weights, self.kernel_view(), first=self.first, alpha=self.alpha,
                             limit=self.limit, out=out, layer_experts=self.layer_experts)
        # imported here: kernels/moe_reference.py imports this package (its mxfp4 and swiglu)
        from gptoss_serve.kernels.moe_reference import moe_reference

        out = moe_reference(hidden, expert_ids, weights, **self.packed_tensors(), first=self.first, alpha=self.alpha,
                            limit=self.limit)
        return out.to(out_dtype)

    def never_waits_for_host(self, dtype: torch.dtype) -> bool:
        return self.gate_up_blocks.is_cuda and dtype == torch.bfloat16  # the kernels; the reference syncs

    def warm_up(self, max_tokens: int, top_k: int) -> None:
        """On a GPU, one call at each token count where the kernels switch tiles (few to many tokens an expert), so
        Triton compiles them all at start-up rather than in the steps of the first long prompts."""
        if not self.gate_up_blocks.is_cuda:
            return
        per_expert_steps = (1, 16, 64)  # kernels/mxfp4_moe.pick_tiles: tokens an expert where the tiles change
        counts = sorted({min(max_tokens, max(1, -(-n * self.layer_experts // top_k))) for n in per_expert_steps}
                        | {max_tokens})
        gen = torch.Generator(self.gate_up_blocks.device).manual_seed(0)
        for n in counts:
            hidden = torch.randn(n, self.gate_up_blocks.shape[2] * mxfp4.BLOCK_SIZE, device=gen.device,
                                 generator=gen, dtype=torch.bfloat16)
            scores = torch.rand(n, self.count, device=gen.device, generator=gen)
            ids = scores.topk(min(top_k, self.count), dim=-1).indices + self.first
            self(hidden, ids, torch.full(ids.shape, 1 / ids.shape[1], device=gen.device))
        torch.cuda.synchronize(gen.device)

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """The six buffers by name (moe_reference's keyword arguments)."""
        return dict(self.named_buffers())

    def kernel_view(self):
        if self._kernel_view is None:
            from gptoss_serve.kernels.mxfp4_moe import PackedExperts

            self._kernel_view = PackedExperts.of(**self.packed_tensors())
        return self._kernel_view

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), to_empty(): the buffers move, so any view made is stale
        self._kernel_view = None
        return super()._apply(fn, recurse)


def expert_shard_class(config: GptOssConfig, *, dequantize: bool = False) -> type[ExpertShard]:
    """Packed experts for an MXFP4 checkpoint (unless asked to dequantize them at load); dense ones otherwise."""
    return Mxfp4Experts if config.quantization == "mxfp4" and not dequantize else LocalExperts
