"""The MoE block: a top-k router over all experts, and injected experts that compute the routed tokens."""

from __future__ import annotations

import torch
from torch import nn

from gptoss_serve.kernels.dispatch import TritonOp
from gptoss_serve.kernels.router_reference import top_k_softmax_reference
from gptoss_serve.model.config import GptOssConfig
from gptoss_serve.model.experts import Experts
from gptoss_serve.model.projection import project

_top_k_softmax = TritonOp("router.top_k_softmax", reference=top_k_softmax_reference)


class ExpertRouter(nn.Module):
    """Picks each token's top-k experts and their weights (the gate; transformers calls it `mlp.router`)."""

    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.empty(config.num_local_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> expert ids [N, K], weights [N, K] (softmax over the K selected logits)."""
        logits = project(x, self.weight, self.bias)  # [N, E]
        return _top_k_softmax(logits, self.top_k)


class MoE(nn.Module):
    def __init__(self, config: GptOssConfig, experts: Experts) -> None:
        super().__init__()
        self.router = ExpertRouter(config)
        # assigned as an attribute: an nn.Module (local experts) registers its weights here; a remote proxy doesn't
        self.experts = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]"""
        flat = x.reshape(-1, x.shape[-1])  # [N, H]
        expert_ids, weights = self.router(flat)
        return self.experts(flat, expert_ids, weights).view_as(x)

    def begin(self, x: torch.Tensor) -> object:
        """Routes x [..., H] and hands it to the experts without waiting for them (see `end`)."""
        flat = x.reshape(-1, x.shape[-1])
        expert_ids, weights = self.router(flat)
        return self.experts.dispatch(flat, expert_ids, weights)

    def end(self, pending: object, like: torch.Tensor) -> torch.Tensor:
        return self.experts.combine(pending).view_as(like)
