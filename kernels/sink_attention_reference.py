"""Grouped-query attention with learned per-head sinks over whole sequences, in plain PyTorch: the model's attention
where there is no KV cache (`model.attention.CausalAttention`), and the attention of `paged_attention.py`'s prefill
reference and of the attention kernels' tests. No Triton here."""

from __future__ import annotations

import torch


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    *,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """Reference attention: q [B, T, Hq, D], k/v [B, S, Hkv, D], sinks [Hq] -> [B, T, Hq, D].

    Query i sees key j when k_pos[j] <= q_pos[i] and, on sliding layers, q_pos[i] - k_pos[j] < window. Each head's
    sink is one more logit in the softmax denominator that attends to nothing, so a head may attend "nowhere".
    Softmax runs in float32.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    groups = Hq // Hkv
    qg = q.view(B, T, Hkv, groups, D)
    scores = torch.einsum("bthgd,bshd->bhgts", qg, k).float() * scale  # [B, Hkv, G, T, S]
    distance = q_positions[:, None] - k_positions[None, :]  # [T, S]
    visible = distance >= 0
    if window is not None:
        visible &= distance < window
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = sinks.float().view(1, Hkv, groups, 1, 1).expand(B, Hkv, groups, T, 1)
    logits = torch.cat((scores, sink), dim=-1)
    probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]  # drop the sink
    out = torch.einsum("bhgts,bshd->bthgd", probs.to(v.dtype), v)
    return out.reshape(B, T, Hq, D)
