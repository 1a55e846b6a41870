"""A real tiny gpt-oss made to say what a test chooses: after token chain[i] its next token is chain[i + 1].

Everything downstream runs as it does for a served model (scheduler, paged KV cache, every decoder layer, sampler,
detokenizer, stop handling, harmony parsing); only three tensors differ from the random checkpoint. Each token of
the chain but the last embeds as a large one-hot vector, so in the final norm what the decoder layers add to the
residual stream (bounded by their own normed inputs) fades to nothing, and the unembedding maps that one-hot
direction to the chain's next token with a logit far above every other token's (about 0).

Limits: at most hidden_size links, and no token twice in a chain (the next token depends on the last one only).
"""

from __future__ import annotations

import math

import torch

from gptoss_serve.model.transformer import GptOssForCausalLM

EMBED_SCALE = 1e4  # a chain token's embedding dwarfs what the layers add to it
LOGIT = 100.0  # the scripted next token's logit; the rest are about 0, so even temperature 1 draws the scripted one


@torch.no_grad()
def follow_chain(model: GptOssForCausalLM, chain: list[int]) -> None:
    """Rewrites the model so that greedy decoding after chain[0] yields chain[1:], in order (replaces any earlier
    chain). Give the engine a prompt that ends with chain[0]."""
    hidden = model.config.hidden_size
    if len(set(chain)) != len(chain):
        raise ValueError(f"a chain cannot hold a token twice: {chain}")
    if not 2 <= len(chain) <= hidden + 1:
        raise ValueError(f"a chain needs 2 to {hidden + 1} tokens, got {len(chain)}")
    # parameter names are the checkpoint's (model.embed_tokens, model.norm, lm_head)
    embed = model.get_parameter("model.embed_tokens.weight")  # [V, H]
    norm = model.get_parameter("model.norm.weight")  # [H]
    head = model.get_parameter("lm_head.weight")  # [V, H]
    embed.zero_()
    head.zero_()
    norm.fill_(1.0)
    for i, (token, following) in enumerate(zip(chain, chain[1:])):
        embed[token, i] = EMBED_SCALE
        # the final norm turns EMBED_SCALE * e_i into sqrt(H) * e_i
        head[following, i] = LOGIT / math.sqrt(hidden)
