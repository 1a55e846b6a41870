"""gpt-oss as a plain nn.Module: embeddings, decoder blocks (attention + MoE), final norm, unembedding.

Parameter names follow the checkpoints (`model.layers.N.self_attn.q_proj.weight`, ...), so loading is a
name-for-name copy. How experts are reached is injected through `experts_factory`.
"""

from __future__ import annotations

import torch
from torch import nn

from gptoss_serve.model.attention import Attention, AttentionBackend, CausalAttention
from gptoss_serve.model.config import GptOssConfig
from gptoss_serve.model.experts import ExpertsFactory, LocalExperts
from gptoss_serve.model.moe import MoE
from gptoss_serve.model.norm import RMSNorm
from gptoss_serve.model.rotary import RotaryEmbedding


class DecoderBlock(nn.Module):
    def __init__(self, config: GptOssConfig, layer: int, experts_factory: ExpertsFactory) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MoE(config, experts_factory(layer))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                attend: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """The previous block's output x and the residual stream before it (None at the first block) -> this
        block's MoE output and the residual stream before that: the stream's adds are fused into the norms."""
        x, residual = self.begin(x, residual, cos, sin, attend)
        return self.mlp(x), residual

    def begin(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
              attend: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to the MoE: -> (its input, the residual stream)."""
        normed, residual = self.input_layernorm(x, residual)
        return self.post_attention_layernorm(self.self_attn(normed, cos, sin, attend), residual)


class Decoder(nn.Module):
    """The stack under the unembedding; named `model` in the causal LM, as in the checkpoints."""

    def __init__(self, config: GptOssConfig, experts_factory: ExpertsFactory) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config, i, experts_factory) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttentionBackend) -> torch.Tensor:
        """input_ids [...] at positions (broadcastable to them) -> final-normed hidden states [..., H]."""
        cos, sin = self.rotary_emb(positions)  # [..., D/2]
        x, residual = self.embed_tokens(input_ids), None  # [..., H]
        for block in self.layers:
            x, residual = block(x, residual, cos, sin, attend)
        return self.norm(x, residual)[0]

    def forward_interleaved(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor, AttentionBackend]]):
        """Several micro-batches through the layers ping-pong, for experts that are remote. Each micro-batch goes on
        to its next layer as soon as its experts have answered, without waiting for the others: so while one is with
        the experts, the others' attention runs, and the experts get the next micro-batch's tokens while they still
        work on this one's. (Ending every micro-batch's layer before starting the next layer would leave the experts
        idle during the first micro-batch's attention.) Same result as `forward` on each. -> final-normed hidden
        states, one per micro-batch."""
        ropes = [self.rotary_emb(positions) for _, positions, _ in micro_batches]  # (cos, sin) each
        xs = [self.embed_tokens(input_ids) for input_ids, _, _ in micro_batches]  # each one's latest block output
        residuals: list[torch.Tensor | None] = [None] * len(micro_batches)
        in_flight: list[tuple | None] = [None] * len(micro_batches)  # (MoE, its exchange, the shape of its answer)
        for block in self.layers:
            for i, (_, _, attend) in enumerate(micro_batches):
                if in_flight[i] is not None:
                    mlp, exchange, like = in_flight[i]
                    xs[i] = mlp.end(exchange, like)
                x, residuals[i] = block.begin(xs[i], residuals[i], *ropes[i], attend)
                in_flight[i] = (block.mlp, block.mlp.begin(x), x)
        return [self.norm(mlp.end(exchange, like), residual)[0]
                for (mlp, exchange, like), residual in zip(in_flight, residuals)]


class GptOssForCausalLM(nn.Module):
    def __init__(self, config: GptOssConfig, *, experts_factory: ExpertsFactory | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config, experts_factory or (lambda layer: LocalExperts(config)))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> float32 logits [B, T, vocab], full causal attention from position 0, no cache."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got "
                             f"{int(input_ids.min())}..{int(input_ids.max())}")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # [T]
        return self.compute_logits(self.model(input_ids, positions, CausalAttention(positions)))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., H] -> float32 logits [..., vocab]; the runtime calls it only where it samples."""
        return self.lm_head(hidden).float()
