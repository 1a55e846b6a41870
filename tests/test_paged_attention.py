"""Paged attention references against dense sink attention over the same keys and values."""

from __future__ import annotations

import pytest
import torch

from gptoss_serve.kernels.paged_attention import paged_decode_reference, paged_prefill_reference
from gptoss_serve.kernels.sink_attention_reference import sink_attention

BLOCK, HQ, HKV, D = 4, 6, 2, 8


def scatter_into_blocks(keys: torch.Tensor, num_blocks: int, gen: torch.Generator):
    """Places a [ctx, Hkv, D] sequence in randomly chosen blocks; returns (cache, block table)."""
    blocks_needed = -(-keys.shape[0] // BLOCK)
    table = torch.randperm(num_blocks - 1, generator=gen)[:blocks_needed] + 1
    cache = torch.randn(num_blocks, BLOCK, HKV, D, generator=gen)  # garbage everywhere else
    padded = torch.cat([keys, torch.zeros(blocks_needed * BLOCK - keys.shape[0], HKV, D)])
    cache[table] = padded.view(blocks_needed, BLOCK, HKV, D)
    return cache, table


@pytest.mark.parametrize("window", [None, 5, 9])
def test_decode_matches_dense(window):
    gen = torch.Generator().manual_seed(0)
    lens = [1, 3, 4, 5, 13, 30]
    sinks = torch.randn(HQ, generator=gen)
    width = -(-max(lens) // BLOCK)
    queries, k_caches, v_caches, tables, expected = [], [], [], [], []
    for n in lens:
        k, v = torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen)
        q = torch.randn(1, HQ, D, generator=gen)
        pos = torch.arange(n)
        expected.append(sink_attention(q[None], k[None], v[None], sinks, q_positions=pos[-1:], k_positions=pos,
                                       window=window, scale=0.3)[0, 0])
        kc, table = scatter_into_blocks(k, 64, torch.Generator().manual_seed(n))
        vc, _ = scatter_into_blocks(v, 64, torch.Generator().manual_seed(n))
        queries.append(q[0]), k_caches.append(kc), v_caches.append(vc)
        tables.append(torch.cat([table, torch.zeros(width - len(table), dtype=torch.long)]))
    # one shared cache: give each sequence its own copy of the blocks it uses
    key_cache, value_cache = torch.zeros(64 * len(lens), BLOCK, HKV, D), torch.zeros(64 * len(lens), BLOCK, HKV, D)
    for i, (kc, vc) in enumerate(zip(k_caches, v_caches)):
        key_cache[64 * i:64 * (i + 1)], value_cache[64 * i:64 * (i + 1)] = kc, vc
        tables[i] = torch.where(tables[i] > 0, tables[i] + 64 * i, 0)
    got = paged_decode_reference(torch.stack(queries), key_cache, value_cache, block_tables=torch.stack(tables),
                                 context_lens=torch.tensor(lens), sinks=sinks, window=window, scale=0.3)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("context_len, new", [(7, 7), (19, 5), (16, 16)])
def test_prefill_chunk_matches_dense(window, context_len, new):
    gen = torch.Generator().manual_seed(context_len)
    k, v = torch.randn(context_len, HKV, D, generator=gen), torch.randn(context_len, HKV, D, generator=gen)
    q = torch.randn(context_len, HQ, D, generator=gen)
    sinks = torch.randn(HQ, generator=gen)
    pos = torch.arange(context_len)
    expected = sink_attention(q[None], k[None], v[None], sinks, q_positions=pos, k_positions=pos, window=window,
                              scale=0.25)[0, -new:]
    key_cache, table = scatter_into_blocks(k, 32, torch.Generator().manual_seed(1))
    value_cache, _ = scatter_into_blocks(v, 32, torch.Generator().manual_seed(1))
    got = paged_prefill_reference(q[-new:], key_cache, value_cache, block_table=table, context_len=context_len,
                                  sinks=sinks, window=window, scale=0.25)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
