"""The only part of the engine that touches tensors: turns a scheduled batch into one forward pass and its samples.

A step's tokens are laid end to end ([N], no padding): each sequence contributes its next chunk of prompt or its
one new token, described to the device by StepInputs (one copy). Attention goes through the paged KV cache, in one
variable-length kernel on GPUs (the PyTorch reference elsewhere); logits are computed, and a token sampled, only
for the sequences whose chunk reaches the end of their tokens. On a GPU with experts in this process, or on MoE
workers over NCCL, decode steps replay CUDA graphs (decode_graphs.py) unless `enforce_eager`; with colocated experts
and `mixed_step_graph_tokens`, small mixed steps replay piecewise ones (mixed_graphs.py). Experts on MoE
workers take part in each step through the hooks of cluster/expert_parallel/step_hooks.py.
"""

from __future__ import annotations

import functools

import torch

from gptoss_serve.cluster.block_manager import FULL, SLIDING
from gptoss_serve.cluster.decode_graphs import DecodeGraphs
from gptoss_serve.cluster.expert_parallel.step_hooks import StepSamples, expert_step_hooks
from gptoss_serve.cluster.kv_cache import KVCache
from gptoss_serve.cluster.mixed_graphs import MixedStepGraphs
from gptoss_serve.cluster.sampler import Sampler
from gptoss_serve.cluster.sequence import Sequence
from gptoss_serve.cluster.step_inputs import StepInputs
from gptoss_serve.kernels.dispatch import TritonOp
from gptoss_serve.kernels.paged_attention import paged_attention_reference, store_kv_reference
from gptoss_serve.model.attention import Attention
from gptoss_serve.model.experts import ExpertShard
from gptoss_serve.model.transformer import GptOssForCausalLM


@functools.wraps(paged_attention_reference)
def _paged_attention_reference(*args, max_query_len: int, **kwargs):  # noqa: ARG001 - the kernel's grid needs it
    return paged_attention_reference(*args, **kwargs)


_store_kv = TritonOp("kv_store.store_kv", reference=store_kv_reference)
_paged_attention = TritonOp("varlen_attention.paged_attention", reference=_paged_attention_reference)


def attention_kernels(device: torch.device):
    """(cache write, variable-length paged attention) for this device: Triton on CUDA, PyTorch references
    elsewhere."""
    return _store_kv.for_device(device), _paged_attention.for_device(device)


class PagedAttention:
    """AttentionBackend over the KV cache: stores the step's keys and values, then attends (an fp8 cache's scales
    with them: the store writes them, attention dequantizes with them, both on the device)."""

    def __init__(self, cache: KVCache, inputs: StepInputs, kernels) -> None:
        self.cache, self.inputs = cache, inputs
        self.store, self.kernel = kernels

    def __call__(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        group = SLIDING if layer.window else FULL
        inputs = self.inputs
        cache = self.cache.layer(layer.layer)
        self.store(k, v, cache.keys, cache.values, inputs.slot_mapping[group], **cache.scales)
        return self.kernel(q, cache.keys, cache.values, block_tables=inputs.block_tables[group],
                           query_start=inputs.query_start, context_lens=inputs.context_lens, sinks=layer.sinks,
                           window=layer.window, scale=layer.scale, max_query_len=inputs.max_query_len,
                           **cache.scales)


class ModelRunner:
    def __init__(self, model: GptOssForCausalLM, cache: KVCache, *, micro_batches: int = 1,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 256, max_model_len: int = 8192,
                 enforce_eager: bool = False, mixed_step_graph_tokens: int = 0) -> None:
        """micro_batches > 1 splits an eager step into that many groups of sequences, run ping-pong (see
        Decoder.forward_interleaved): worth it when experts are remote, so the wait for them hides the other
        groups' attention. Decode steps replayed from graphs stay whole (split, they read the experts' weights twice;
        measured in bench/ping_pong.py).
        max_num_batched_tokens: the most tokens a step holds (kernels are compiled up to it at start-up).
        max_num_seqs, max_model_len: the largest decode batch and sequence the CUDA graphs must hold.
        mixed_step_graph_tokens: the largest mixed step replayed from piecewise graphs (0: none)."""
        self.model, self.cache = model, cache
        self.device = model.device
        self.micro_batches = micro_batches
        self.sampler = Sampler()
        self.attention = attention_kernels(self.device)
        experts = model.model.layers[0].mlp.experts
        local = isinstance(experts, ExpertShard)
        # what each step does for experts on MoE workers (nothing, for experts in this process)
        self.expert_hooks = expert_step_hooks(experts, device=self.device, enforce_eager=enforce_eager)
        if local:  # every layer's experts run the same kernels: compile them once
            experts.warm_up(max_num_batched_tokens, model.config.num_experts_per_tok)
        self.graphs = None  # colocated experts' decode graphs, captured at start-up (remote ones: expert_hooks')
        groups = [FULL, SLIDING] if model.config.sliding_window else [FULL]
        self._capture = functools.partial(DecodeGraphs, groups=groups, max_num_seqs=max_num_seqs,
                                          max_blocks_per_seq=-(-max_model_len // cache.block_size), device=self.device)
        self.mixed_graphs = None  # colocated experts' piecewise graphs of mixed steps, if asked for
        self.mixed_graph_steps = 0  # steps they ran
        if local and experts.never_waits_for_host(model.dtype) and not enforce_eager:
            self.graphs = self._capture(self._forward)
            if mixed_step_graph_tokens:
                # the backend closes over the cache and kernels, not over self: a runner its own graphs refer to is
                # a reference cycle, which keeps the GPU memory of a dropped engine until a garbage collection
                kernels = self.attention
                try:
                    self.mixed_graphs = MixedStepGraphs(
                        model, lambda inputs: PagedAttention(cache, inputs, kernels),
                        max_tokens=min(mixed_step_graph_tokens, max_num_batched_tokens), device=self.device)
                except Exception as e:  # a setting the user chose: say which, and how to go without it
                    raise RuntimeError(f"engine.mixed_step_graph_tokens {mixed_step_graph_tokens}: the mixed steps' "
                                       f"graphs could not be captured ({type(e).__name__}: {e}); 0 turns them off"
                                       ) from e
        if self.device.type == "cuda":
            warm_up_prefill_attention(self.attention[1], cache, model)

    @torch.inference_mode()
    def launch(self, scheduled: list[tuple[Sequence, int]],
               pending_tokens: torch.Tensor | None = None) -> StepSamples | None:
        """Queues the step's forward pass and sampling on the device and returns without waiting for them; None
        when every chunk ends inside a prompt (nothing to sample). pending_tokens: the device samples of the step
        still in flight, for sequences whose newest token is PENDING."""
        sampling = [seq.sampling for seq, n in scheduled if seq.num_computed_tokens + n == len(seq)]
        try:
            logits = self._logits(scheduled, pending_tokens)  # [S, vocab]
        except Exception:
            self.expert_hooks.reset()
            raise
        self.expert_hooks.watch_step()
        if not sampling:
            return None
        return self.expert_hooks.wrap(self.sampler.launch(logits, sampling))

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        """One forward pass of a whole step -> float32 logits of its sampled rows."""
        attend = PagedAttention(self.cache, inputs, self.attention)
        hidden = self.model.model(inputs.token_ids, inputs.positions, attend)
        return self.model.compute_logits(hidden[inputs.sample_rows])

    def _logits(self, scheduled: list[tuple[Sequence, int]], pending_tokens: torch.Tensor | None) -> torch.Tensor:
        """-> float32 logits [S, vocab] for the S sequences that sample, in the order given."""
        build = functools.partial(StepInputs.build, block_size=self.cache.block_size, device=self.device,
                                  pending_tokens=pending_tokens)
        decode = all(n == 1 for _, n in scheduled)
        graphs = self._decode_graphs() if decode else None
        bucket = graphs.bucket(len(scheduled)) if graphs is not None else None
        # (a table never outgrows the graphs' width: sequences are held to max_model_len)
        if bucket is not None:
            inputs = build(scheduled, pad_to=bucket)
            self.expert_hooks.begin_replayed_step(bucket, self.model.config.num_hidden_layers)
            return graphs.run(inputs)
        groups = self._split(scheduled)
        tokens = sum(n for _, n in scheduled) if self.mixed_graphs is not None and len(groups) == 1 else None
        if tokens is not None and self.mixed_graphs.bucket(tokens) is not None:
            inputs = build(scheduled)
            self.expert_hooks.begin_step([tokens])
            self.mixed_graph_steps += 1
            return self.model.compute_logits(self.mixed_graphs.run(inputs)[inputs.sample_rows])
        prepared = [build(group) for group in groups]
        self.expert_hooks.begin_step([p.token_ids.shape[0] for p in prepared])
        if len(prepared) == 1:
            return self._forward(prepared[0])
        hidden = self.model.model.forward_interleaved(
            [(p.token_ids, p.positions, PagedAttention(self.cache, p, self.attention)) for p in prepared])
        return torch.cat([self.model.compute_logits(h[p.sample_rows]) for h, p in zip(hidden, prepared)])

    def _decode_graphs(self) -> DecodeGraphs | None:
        """The graphs a decode step replays: colocated experts' (captured at start-up), else those over the current
        link to the MoE workers (captured at the first decode step and after a reconnect), else None (eager)."""
        if self.graphs is not None:
            return self.graphs
        return self.expert_hooks.graphs(self._forward, self._capture)

    def _split(self, scheduled: list[tuple[Sequence, int]]) -> list[list[tuple[Sequence, int]]]:
        """Contiguous groups with about the same number of tokens each (order kept: logits follow it)."""
        k = min(self.micro_batches, len(scheduled))
        if k <= 1:
            return [scheduled]
        total = sum(n for _, n in scheduled)
        groups, current, done = [], [], 0
        for seq, n in scheduled:
            current.append((seq, n))
            done += n
            if len(groups) < k - 1 and done >= total * (len(groups) + 1) / k:
                groups.append(current)
                current = []
        return groups + ([current] if current else [])


# the widest tables the warm-up steps read: a prompt chunk this far into a sequence has its keys split across programs
WARM_UP_KEYS = 4096


@torch.inference_mode()
def warm_up_prefill_attention(kernel, cache: KVCache, model: GptOssForCausalLM) -> None:
    """Compiles the prompt-chunk variants of the attention kernel before the first request: a 17-token chunk on a
    full-attention layer unsplit (at 256 keys) and split across keys (at WARM_UP_KEYS), and one on a sliding-window
    layer. A variant compiled in the middle of serving takes seconds, and every request decoding beside that step waits
    for it; decode variants compile when the decode graphs are captured. The tables point at the null block only."""
    config, layer = model.config, cache.layer(0)
    device, block_size = layer.keys.device, layer.keys.shape[1]
    new = 17
    q = torch.zeros(new, config.num_attention_heads, config.head_dim, dtype=model.dtype, device=device)
    # the model's own sinks: a kernel variant is compiled per pointer dtype, and serving passes these (bf16 in a bf16
    # model; float32 zeros here once left two variants to compile in the middle of serving)
    sinks = model.model.layers[0].self_attn.sinks
    query_start = torch.tensor([0, new], dtype=torch.int32, device=device)
    steps = [(256, None), (WARM_UP_KEYS, None)] + ([(256, config.sliding_window)] if config.sliding_window else [])
    for keys, window in steps:
        tables = torch.zeros(1, keys // block_size, dtype=torch.int32, device=device)
        kernel(q, layer.keys, layer.values, block_tables=tables, query_start=query_start,
               context_lens=torch.tensor([keys], dtype=torch.int32, device=device), sinks=sinks, window=window,
               scale=config.head_dim**-0.5, max_query_len=new, **layer.scales)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
