"""The inference engine of one attention replica: continuous batching over a paged KV cache.

    engine.add_request(request_id, prompt_token_ids, sampling_params)
    while engine.has_unfinished_requests:
        for out in engine.step(): ...     # schedule -> run -> postprocess

Requests join at any step and leave when they finish; `abort` frees a request's blocks at once.

With async scheduling (on GPUs by default) a step only launches its work on the device: the call that launches
step t+1 then reads step t's tokens and returns step t's outputs, so the host schedules, builds inputs and
postprocesses while the device runs. Sequences decoding in step t+1 read their step-t token on the device
(PENDING on the host until then); a stop token is found one step late, and the extra token computed for that
sequence is dropped. Requests with penalties or a grammar (structured outputs) need every output token on the host
when sampling: while one runs, steps are synchronous.

A request with a structured output gets a grammar matcher (cluster/grammar.py): its row of logits is masked to what
the grammar allows (in the sampler), the sampled token advances the matcher, and a grammar that is complete ends the
request ("stop"), unless max_tokens ended it first ("length").
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, replace

import torch

from gptoss_serve.cluster.block_manager import BlockManager
from gptoss_serve.cluster.output_processor import TextStreams
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.grammar import GrammarCompiler, advance
from gptoss_serve.cluster.kv_cache import (KVCache, bytes_per_block, kv_cache_dtype, resolve_max_model_len,
                                           resolve_num_blocks)
from gptoss_serve.cluster.model_runner import ModelRunner
from gptoss_serve.cluster.engine_protocol import GRAMMAR_FAILED, RequestOutput, RequestTimes, TokenLogprobs
from gptoss_serve.cluster.sampler import PendingSample
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.cluster.scheduler import Scheduler
from gptoss_serve.cluster.sequence import PENDING, Sequence, Status
from gptoss_serve.model.experts import ExpertsUnavailableError
from gptoss_serve.model.tokenizer import Tokenizer
from gptoss_serve.model.transformer import GptOssForCausalLM


@dataclass
class CompletionOutput:
    """A finished request, as `generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprobs] | None = None


logger = logging.getLogger(__name__)
MAX_FAILED_STEPS_IN_A_ROW = 3  # then the failure is the engine's, not one batch's: the step raises


@dataclass
class _Launched:
    """A step whose work is on the device: what it scheduled, the sequences that sample (in sample order), and its
    samples on their way to the host (None when no sequence samples)."""

    scheduled: list[tuple[Sequence, int]]
    sampled: list[Sequence]
    samples: PendingSample | None


class LLMEngine:
    def __init__(self, model: GptOssForCausalLM, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(), *,
                 micro_batches: int = 1, detokenize: bool = True) -> None:
        """detokenize=False leaves text and stop strings to the caller (new_text None): an engine core's client
        decodes beside it, off the step's critical path."""
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.texts = TextStreams(tokenizer) if detokenize else None
        self.kv_cache_dtype = kv_cache_dtype(config.kv_cache_dtype, model.dtype)
        self.num_blocks = resolve_num_blocks(config, model.config, dtype=self.kv_cache_dtype, device=model.device)
        self.max_model_len = resolve_max_model_len(config, model.config, self.num_blocks)
        self.blocks = BlockManager(num_blocks=self.num_blocks, block_size=config.block_size,
                                   sliding_window=model.config.sliding_window,
                                   enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   long_prefill_token_threshold=config.long_prefill_token_threshold)
        self.runner = ModelRunner(model, KVCache(model.config, num_blocks=self.num_blocks, block_size=config.block_size,
                                                 dtype=self.kv_cache_dtype, device=model.device),
                                  micro_batches=micro_batches, max_num_batched_tokens=config.max_num_batched_tokens,
                                  max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len,
                                  enforce_eager=config.enforce_eager,
                                  mixed_step_graph_tokens=config.mixed_step_graph_tokens)
        # what the model's tensors and the cache take on the device (start-up logs, the core's ready stats)
        self.weights_bytes = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(),
                                                                                        model.buffers()))
        self.kv_cache_bytes = self.num_blocks * bytes_per_block(model.config, config.block_size, self.kv_cache_dtype)
        self.requests: dict[str, Sequence] = {}
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else model.device.type == "cuda")
        self.in_flight: _Launched | None = None
        # requests whose sampling reads their whole output (penalties, a grammar): steps are synchronous (see above)
        self.synchronous_requests: set[str] = set()
        self.grammars = GrammarCompiler(tokenizer)
        self.failed_steps_in_a_row = 0
        self.step_tokens = 0  # tokens computed by the step the last `step` launched (the core's EngineStats)
        # Triton compiles from here on (start-up, above, compiled what it could): each stalled a step
        self._compiles = _compile_watch(model.device)
        self._compiles_at_start = self._compiles.count if self._compiles is not None else 0
        self._generate_ids = itertools.count()
        torch.manual_seed(config.seed)

    # ---- requests -----------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError("prompt must contain at least one token")
        vocab = self.model.config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt)} tokens, but max_model_len is {self.max_model_len} "
                             f"(the prompt plus at least one generated token must fit)")
        room = self.max_model_len - len(prompt)
        if sampling_params.max_tokens is not None and sampling_params.max_tokens > room:
            raise ValueError(f"max_tokens is {sampling_params.max_tokens}, but the prompt has {len(prompt)} tokens "
                             f"and max_model_len is {self.max_model_len}: at most {room} can be generated")
        max_tokens = room if sampling_params.max_tokens is None else sampling_params.max_tokens
        if sampling_params.min_tokens > max_tokens:  # (SamplingParams holds it under an explicit max_tokens)
            raise ValueError(f"min_tokens is {sampling_params.min_tokens}, but the prompt has {len(prompt)} tokens "
                             f"and max_model_len is {self.max_model_len}: at most {room} can be generated")
        seq = Sequence(request_id, prompt, sampling_params, tuple(self.tokenizer.stop_token_ids))
        seq.length_cap = len(prompt) + max_tokens
        p = sampling_params
        if p.structured_output is not None:
            seq.sampling.grammar = self.grammars.matcher(p.structured_output)  # ValueError: it does not compile
        self.requests[request_id] = seq
        if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 \
                or p.structured_output is not None:
            self.synchronous_requests.add(request_id)
        if self.texts is not None:
            self.texts.add(request_id, sampling_params)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stops a request and frees its blocks; unknown or finished ids are ignored. True if it was running."""
        seq = self._forget(request_id)
        if seq is None:
            return False
        self.scheduler.finish(seq)
        if self.texts is not None:
            self.texts.remove(request_id)
        if not self.requests and self.in_flight is not None:  # the last one left: nothing will read that step
            self._collect(self._take_in_flight())
        return True

    def _forget(self, request_id: str) -> Sequence | None:
        self.synchronous_requests.discard(request_id)
        return self.requests.pop(request_id, None)

    @property
    def has_unfinished_requests(self) -> bool:
        """Requests left, or a step in flight whose outputs the next `step` returns."""
        return bool(self.requests) or self.in_flight is not None

    # ---- the step -------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedules and launches a step, and returns the outputs of the step before it (async scheduling) or of
        this one."""
        synchronous = not self.async_scheduling or bool(self.synchronous_requests)
        self.step_tokens = 0
        if synchronous and self.in_flight is not None:  # such a request joined: first drain the step in flight
            return self._collect(self._take_in_flight())
        scheduled = self.scheduler.schedule()
        previous = self._take_in_flight()
        outputs: list[RequestOutput] = []
        if scheduled:
            self.in_flight, failed = self._launch(scheduled, previous)
            outputs += failed
        if previous is not None:
            outputs = self._collect(previous) + outputs
        if synchronous and self.in_flight is not None:
            outputs += self._collect(self._take_in_flight())
        return outputs

    def _take_in_flight(self) -> _Launched | None:
        launched, self.in_flight = self.in_flight, None
        return launched

    def _launch(self, scheduled: list[tuple[Sequence, int]],
                previous: _Launched | None) -> tuple[_Launched | None, list[RequestOutput]]:
        """-> the launched step, or None and its requests' failures."""
        try:
            samples = self.runner.launch(scheduled, previous.samples.tokens if previous and previous.samples else None)
        except Exception as e:  # noqa: BLE001 - one bad step fails its requests; a broken engine fails every step
            return None, self._fail_step(scheduled, e)
        self.step_tokens = self.scheduler.scheduled_tokens
        sampled = self.scheduler.advance(scheduled)
        for row, seq in enumerate(sampled):
            seq.output_token_ids.append(PENDING)
            seq.pending_row = row
        return _Launched(scheduled, sampled, samples), []

    def _collect(self, launched: _Launched) -> list[RequestOutput]:
        """Waits for a launched step's samples and turns them into its outputs."""
        try:
            sampled = launched.samples.result() if launched.samples is not None else None
        except Exception as e:  # noqa: BLE001 - as in _launch: the device failed while running the step
            for seq in launched.sampled:  # tokens that will never come: a retry must not read them
                self._drop_pending(seq)
            return self._fail_step(launched.scheduled, e)
        self.failed_steps_in_a_row = 0
        outputs = []
        live = []
        for row, seq in enumerate(launched.sampled):
            index = seq.output_token_ids.index(PENDING, max(0, len(seq.output_token_ids) - 2))
            seq.output_token_ids[index] = sampled.token_ids[row]
            if self.requests.get(seq.request_id) is seq and seq.status is not Status.FINISHED:
                live.append((seq, sampled.logprobs[row]))
        # constrained requests are synchronous: the token just written is their newest
        advance([(seq.sampling.grammar, seq.output_token_ids[-1]) for seq, _ in live if seq.sampling.grammar])
        for seq, logprobs in live:
            grammar = seq.sampling.grammar
            if grammar is not None and grammar.error is not None:
                logger.error("request %s: its grammar (%s) refused a token: %s", seq.request_id, grammar.description,
                             grammar.error)
                # the client's grammar (too costly for the lexer at this token, say): the same request fails again
                outputs.append(self._fail(seq, f"{GRAMMAR_FAILED}: its grammar could not go on after output token "
                                               f"{len(seq.output_token_ids)}: {grammar.error}", status=400))
            else:
                outputs.append(self._postprocess(seq, logprobs))
        self.scheduler.after_step(launched.scheduled)
        if self.texts is not None:
            outputs = [self._stop_at_text(self.texts.process(out)) for out in outputs]
        return outputs

    def _drop_pending(self, seq: Sequence) -> None:
        if PENDING in seq.output_token_ids[-2:]:
            seq.output_token_ids.remove(PENDING)

    def _fail_step(self, scheduled: list[tuple[Sequence, int]], error: Exception) -> list[RequestOutput]:
        if isinstance(error, ExpertsUnavailableError):  # the step's requests fail; the engine and the others go on
            # the details (which worker, which address) go to the log; clients get no internals
            logger.warning("a step's experts failed: %s", error)
            message = "the MoE workers serving this request failed; retry"
        else:
            self.failed_steps_in_a_row += 1
            if self.failed_steps_in_a_row >= MAX_FAILED_STEPS_IN_A_ROW:
                raise error  # the device or the model is broken: the engine core dies and is replaced
            logger.error("a step of %d requests failed; failing them and going on", len(scheduled),
                         exc_info=error)
            message = "the engine failed while running this request; retry"
        return [self._fail(seq, message) for seq, _ in scheduled if self.requests.get(seq.request_id) is seq]

    def _postprocess(self, seq: Sequence, logprobs: TokenLogprobs | None) -> RequestOutput:
        """The sequence's new token; ends the request on a stop token or at its length (stop strings are
        TextStreams' to find)."""
        token, n = seq.output_token_ids[-1], len(seq.output_token_ids)
        if token == PENDING:  # the next step already sampled after it: this output is the one before
            token, n = seq.output_token_ids[-2], n - 1
        reason, stop_reason = None, None
        # the sampling state's stop ids are empty under ignore_eos
        if token in seq.sampling.stop_token_set and n >= seq.params.min_tokens:
            reason, stop_reason = "stop", token
        elif seq.sampling.grammar is not None and seq.sampling.grammar.finished:  # the answer is complete
            reason = "stop"
        elif len(seq.prompt_token_ids) + n >= seq.length_cap:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq)
            self._forget(seq.request_id)
        times = None
        if n == 1 or reason is not None:  # its first token or its last: once or twice a request
            times = self._reached(seq, first=n == 1, last=reason is not None)
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=[token], new_text=None, finished=reason is not None,
            finish_reason=reason, stop_reason=stop_reason, logprobs=[logprobs] if logprobs else [],
            num_prompt_tokens=len(seq.prompt_token_ids), num_output_tokens=n, num_cached_tokens=seq.num_cached_tokens,
            times=times)

    @staticmethod
    def _reached(seq: Sequence, *, first: bool, last: bool) -> RequestTimes:
        """Stamps the milestones its newest output token reached (now, when the token is on the host) and returns
        the request's times, which that output carries."""
        now, times = time.time(), seq.times
        seq.times = replace(times, first_token=now if first else times.first_token,
                            last_token=now if last else times.last_token)
        return seq.times

    def _stop_at_text(self, out: RequestOutput) -> RequestOutput:
        """A stop string found in the text ends the request here too."""
        seq = self._forget(out.request_id) if out.finished else None
        if seq is not None:  # it ended here, at this output's token (_postprocess stamped a first one already)
            self.scheduler.finish(seq)
            out = replace(out, times=self._reached(seq, first=False, last=True))
        return out

    def _fail(self, seq: Sequence, error: str, status: int = 503) -> RequestOutput:
        self.scheduler.finish(seq)
        self._forget(seq.request_id)
        if self.texts is not None:
            self.texts.remove(seq.request_id)
        return RequestOutput(request_id=seq.request_id, new_token_ids=[], new_text="", finished=True,
                             finish_reason="error", error=error, error_status=status,
                             num_prompt_tokens=len(seq.prompt_token_ids),
                             num_output_tokens=len(seq.output_token_ids),
                             times=seq.times)  # the milestones it reached (no last token: this step ended it)

    # ---- offline API ----------------------------------------------------------------------------------------------
    def generate(self, prompts: list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[CompletionOutput]:
        """Runs prompts (text, or token ids) to completion; outputs in the prompts' order."""
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        names = [f"generate-{next(self._generate_ids)}" for _ in prompts]
        for name, prompt, p in zip(names, ids, params):
            self.add_request(name, prompt, p)
        done: dict[str, CompletionOutput] = {
            name: CompletionOutput(name, prompt, [], "", "", [] if p.logprobs is not None else None)
            for name, prompt, p in zip(names, ids, params)}
        while any(name in self.requests for name in names):
            for out in self.step():
                result = done.get(out.request_id)
                if result is None:
                    continue
                result.token_ids += out.new_token_ids
                result.text += out.new_text or ""
                if result.logprobs is not None:
                    result.logprobs += out.logprobs
                if out.finished:
                    result.finish_reason = out.finish_reason
        while self.in_flight is not None:  # a step launched past a stop: its tokens are dropped
            self.step()
        return [done[name] for name in names]

    # ---- introspection (metrics, placement) ---------------------------------------------------------------------
    @property
    def kernel_compiles(self) -> int:
        """Triton kernel variants this process first needed after the engine's start-up (compiled, or loaded from
        Triton's disk cache; kernels/compile_watch.py); 0 off GPUs."""
        return self._compiles.count - self._compiles_at_start if self._compiles is not None else 0

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks

    def is_idle(self) -> bool:
        """No request left and every block back in the pool (cached prefix blocks count as free)."""
        return not self.requests and self.in_flight is None and self.blocks.num_free_blocks == self.num_blocks - 1


def _compile_watch(device: torch.device):
    """The process's Triton compile watch on a GPU (kernels/compile_watch.py), None elsewhere (no Triton there)."""
    if device.type != "cuda":
        return None
    from gptoss_serve.kernels.compile_watch import compile_watch  # Triton: only on a GPU

    return compile_watch()
