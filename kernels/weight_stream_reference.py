"""What kernels/weight_stream.py computes: the xor of every 32-bit word of each row tile of an expert tensor."""

from __future__ import annotations

import numpy as np
import torch


def stream_checksums_reference(words: torch.Tensor, block_rows: int) -> torch.Tensor:
    """words int32 [E, R, G, 4] (the checkpoint's layout) -> int32 [E * ceil(R / block_rows)], tiles in expert
    order, each the xor of its rows' words."""
    E, R = words.shape[:2]
    flat = words.cpu().numpy().reshape(E, R, -1)
    sums = [np.bitwise_xor.reduce(flat[e, r:r + block_rows].ravel()) for e in range(E) for r in range(0, R, block_rows)]
    return torch.tensor(np.array(sums, dtype=np.int32))
