"""The KV-cache tensors, sized from a memory budget, and the number of blocks that budget buys.

Layers are paired across groups: slot j holds the j-th full-attention layer and the j-th sliding-window layer,
and a block id means the same memory in both. Since a block belongs to one group at a time, the two layers of a
slot never collide, and the cache costs max(#full, #sliding) layers' worth of memory, not #layers.
"""

from __future__ import annotations

import torch

from gptoss_serve.model.config import GptOssConfig


def layer_slots(config: GptOssConfig) -> list[int]:
    """Layer index -> its KV slot (its rank within its own group)."""
    seen = {True: 0, False: 0}
    slots = []
    for layer in range(config.num_hidden_layers):
        sliding = config.is_sliding(layer)
        slots.append(seen[sliding])
        seen[sliding] += 1
    return slots


def num_slots(config: GptOssConfig) -> int:
    return max(layer_slots(config)) + 1


def bytes_per_block(config: GptOssConfig, block_size: int, dtype: torch.dtype) -> int:
    return num_slots(config) * 2 * block_size * config.num_key_value_heads * config.head_dim * dtype.itemsize


def blocks_for_budget(config: GptOssConfig, *, block_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
    return max(0, budget_bytes // bytes_per_block(config, block_size, dtype))


class KVCache:
    def __init__(self, config: GptOssConfig, *, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.block_size = block_size
        self.slot_of_layer = layer_slots(config)
        shape = (num_slots(config), num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [slots, blocks, block_size, Hkv, D]
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer: [blocks, block_size, Hkv, D] each."""
        slot = self.slot_of_layer[layer]
        return self.keys[slot], self.values[slot]
