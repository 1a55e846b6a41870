"""The dense projections of a step's tokens (QKV, o_proj, the router): F.linear (cuBLAS on a GPU), or, asked for
with GPTOSS_KERNEL_OPS=small_linear, kernels/small_linear.py's projection for 2-D bf16 inputs of at most 64 rows
(decode steps): one program a tile of output features over the whole reduction, the bias fused, no split-K reduce
launch, each program asking L2 for its weight tile first. Opt-in until a GPU run shows it faster than cuBLAS in the
engine (BENCHMARKS.md, issue 29)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptoss_serve.kernels.dispatch import TritonOp
from gptoss_serve.kernels.small_linear_reference import MAX_ROWS

project = TritonOp("small_linear.projection", reference=F.linear, opt_in=True,
                   when=lambda x: x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.dtype == torch.bfloat16)
