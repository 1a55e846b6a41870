"""The experts of one MoE layer, and the narrow interface through which the model reaches them.

The model never holds expert weights itself: each MoE layer is handed an object that takes routed tokens and
returns their weighted expert outputs. An `ExpertShard` computes them in this process (colocated mode, and the
shard an expert-parallel worker holds): `LocalExperts` from dense weights, `Mxfp4Experts` (packed_experts.py) from
MXFP4 weights kept packed. Another implementation may send the tokens to other processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from gptoss_serve.kernels.dispatch import grouped_mm_supported
from gptoss_serve.kernels.moe_sort import expert_ends, sort_by_expert
from gptoss_serve.kernels.swiglu_reference import swiglu
from gptoss_serve.model.checkpoint import CheckpointReader, expert_prefix, stored_names
from gptoss_serve.model.config import GptOssConfig


class Experts(Protocol):
    def __call__(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """hidden [N, H], expert_ids [N, K] (global ids), weights [N, K] -> sum_k weights * expert_k(hidden), [N, H]."""
        ...


class ExpertsUnavailableError(RuntimeError):
    """Experts that live elsewhere failed or did not answer in time: the step's requests cannot complete, but the
    engine and its other requests go on."""


# layer index -> that layer's experts; lets the caller decide where experts live without touching the model
ExpertsFactory = Callable[[int], Experts]


def add_as_groups(shares: list[torch.Tensor]) -> torch.Tensor:
    """Equal shards' float32 shares of a layer added pairwise, neighbours first: ((s0 + s1) + (s2 + s3)) + ... The
    tree the MXFP4 kernel adds its 8 expert groups up (kernels/mxfp4_moe_kernels._combine), so 2, 4 or 8 workers'
    shares give the whole layer's sum exactly."""
    while len(shares) > 1:
        shares = [shares[i] + shares[i + 1] if i + 1 < len(shares) else shares[i] for i in range(0, len(shares), 2)]
    return shares[0]


class ExpertShard(nn.Module):
    """Experts [first, first + count) of one layer with their weights in this process: what colocated mode and an
    expert-parallel worker hold. Subclasses keep the weights dense (`LocalExperts`) or packed as the checkpoint
    stores them (`Mxfp4Experts`, model/packed_experts.py); both read only their shard's rows of the checkpoint.

    Tokens routed to experts outside the range contribute nothing here: summing the outputs of disjoint shards
    gives the full layer, which is what expert parallelism relies on.
    """

    # the layer's weights, named as in transformers' checkpoints under model.layers.{i}.mlp.experts.
    WEIGHTS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")

    def __init__(self, config: GptOssConfig, *, first: int = 0, count: int | None = None) -> None:
        super().__init__()
        self.first, self.layer_experts = first, config.num_local_experts
        self.count = config.num_local_experts - first if count is None else count
        if not (0 <= first and first + self.count <= config.num_local_experts and self.count > 0):
            raise ValueError(f"expert range [{first}, {first + self.count}) is outside 0..{config.num_local_experts}")
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit

    @classmethod
    def from_checkpoint(cls, reader: CheckpointReader, layer: int, *, first: int = 0, count: int | None = None,
                        dtype: torch.dtype, device: torch.device | str | None = None) -> ExpertShard:
        """Experts [first, first + count) of one layer, allocated once on `device` (the reader's by default) and
        filled from the checkpoint; only those experts' rows are read. dtype: of the dense tensors (packed blocks
        and scales stay uint8)."""
        with torch.device("meta"):
            experts = cls(reader.config, first=first, count=count)
        experts = experts.to(dtype).to_empty(device=device or reader.device)
        experts.load_weights(reader, layer)
        return experts.requires_grad_(False)

    @staticmethod
    def checkpoint_names(reader: CheckpointReader, layer: int) -> list[str]:
        """The tensors one layer's experts occupy in the checkpoint (all of them, whichever process holds them)."""
        return [n for w in ExpertShard.WEIGHTS for n in stored_names(reader.config, expert_prefix(layer) + w)]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the activations it takes and returns: its floating-point tensors' (packed ones are uint8)."""
        return next(t.dtype for t in self.state_dict().values() if t.is_floating_point())

    def load_weights(self, reader: CheckpointReader, layer: int) -> None:
        raise NotImplementedError

    def warm_up(self, max_tokens: int, top_k: int) -> None:
        """Compiles what the first steps would otherwise wait for (GPU kernels); nothing to do by default."""

    def never_waits_for_host(self, dtype: torch.dtype) -> bool:
        """Whether a call on activations of `dtype` runs without a host sync, so a CUDA graph can capture it."""
        return False

    def partial(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """This shard's share of the layer in float32, not rounded to the activations' dtype: an expert-parallel
        worker's answer when there are several, so that their sum (add_as_groups) is rounded once, as one shard's
        output is (two bf16-rounded shares would add up to a different layer output, and greedy outputs would part
        from colocated mode's). Computed in the shard's own dtype unless a subclass keeps more; MXFP4 shards of
        1/2, 1/4 or 1/8 of the layer add up to its output bit for bit (kernels/mxfp4_moe.py)."""
        return self(hidden, expert_ids, weights).float()

    def dispatch(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self(hidden, expert_ids, weights)  # local: nothing to overlap, done at once

    def combine(self, pending: torch.Tensor) -> torch.Tensor:
        return pending


class LocalExperts(ExpertShard):
    """An expert shard with dense weights in transformers' layout (MXFP4 checkpoints are decoded at load)."""

    def __init__(self, config: GptOssConfig, *, first: int = 0, count: int | None = None) -> None:
        super().__init__(config, first=first, count=count)
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.count, hidden, 2 * inter))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(self.count, 2 * inter))
        self.down_proj = nn.Parameter(torch.empty(self.count, inter, hidden))
        self.down_proj_bias = nn.Parameter(torch.empty(self.count, hidden))

    def never_waits_for_host(self, dtype: torch.dtype) -> bool:
        probe = torch.empty(0, dtype=dtype, device=self.gate_up_proj.device)
        return probe.is_cuda and grouped_mm_supported(probe)  # forward_loop reads group sizes on the host

    def load_weights(self, reader: CheckpointReader, layer: int) -> None:
        """Copies this shard's rows of the layer's expert weights in, dense (MXFP4 is decoded by the reader)."""
        prefix, rows = expert_prefix(layer), slice(self.first, self.first + self.count)
        with torch.no_grad():
            for name, param in self.named_parameters():
                param.copy_(reader.read(prefix + name, dtype=param.dtype, rows=rows, expect=tuple(param.shape)))

    def forward(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if grouped_mm_supported(hidden):
            return self.forward_grouped(hidden, expert_ids, weights)
        return self.forward_loop(hidden, expert_ids, weights)

    def forward_grouped(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """All experts in two grouped matrix products, with no host sync (so it can be captured in a graph)."""
        N, K = expert_ids.shape
        sorted_bucket, order = sort_by_expert(expert_ids.flatten(), self.first, self.count)  # [N * K] each
        valid = sorted_bucket < self.count  # pairs outside the shard sort last and are dropped
        ends = expert_ends(sorted_bucket, self.count)  # [E]
        expert = sorted_bucket.clamp(max=self.count - 1)  # [N * K] expert of each sorted row
        x = hidden[order // K]  # [N * K, H]
        gate_up = torch._grouped_mm(x, self.gate_up_proj, offs=ends) + self.gate_up_proj_bias[expert]
        act = swiglu(gate_up, alpha=self.alpha, limit=self.limit)  # [N * K, I]
        y = torch._grouped_mm(act, self.down_proj, offs=ends) + self.down_proj_bias[expert]  # [N * K, H]
        # rows past the last group are not written by the product: select, never multiply, them away
        y = torch.where(valid[:, None], y * weights.flatten()[order, None].to(y.dtype), 0)
        # un-sort and add each token's K outputs: deterministic, unlike an atomic index_add
        unsorted = torch.empty_like(y).index_copy_(0, order, y)
        return unsorted.view(N, K, -1).sum(dim=1).to(hidden.dtype)

    def forward_loop(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The reference: one expert at a time (one host sync for the group sizes)."""
        out = torch.zeros_like(hidden)  # [N, H]
        K = expert_ids.shape[1]
        local_ids = (expert_ids - self.first).flatten()  # [N * K]
        order = torch.argsort(local_ids, stable=True)
        # buckets: [below the shard, expert 0 .. count-1, above the shard]; sorted order follows them
        below, *counts, _ = torch.bincount(local_ids.clamp(-1, self.count) + 1, minlength=self.count + 2).tolist()
        start = below
        flat_weights = weights.flatten()
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            pairs = order[start:start + n]  # [n] indices into the flattened [N, K]
            start += n
            token = pairs // K
            act = swiglu(hidden[token] @ self.gate_up_proj[expert] + self.gate_up_proj_bias[expert],
                         alpha=self.alpha, limit=self.limit)  # [n, I]
            y = act @ self.down_proj[expert] + self.down_proj_bias[expert]  # [n, H]
            out.index_add_(0, token, (y * flat_weights[pairs, None]).to(out.dtype))
        return out
