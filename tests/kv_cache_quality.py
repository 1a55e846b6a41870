"""How much a KV-cache dtype changes a model's logits: one token sequence prefilled chunk by chunk through the paged
cache (each chunk's attention reads the earlier chunks from the cache, as the engine's steps do), its logits taken
at every position from `first_logit` on, with the experts' choice recorded in one run and replayed in another.

Routes are pinned because on random weights the router's top-4 margins are small: a slightly different attention
output moves some tokens to another expert, a large change that grows through the layers and would measure the
routing, not the cache (bench/logit_agreement.py does the same for the kernels' numerics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from gptoss_serve.cluster.block_manager import FULL, SLIDING
from gptoss_serve.cluster.kv_cache import KVCache
from gptoss_serve.cluster.model_runner import PagedAttention, attention_kernels
from gptoss_serve.cluster.step_inputs import StepInputs
from gptoss_serve.model.moe import ExpertRouter
from gptoss_serve.model.transformer import GptOssForCausalLM


@contextlib.contextmanager
def routes(model: GptOssForCausalLM, *, record: list[torch.Tensor] | None = None,
           replay: list[torch.Tensor] | None = None) -> Iterator[None]:
    """Within: every router call appends its expert ids to `record`, or takes the next ones of `replay` (in the order
    they were recorded), its weights still the softmax of its own logits over them."""
    pending = iter(replay or [])

    def hook(router: ExpertRouter, inputs: tuple[torch.Tensor], output: tuple[torch.Tensor, torch.Tensor]):
        if record is not None:
            record.append(output[0])
            return output
        chosen = next(pending, None)
        if chosen is None:
            raise RuntimeError("more router calls than were recorded: replay one run per `routes` block")
        logits = torch.nn.functional.linear(inputs[0], router.weight, router.bias)
        return chosen, torch.softmax(logits.gather(-1, chosen.long()).float(), dim=-1).to(output[1].dtype)

    routers = [m for m in model.modules() if isinstance(m, ExpertRouter)]
    hooks = [r.register_forward_hook(hook) for r in routers] if record is not None or replay is not None else []
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def attention_outputs(model: GptOssForCausalLM, layer: int, into: list[torch.Tensor]) -> Iterator[None]:
    """Within: each output of layer `layer`'s attention (o_proj's, [T, hidden]) is appended to `into`, on the CPU."""
    hook = model.model.layers[layer].self_attn.register_forward_hook(
        lambda module, inputs, output: into.append(output.float().cpu()))
    try:
        yield
    finally:
        hook.remove()


@torch.inference_mode()
def paged_logits(model: GptOssForCausalLM, ids: list[int], *, kv_dtype: torch.dtype, chunk: int,
                 first_logit: int = 0, block_size: int = 16) -> torch.Tensor:
    """ids prefilled `chunk` tokens a step through a cache of kv_dtype -> float32 logits [len(ids) - first_logit,
    vocab] of positions first_logit on (the long-context ones; all of a vocabulary's rows would not fit)."""
    device, n = model.device, len(ids)
    blocks = -(-n // block_size)
    groups = [FULL, SLIDING] if model.config.sliding_window else [FULL]
    cache = KVCache(model.config, num_blocks=1 + len(groups) * blocks, block_size=block_size, dtype=kv_dtype,
                    device=device)
    # each group its own blocks (a block id is the same memory in both: kv_cache.py), none the null block 0
    tables = {g: torch.arange(1 + i * blocks, 1 + (i + 1) * blocks, dtype=torch.int32, device=device)[None]
              for i, g in enumerate(groups)}
    kernels = attention_kernels(device)
    logits = []
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        positions = torch.arange(start, end, dtype=torch.int32, device=device)
        first_row = min(max(first_logit - start, 0), end - start)
        inputs = StepInputs(
            token_ids=torch.tensor(ids[start:end], dtype=torch.int32, device=device), positions=positions,
            query_start=torch.tensor([0, end - start], dtype=torch.int32, device=device),
            context_lens=torch.tensor([end], dtype=torch.int32, device=device),
            slot_mapping={g: t[0, positions // block_size] * block_size + positions % block_size
                          for g, t in tables.items()},
            block_tables=tables, sample_rows=torch.arange(first_row, end - start, device=device),
            num_seqs=1, num_tokens=end - start, max_query_len=end - start)
        hidden = model.model(inputs.token_ids, inputs.positions, PagedAttention(cache, inputs, kernels))
        if end > first_logit:
            logits.append(model.compute_logits(hidden[inputs.sample_rows]).cpu())
    return torch.cat(logits)


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """[..., vocab] against reference logits -> top-1 agreement over positions and the relative L2 error."""
    logits, reference = logits.double(), reference.double()
    return {"top1_agreement": (logits.argmax(-1) == reference.argmax(-1)).double().mean().item(),
            "relative_error": ((logits - reference).norm() / reference.norm()).item()}


def greedy_agreement(a: list[int], b: list[int]) -> dict[str, float]:
    """Two greedy continuations of one prompt -> the share of positions where they agree, and how many tokens
    they agree for before they part."""
    same = [x == y for x, y in zip(a, b)]
    return {"same_share": sum(same) / len(same), "common_prefix": same.index(False) if False in same else len(same)}
