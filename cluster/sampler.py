"""Turns a batch of next-token logits into one token per request, each with its own sampling options.

The order is vLLM's: a grammar's token bitmask (constrained decoding), repetition, frequency and presence penalties,
stop tokens held back until min_tokens, temperature, top-k, top-p, min-p, then argmax (greedy) or a draw from the
softmax. Logprobs come from the model's logits, after the bitmask where there is one (vLLM's choice too: it masks the
logits before its sampler): a constrained request's logprobs are those of the distribution it was drawn from, the
tokens its grammar forbids at -inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gptoss_serve.cluster.engine_protocol import TokenLogprobs
from gptoss_serve.cluster.grammar import GrammarMatcher, token_bitmasks
from gptoss_serve.cluster.sampling_params import HARMONY_STOP_TOKEN_IDS, SamplingParams
from gptoss_serve.kernels.dispatch import TritonOp
from gptoss_serve.kernels.token_bitmask_reference import apply_token_bitmask_reference

# logits [B, V] masked in place: the Triton kernel on a GPU, the PyTorch reference elsewhere
_apply_token_bitmask = TritonOp("token_bitmask.apply_token_bitmask", reference=apply_token_bitmask_reference)


class SamplingState:
    """What the sampler needs to know about one request; its Sequence keeps one for the request's life.

    `output_token_ids` is the sequence's own list, appended to as tokens come out: the penalties read it live.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: list[int],
        output_token_ids: list[int] | None = None,
        *,
        default_stop_token_ids: Sequence[int] = HARMONY_STOP_TOKEN_IDS,
    ) -> None:
        self.params = params
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids = output_token_ids if output_token_ids is not None else []
        stop = params.stop_token_ids if params.stop_token_ids is not None else tuple(default_stop_token_ids)
        # with ignore_eos no stop token ends the request, so none needs holding back for min_tokens either
        self.stop_token_ids: tuple[int, ...] = () if params.ignore_eos else stop
        # looked up once a step per request (the engine's "is it a stop token?"): a set, whatever the list's length
        self.stop_token_set: frozenset[int] = frozenset(self.stop_token_ids)
        self._stops_in_vocab: tuple[int, list[int]] | None = None  # (vocab size, those of the stop ids below it)
        self._generator: torch.Generator | None = None
        self.grammar: GrammarMatcher | None = None  # the engine sets it for a request with a structured output
        # penalty inputs, built once on the logits' device; output counts are brought up to date each step
        self._prompt_mask: Tensor | None = None  # [V] bool
        self._output_counts: Tensor | None = None  # [V] float32
        self._counted = 0

    def stops_below(self, vocab_size: int) -> list[int]:
        """The stop ids a vocabulary of this size has (a stop id past it, in a small test model, cannot come out
        anyway); worked out once, not on every step until min_tokens."""
        if self._stops_in_vocab is None or self._stops_in_vocab[0] != vocab_size:
            self._stops_in_vocab = (vocab_size, sorted({t for t in self.stop_token_ids if t < vocab_size}))
        return self._stops_in_vocab[1]

    def generator(self, device: torch.device) -> torch.Generator | None:
        """This request's own random stream, or None without a seed; made on first use, on the logits' device."""
        if self.params.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.params.seed)
        elif self._generator.device != device:
            # a fresh generator would replay the samples already drawn
            raise RuntimeError(f"request seeded on {self._generator.device} cannot sample on {device}")
        return self._generator

    def _penalty_inputs(self, vocab_size: int, device: torch.device) -> tuple[Tensor, Tensor, list[int], list[int]]:
        """The request's prompt mask ([V] bool) and output counts ([V] float32) as last stored, with the prompt
        tokens still to mark and the output tokens still to count; the sampler adds those and stores the result."""
        fresh = self._prompt_mask is None or self._prompt_mask.device != device
        if fresh:
            self._prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self._output_counts = None
        output = self.output_token_ids
        if self._output_counts is None or len(output) < self._counted:
            # first use, or the engine rewound the output: count from scratch
            self._output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            self._counted = 0
        # only the tokens appended since the last step are new: the per-step work does not grow with the output
        new = output[self._counted:]
        self._counted = len(output)
        return self._prompt_mask, self._output_counts, self.prompt_token_ids if fresh else [], new


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where the request asked for none


class PendingSample:
    """A step's samples on their way to the host. Everything the host will read is copied into pinned memory,
    queued on the device behind the step, and an event marks when it landed: `result` waits for that event alone,
    not for whatever the device ran after it (the next step, under async scheduling). `tokens` stays on the device
    for the next step's inputs."""

    def __init__(self, tokens: Tensor, logprobs: _LogprobTensors | None, params: list[SamplingParams]) -> None:
        self.tokens = tokens  # [S] int64, on the logits' device
        self.params = params
        on_gpu = tokens.device.type == "cuda"
        to_host = [tokens] + (list(logprobs.tensors) if logprobs else [])
        self._host = [t.to("cpu", non_blocking=True) if on_gpu else t for t in to_host]
        self._wanted = logprobs.rows if logprobs else []
        self.event = None  # marks the copies' arrival on the host (GPU only)
        if on_gpu:
            self.event = torch.cuda.Event()
            self.event.record()

    def result(self) -> SamplerOutput:
        if self.event is not None:
            self.event.synchronize()
        token_ids = self._host[0].tolist()
        out: list[TokenLogprobs | None] = [None] * len(self.params)
        if self._wanted:
            chosen, rank, top_lp, top_id = (t.tolist() for t in self._host[1:])
            for j, i in enumerate(self._wanted):
                k = self.params[i].logprobs
                out[i] = TokenLogprobs(token_id=token_ids[i], logprob=chosen[j], rank=rank[j],
                                       top=list(zip(top_id[j][:k], top_lp[j][:k])))
        return SamplerOutput(token_ids=token_ids, logprobs=out)


class Sampler:
    """Stateless: every per-request thing lives in the SamplingStates passed in."""

    def sample(self, logits: Tensor, requests: list[SamplingState]) -> SamplerOutput:
        """logits: [B, V], one row per request, in the order of `requests`."""
        return self.launch(logits, requests).result()

    def launch(self, logits: Tensor, requests: list[SamplingState]) -> PendingSample:
        """Queues the sampling of logits [B, V] on their device; nothing waits for the device here."""
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits must be [{len(requests)}, V], got {list(logits.shape)}")
        params = [state.params for state in requests]
        raw = logits
        logits = logits.to(torch.float32, copy=True)  # [B, V], changed in place below
        if _apply_grammars(logits, requests) and any(p.logprobs is not None for p in params):
            raw = logits.clone()  # logprobs of the constrained distribution (see the module's docstring)
        _apply_penalties(logits, requests)
        _suppress_stop_tokens(logits, requests)

        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if len(random_rows) == len(requests):
            tokens = _draw(logits, requests)  # [B]
        else:
            # greedy: the argmax after penalties; temperature and the cuts cannot move it
            tokens = logits.argmax(dim=-1)  # [B]
            if random_rows:
                rows = _on_device(random_rows, logits.device)  # [R]
                chosen = _draw(logits[rows], [requests[i] for i in random_rows])  # [R]
                tokens = tokens.index_copy(0, rows, chosen)
        return PendingSample(tokens, _logprob_tensors(raw, tokens, params), params)


def _on_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """A host list as a tensor on `device`, queued behind the kernels already there. A plain torch.tensor(...,
    device=gpu) is a blocking copy, which waits for the whole stream: the step's forward pass, and under async
    scheduling the step before it too; the device then idles while the host prepares the next step. From pinned
    memory the copy is asynchronous (PyTorch keeps the pinned block until the copy has run)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _apply_grammars(logits: Tensor, requests: list[SamplingState]) -> bool:
    """Masks the tokens each constrained row's grammar forbids; -> whether any row has a grammar. The masks are
    filled on the host while the device may still be running the step's forward pass, then go over in one copy."""
    rows = [i for i, state in enumerate(requests) if state.grammar is not None]
    if not rows:
        return False
    on_gpu = logits.device.type == "cuda"  # host buffers pinned, so the copies to the GPU don't block the host
    with torch.profiler.record_function("grammar_fill_bitmask"):
        masks = token_bitmasks([requests[i].grammar for i in rows], pin=on_gpu)  # [R, W]
    with torch.profiler.record_function("grammar_apply_bitmask"):
        _apply_token_bitmask(logits, masks.to(logits.device, non_blocking=on_gpu),
                             _on_device(rows, logits.device, torch.int64))  # [R]
    return True


def _apply_penalties(logits: Tensor, requests: list[SamplingState]) -> None:
    rows = [
        i for i, state in enumerate(requests)
        if state.params.repetition_penalty != 1.0
        or state.params.frequency_penalty != 0.0
        or state.params.presence_penalty != 0.0
    ]
    if not rows:
        return
    vocab_size, device = logits.shape[1], logits.device
    inputs = [requests[i]._penalty_inputs(vocab_size, device) for i in rows]
    in_prompt = torch.stack([mask for mask, _, _, _ in inputs])  # [P, V]
    counts = torch.stack([count for _, count, _, _ in inputs])  # [P, V]
    # what changed since the last step goes in with one transfer and one kernel for the whole batch, not one per row
    marks = [row * vocab_size + t for row, (_, _, prompt, _) in enumerate(inputs) for t in prompt]
    if marks:
        in_prompt.view(-1).index_put_((_on_device(marks, device),), torch.ones((), dtype=torch.bool, device=device))
        _store(in_prompt, [(row, mask) for row, (mask, _, prompt, _) in enumerate(inputs) if prompt])
    new = [row * vocab_size + t for row, (_, _, _, tokens) in enumerate(inputs) for t in tokens]
    if new:
        counts.view(-1).index_add_(0, _on_device(new, device), torch.ones(len(new), device=device))
        _store(counts, [(row, count) for row, (_, count, _, tokens) in enumerate(inputs) if tokens])

    in_output = counts > 0  # [P, V]
    penalties = _on_device(
        [[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in (requests[i].params for i in rows)],
        device,
    )  # [P, 3]
    repetition, frequency, presence = penalties.split(1, dim=1)  # [P, 1] each
    index = _on_device(rows, device)  # [P]
    picked = logits[index]  # [P, V]
    # vLLM's (and CTRL's) rule: a seen token's logit moves towards -inf whatever its sign
    penalized = torch.where(picked > 0, picked / repetition, picked * repetition)  # [P, V]
    picked = torch.where(in_prompt | in_output, penalized, picked)  # [P, V]
    picked = picked - frequency * counts - presence * in_output  # [P, V]
    logits.index_copy_(0, index, picked)


def _store(batch: Tensor, targets: list[tuple[int, Tensor]]) -> None:
    """Copies rows of batch [P, V] back into the requests' own [V] tensors, in a few kernels whatever P is."""
    rows = batch.unbind(0)
    torch._foreach_copy_([target for _, target in targets], [rows[row] for row, _ in targets])


def _suppress_stop_tokens(logits: Tensor, requests: list[SamplingState]) -> None:
    vocab_size = logits.shape[1]
    rows: list[int] = []
    token_ids: list[int] = []
    for i, state in enumerate(requests):
        # a grammar decides where its answer ends: holding its one allowed stop token back would leave no token
        if len(state.output_token_ids) < state.params.min_tokens and state.grammar is None:
            stops = state.stops_below(vocab_size)
            rows += [i] * len(stops)
            token_ids += stops
    if rows:
        # the value as a device tensor: a Python scalar there goes over by a blocking copy
        stop = torch.full((), -math.inf, device=logits.device)
        logits.index_put_((_on_device(rows, logits.device), _on_device(token_ids, logits.device)), stop)


def _draw(logits: Tensor, requests: list[SamplingState]) -> Tensor:
    """One token per row of logits [R, V], drawn from its softmax after temperature, top-k, top-p and min-p."""
    rows, vocab_size = logits.shape
    device = logits.device
    params = [state.params for state in requests]
    ks = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]  # vocab_size: top-k off
    options = _on_device([[p.temperature, k, p.top_p, p.min_p] for p, k in zip(params, ks)], device)  # [R, 4]
    temperature, top_k, top_p, min_p = options.split(1, dim=1)  # [R, 1] each
    logits = logits / temperature  # [R, V]

    cut_rows = [k for p, k in zip(params, ks) if k < vocab_size or p.top_p < 1.0]
    if cut_rows:
        # top-p needs every token in order, unless top-k cut the row first: then its k leading tokens are enough,
        # and torch.topk over a few leading tokens is far cheaper than sorting the whole vocabulary
        logits = _mask_top_k_top_p(logits, top_k.long(), top_p, leading=max(cut_rows))
    if any(p.min_p > 0.0 for p in params):
        # p < min_p * p_max, in logits: the softmax's normalizer cancels out
        cut = logits.max(dim=-1, keepdim=True).values + min_p.log()  # [R, 1]
        logits = logits.masked_fill(logits < cut, -math.inf)

    probs = logits.softmax(dim=-1)  # [R, V]
    # exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) is token i with probability p_i, for every row at once
    noise = torch.empty_like(probs)  # [R, V]
    seeded = [(row, state.generator(device)) for row, state in enumerate(requests) if state.params.seed is not None]
    if len(seeded) < rows:
        noise.exponential_()
    for row, generator in seeded:
        # exactly V draws from the request's own stream: what it samples never depends on the rest of the batch
        noise[row].exponential_(generator=generator)
    # an Exp(1) draw of exactly 0 would turn a masked token's 0 / 0 into NaN, which argmax picks
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)  # [R]


def _mask_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor, *, leading: int) -> Tensor:
    """logits [R, V]; top_k [R, 1] (V: off); top_p [R, 1] (1: off). Returns logits with the cut tokens at -inf.

    leading: how many of each row's likeliest tokens to rank, enough for every row whose top-k or top-p is on.
    """
    vocab_size = logits.shape[1]
    if leading < vocab_size:
        ordered, order = logits.topk(leading, dim=-1)  # [R, K], likeliest first
    else:
        ordered, order = logits.sort(dim=-1, descending=True)  # [R, V]
    position = torch.arange(ordered.shape[1], device=logits.device)  # [K]
    ordered = ordered.masked_fill(position >= top_k, -math.inf)  # [R, K]
    probs = ordered.softmax(dim=-1)  # [R, K]
    # keep the likeliest tokens until their mass reaches top_p: a token goes once the mass before it does;
    # the first token always stays, and rows at top_p 1 stay whole despite cumsum's rounding
    mass_before = probs.cumsum(dim=-1) - probs  # [R, K]
    ordered = ordered.masked_fill((mass_before >= top_p) & (top_p < 1.0), -math.inf)
    if leading == vocab_size:
        return torch.empty_like(logits).scatter_(1, order, ordered)  # [R, V]
    masked = torch.full_like(logits, -math.inf).scatter_(1, order, ordered)  # [R, V]
    # rows with top-k off were not cut to K tokens (their top-p is off too, or K would be V): they stay whole
    return torch.where(top_k >= vocab_size, logits, masked)


@dataclass(frozen=True)
class _LogprobTensors:
    rows: list[int]  # the requests that asked for logprobs, in batch order
    tensors: tuple[Tensor, Tensor, Tensor, Tensor]  # chosen [L], rank [L], top logprobs [L, n], top ids [L, n]


def _logprob_tensors(raw: Tensor, tokens: Tensor, params: list[SamplingParams]) -> _LogprobTensors | None:
    """The logprobs the requests asked for, as device tensors (read with the tokens, in one wait)."""
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not wanted:
        return None
    index = _on_device(wanted, raw.device)  # [L]
    logprobs = raw[index].float().log_softmax(dim=-1)  # [L, V]
    chosen = logprobs.gather(1, tokens[index].unsqueeze(1))  # [L, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # [L]
    n = min(max(params[i].logprobs for i in wanted), raw.shape[1])
    top_values, top_ids = logprobs.topk(n, dim=-1)  # [L, n]
    return _LogprobTensors(wanted, (chosen.squeeze(1), ranks, top_values, top_ids))
