"""The model runner's start-up compile of the prompt-chunk attention variants (cluster/model_runner.py): the calls it
makes are valid steps (run here through the PyTorch reference), and one of them is a step paged_attention splits
across keys, so the split kernel is among those compiled before the first request."""

from __future__ import annotations

import pytest
import torch

from gptoss_serve.cluster.kv_cache import KVCache
from gptoss_serve.cluster.model_runner import WARM_UP_KEYS, warm_up_prefill_attention
from gptoss_serve.kernels.paged_attention import paged_attention_reference
from gptoss_serve.model.loader import load_model


def test_the_warm_up_steps_are_valid_and_one_of_them_is_split(tiny_bf16):
    model = load_model(tiny_bf16, device=torch.device("cpu"))
    cache = KVCache(model.config, num_blocks=4, block_size=16, dtype=model.dtype, device="cpu")
    calls = []

    def kernel(q, keys, values, *, max_query_len, **args):
        calls.append((q.shape[0], args["block_tables"].shape[1] * keys.shape[1], args["window"], max_query_len))
        # every tensor as a step passes it (a Triton variant is compiled per pointer dtype): the model's own sinks
        assert args["sinks"].dtype == model.model.layers[0].self_attn.sinks.dtype == model.dtype
        assert q.dtype == keys.dtype == model.dtype
        return paged_attention_reference(q, keys, values, **args)

    warm_up_prefill_attention(kernel, cache, model)
    windows = [window for *_, window, _ in calls]
    assert (None in windows) and (model.config.sliding_window in windows)
    assert max(keys for _, keys, *_ in calls) == WARM_UP_KEYS
    # gpt-oss's shape on an H100: the widest step is split (its split variant is compiled), the narrow one is not
    varlen = pytest.importorskip("gptoss_serve.kernels.varlen_attention")
    def split(tokens, keys, max_query_len):  # as paged_attention decides, at G = 8 query heads a KV head
        tile_tokens, _ = varlen._tile_tokens(max_query_len, 8, varlen.PREFILL_TILES)
        return varlen.prefill_splits(num_tokens=tokens, tile_tokens=tile_tokens, kv_heads=8, max_keys=keys,
                                     multiprocessors=132)

    splits = {keys: split(tokens, keys, new) for tokens, keys, window, new in calls if window is None}
    assert splits[WARM_UP_KEYS] > 1 and splits[256] == 1
