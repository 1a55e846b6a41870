"""YaRN rotary position embedding, as gpt-oss uses it (rotate-half layout, attention scaling folded into cos/sin)."""

from __future__ import annotations

import math

import torch
from torch import nn

from gptoss_serve.kernels.dispatch import TritonOp
from gptoss_serve.kernels.rotary_reference import rotary_qk_reference
from gptoss_serve.model.config import GptOssConfig

# the kernel takes a step's rows, q [N, heads, D] with cos/sin [N, D/2]; whole sequences ([B, T, heads, D], the
# cache-free reference model) take the reference, which broadcasts
_rotary_qk = TritonOp("rotary.rotary_qk", reference=rotary_qk_reference, when=lambda q: q.dim() == 3)


def yarn_inverse_frequencies(config: GptOssConfig) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies [head_dim / 2] and the attention scaling ("mscale") that multiplies cos and sin.

    Low frequencies are interpolated by `factor`, high ones kept, with a linear ramp in between whose ends come
    from beta_fast / beta_slow rotations over the original context.
    """
    yarn = config.rope_scaling
    dim, base = config.head_dim, config.rope_theta

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp  # 1 keeps the original frequency, 0 interpolates it fully

    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (yarn.factor * pos_freqs)
    inv_freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    attention_scaling = 0.1 * math.log(yarn.factor) + 1.0 if yarn.factor > 1 else 1.0
    return inv_freq, attention_scaling


class RotaryEmbedding(nn.Module):
    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = yarn_inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def init_buffers(self) -> None:
        """Recomputes the (non-checkpoint) frequencies after the model was built on the meta device."""
        self.inv_freq = yarn_inverse_frequencies(self.config)[0].to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] -> cos, sin [..., head_dim / 2] in float32."""
        freqs = positions[..., None].float() * self.inv_freq.float()
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys rotated: one Triton kernel for both on a GPU (kernels/rotary.py), the PyTorch reference
    (kernels/rotary_reference.py) elsewhere."""
    return _rotary_qk(q, k, cos, sin)
