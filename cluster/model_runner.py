"""The only part of the engine that touches tensors: turns a scheduled batch into one forward pass and its samples.

A step's tokens are laid end to end ([N], no padding): each sequence contributes its next chunk of prompt or its
one new token, described to the device by StepInputs (one copy). Attention goes through the paged KV cache, in one
variable-length kernel on GPUs (the PyTorch reference elsewhere); logits are computed, and a token sampled, only
for the sequences whose chunk reaches the end of their tokens. On a GPU with experts in this process, decode
steps replay CUDA graphs (decode_graphs.py) unless `enforce_eager`.
"""

from __future__ import annotations

import functools

import torch

from gptoss_serve.cluster.block_manager import FULL, SLIDING
from gptoss_serve.cluster.decode_graphs import DecodeGraphs
from gptoss_serve.cluster.expert_parallel.exchange import capturing, wait_for_event
from gptoss_serve.cluster.kv_cache import KVCache
from gptoss_serve.cluster.sampler import PendingSample, Sampler, SamplerOutput
from gptoss_serve.cluster.sequence import Sequence
from gptoss_serve.cluster.step_inputs import StepInputs
from gptoss_serve.kernels.paged_attention import paged_attention_reference, store_kv_reference
from gptoss_serve.model.attention import Attention
from gptoss_serve.model.experts import ExpertShard, ExpertsUnavailableError
from gptoss_serve.model.transformer import GptOssForCausalLM


def attention_kernels(device: torch.device):
    """(cache write, variable-length paged attention) for this device: Triton on CUDA, PyTorch references
    elsewhere."""
    if device.type == "cuda":
        from gptoss_serve.kernels.kv_store import store_kv  # Triton: only where a GPU is
        from gptoss_serve.kernels.varlen_attention import paged_attention

        return store_kv, paged_attention

    @functools.wraps(paged_attention_reference)
    def reference(*args, max_query_len: int, **kwargs):  # noqa: ARG001 - the kernel's grid needs it, not this
        return paged_attention_reference(*args, **kwargs)

    return store_kv_reference, reference


class PagedAttention:
    """AttentionBackend over the KV cache: stores the step's keys and values, then attends."""

    def __init__(self, cache: KVCache, inputs: StepInputs, kernels) -> None:
        self.cache, self.inputs = cache, inputs
        self.store, self.kernel = kernels

    def __call__(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        group = SLIDING if layer.window else FULL
        inputs = self.inputs
        key_cache, value_cache = self.cache.layer(layer.layer)
        self.store(k, v, key_cache, value_cache, inputs.slot_mapping[group])
        return self.kernel(q, key_cache, value_cache, block_tables=inputs.block_tables[group],
                           query_start=inputs.query_start, context_lens=inputs.context_lens, sinks=layer.sinks,
                           window=layer.window, scale=layer.scale, max_query_len=inputs.max_query_len)


class RemoteStepSamples:
    """A step's samples when its experts are on MoE workers: the host waits for them at most the expert timeout
    (a hung worker would otherwise block the wait forever); past it the link is aborted and the step fails."""

    def __init__(self, samples: PendingSample, link) -> None:
        self.samples, self.link = samples, link
        self.client = link.client  # the link the step ran over: a later reconnect does not make its samples good

    @property
    def tokens(self) -> torch.Tensor:
        return self.samples.tokens

    def result(self) -> SamplerOutput:
        if self.samples.event is not None:
            try:
                wait_for_event(self.samples.event, self.link.timeout_s, "did not answer")
            except ExpertsUnavailableError:
                self.link.reset()
                raise
        if self.client is not None:  # an aborted link's kernels exit early: what the step computed is garbage
            try:
                self.client.check()
            except ExpertsUnavailableError:
                if self.link.client is self.client:
                    self.link.reset()
                raise
        return self.samples.result()


class ModelRunner:
    def __init__(self, model: GptOssForCausalLM, cache: KVCache, *, micro_batches: int = 1,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 256, max_model_len: int = 8192,
                 enforce_eager: bool = False) -> None:
        """micro_batches > 1 splits an eager step into that many groups of sequences, run ping-pong (see
        Decoder.forward_interleaved): worth it when experts are remote, so the wait for them hides the other
        groups' attention. Decode steps replayed from graphs stay whole (split, they read the experts' weights twice;
        measured in bench/ping_pong.py).
        max_num_batched_tokens: the most tokens a step holds (kernels are compiled up to it at start-up).
        max_num_seqs, max_model_len: the largest decode batch and sequence the CUDA graphs must hold."""
        self.model, self.cache = model, cache
        self.device = model.device
        self.micro_batches = micro_batches
        self.sampler = Sampler()
        self.attention = attention_kernels(self.device)
        experts = model.model.layers[0].mlp.experts
        local = isinstance(experts, ExpertShard)
        self.expert_link = getattr(experts, "link", None)  # RemoteExperts' link to the MoE workers, if remote
        if local:  # every layer's experts run the same kernels: compile them once
            experts.warm_up(max_num_batched_tokens, model.config.num_experts_per_tok)
        self.graphs = None
        groups = [FULL, SLIDING] if model.config.sliding_window else [FULL]
        self._capture = functools.partial(DecodeGraphs, groups=groups, max_num_seqs=max_num_seqs,
                                          max_blocks_per_seq=-(-max_model_len // cache.block_size), device=self.device)
        if local and experts.never_waits_for_host(model.dtype) and not enforce_eager:
            self.graphs = self._capture(self._forward)
        # Remote experts over NCCL: the exchange's sends and receives are captured with the rest of a decode step.
        # The graphs hold the link's communicators, so they are captured once a link is up, and again after a
        # reconnect (see _remote_graphs).
        self.remote_graphs = (self.expert_link is not None and self.expert_link.backend == "nccl"
                              and self.device.type == "cuda" and not enforce_eager)
        self._graphs_client = None  # the ExpertClient the graphs were captured over

    def run(self, scheduled: list[tuple[Sequence, int]]) -> SamplerOutput:
        """(sequence, number of new tokens) pairs -> a token (and its logprobs, if asked) for each sequence whose
        chunk reaches its last token, in the order given."""
        pending = self.launch(scheduled)
        return pending.result() if pending is not None else SamplerOutput(token_ids=[], logprobs=[])

    @torch.inference_mode()
    def launch(self, scheduled: list[tuple[Sequence, int]],
               pending_tokens: torch.Tensor | None = None) -> PendingSample | None:
        """Queues the step's forward pass and sampling on the device and returns without waiting for them; None
        when every chunk ends inside a prompt (nothing to sample). pending_tokens: the device samples of the step
        still in flight, for sequences whose newest token is PENDING."""
        sampling = [seq.sampling for seq, n in scheduled if seq.num_computed_tokens + n == len(seq)]
        try:
            logits = self._logits(scheduled, pending_tokens)  # [S, vocab]
        except Exception:
            if self.expert_link is not None:  # the workers may be mid-step: the link is out of step with them
                self.expert_link.reset()
            raise
        if self.expert_link is not None:
            self.expert_link.watch_step()
        if not sampling:
            return None
        samples = self.sampler.launch(logits, sampling)
        return RemoteStepSamples(samples, self.expert_link) if self.expert_link is not None else samples

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
        graphs = self._remote_graphs() if self.remote_graphs and decode else self.graphs
        bucket = graphs.bucket(len(scheduled)) if graphs is not None else None
        # (a table never outgrows the graphs' width: sequences are held to max_model_len)
        if bucket is not None and decode:
            inputs = build(scheduled, pad_to=bucket)
            if self.remote_graphs:
                client = self._graphs_client
                self.expert_link.begin_step([bucket])
                client.record_replayed_step(bucket, self.model.config.num_hidden_layers)
            return graphs.run(inputs)
        groups = self._split(scheduled)
        prepared = [build(group) for group in groups]
        if self.expert_link is not None:
            self.expert_link.begin_step([p.token_ids.shape[0] for p in prepared])
        if len(prepared) == 1:
            return self._forward(prepared[0])
        hidden = self.model.model.forward_interleaved(
            [(p.token_ids, p.positions, PagedAttention(self.cache, p, self.attention)) for p in prepared])
        return torch.cat([self.model.compute_logits(h[p.sample_rows]) for h, p in zip(hidden, prepared)])

    def _remote_graphs(self) -> DecodeGraphs | None:
        """The decode graphs over the current link to the MoE workers, captured now if the link is new (at the
        first decode step, and after a reconnect: the old graphs held the old link's communicators)."""
        client = self.expert_link.get()
        if client is not self._graphs_client:
            self.graphs, self._graphs_client = None, None

            def forward(inputs: StepInputs) -> torch.Tensor:
                if capturing():
                    return self._forward(inputs)
                # a warm-up pass before the capture exchanges for real: announced, and watched as a step is
                self.expert_link.begin_step([inputs.num_tokens])
                logits = self._forward(inputs)
                self.expert_link.watch_step()
                return logits

            self.graphs = self._capture(forward)
            self._graphs_client = client
        return self.graphs

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
