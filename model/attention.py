"""Grouped-query attention with learned per-head sinks, on sliding-window or full causal layers."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from gptoss_serve.kernels.sink_attention_reference import sink_attention
from gptoss_serve.model.config import GptOssConfig
from gptoss_serve.model.projection import project
from gptoss_serve.model.rotary import rotate_qk


class AttentionBackend(Protocol):
    """How attention reaches keys and values: the model computes q/k/v, the backend owns any cache.

    q [..., Hq, D], k/v [..., Hkv, D] for the new tokens -> [..., Hq, D]. The runtime's paged KV cache is one
    backend; `CausalAttention` (no cache, whole sequences) is the reference one.
    """

    def __call__(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class CausalAttention:
    """No cache: q/k/v [B, T, H, D] are whole sequences at `positions` [T]."""

    def __init__(self, positions: torch.Tensor) -> None:
        self.positions = positions

    def __call__(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sink_attention(q, k, v, layer.sinks, q_positions=self.positions, k_positions=self.positions,
                              window=layer.window, scale=layer.scale)


class Attention(nn.Module):
    def __init__(self, config: GptOssConfig, layer: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        hidden, q_size, kv_size = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_size, bias=True)
        self.k_proj = nn.Linear(hidden, kv_size, bias=True)
        self.v_proj = nn.Linear(hidden, kv_size, bias=True)
        self.o_proj = nn.Linear(q_size, hidden, bias=True)
        self.sinks = nn.Parameter(torch.empty(self.num_heads))
        self.layer = layer
        self.window = config.sliding_window if config.is_sliding(layer) else None
        self.scale = self.head_dim**-0.5
        self.qkv: tuple[torch.Tensor, torch.Tensor] | None = None  # see init_buffers

    def init_buffers(self) -> None:
        """Called by the loader once the model is on its device, before the weights are copied in: q, k and v's
        weights and biases become views of one matrix and one vector (names and checkpoint layout unchanged), so
        the three projections run as one matrix product."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        like = self.q_proj.weight
        weight = torch.empty(sum(p.out_features for p in projections), like.shape[1], dtype=like.dtype,
                             device=like.device)
        bias = torch.empty(weight.shape[0], dtype=like.dtype, device=like.device)
        rows = 0
        for p in projections:
            p.weight = nn.Parameter(weight[rows:rows + p.out_features], requires_grad=False)
            p.bias = nn.Parameter(bias[rows:rows + p.out_features], requires_grad=False)
            rows += p.out_features
        self.qkv = (weight, bias)

    def _project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if self._fused_still_holds():
            q, k, v = project(x, *self.qkv).split([p.out_features for p in projections], dim=-1)
        else:
            q, k, v = (p(x) for p in projections)
        return (q.unflatten(-1, (self.num_heads, self.head_dim)), k.unflatten(-1, (self.num_kv_heads, self.head_dim)),
                v.unflatten(-1, (self.num_kv_heads, self.head_dim)))

    def _fused_still_holds(self) -> bool:
        """Whether q, k and v still view the fused matrix: moving the model replaces its parameters."""
        if self.qkv is None:
            return False
        weight, bias = (t.untyped_storage().data_ptr() for t in self.qkv)
        return all(p.weight.untyped_storage().data_ptr() == weight and p.bias.untyped_storage().data_ptr() == bias
                   for p in (self.q_proj, self.k_proj, self.v_proj))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttentionBackend) -> torch.Tensor:
        """x [..., hidden], cos/sin [..., D/2] for the same tokens -> [..., hidden]."""
        q, k, v = self._project_qkv(x)
        out = attend(self, *rotate_qk(q, k, cos, sin), v)  # [..., Hq, D]
        return project(out.flatten(-2), self.o_proj.weight, self.o_proj.bias)
