"""The inference engine of one attention replica: continuous batching over a paged KV cache.

    engine.add_request(request_id, prompt_token_ids, sampling_params)
    while engine.has_unfinished_requests:
        for out in engine.step(): ...     # schedule -> run -> postprocess

Requests join at any step and leave when they finish; `abort` frees a request's blocks at once.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import torch

from gptoss_serve.cluster.block_manager import BlockManager
from gptoss_serve.cluster.detokenizer import TextStreams
from gptoss_serve.cluster.engine_config import EngineConfig, resolve_max_model_len, resolve_num_blocks
from gptoss_serve.cluster.kv_cache import KVCache, bytes_per_block
from gptoss_serve.cluster.model_runner import ModelRunner
from gptoss_serve.cluster.sampler import TokenLogprobs
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.cluster.scheduler import Scheduler
from gptoss_serve.cluster.sequence import Sequence
from gptoss_serve.model.experts import ExpertsUnavailableError
from gptoss_serve.model.tokenizer import Tokenizer
from gptoss_serve.model.transformer import GptOssForCausalLM


@dataclass
class RequestOutput:
    """What one step produced for one request (a delta), plus the request's totals so far."""

    request_id: str
    new_token_ids: list[int]
    new_text: str | None  # None: not decoded yet (an engine core leaves it to its client, see TextStreams)
    finished: bool
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None  # set when the request failed in a step (finish_reason "error")


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
class _Request:
    """What the engine's postprocess needs beyond the sequence: the output cap."""

    seq: Sequence
    max_tokens: int


class LLMEngine:
    def __init__(self, model: GptOssForCausalLM, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(), *,
                 micro_batches: int = 1, detokenize: bool = True) -> None:
        """detokenize=False leaves text and stop strings to the caller (new_text None): an engine core's client
        decodes beside it, off the step's critical path."""
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.texts = TextStreams(tokenizer) if detokenize else None
        self.num_blocks = resolve_num_blocks(config, model.config, dtype=model.dtype, device=model.device)
        self.max_model_len = resolve_max_model_len(config, model.config, self.num_blocks)
        self.blocks = BlockManager(num_blocks=self.num_blocks, block_size=config.block_size,
                                   sliding_window=model.config.sliding_window,
                                   enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens)
        self.runner = ModelRunner(model, KVCache(model.config, num_blocks=self.num_blocks,
                                                 block_size=config.block_size, dtype=model.dtype, device=model.device),
                                  micro_batches=micro_batches, max_num_batched_tokens=config.max_num_batched_tokens,
                                  max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len,
                                  enforce_eager=config.enforce_eager)
        # what the model's tensors and the cache take on the device (start-up logs, the core's ready stats)
        self.weights_bytes = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(),
                                                                                        model.buffers()))
        self.kv_cache_bytes = self.num_blocks * bytes_per_block(model.config, config.block_size, model.dtype)
        self.requests: dict[str, _Request] = {}
        self.failed_steps_in_a_row = 0
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
        seq = Sequence(request_id, prompt, sampling_params, tuple(self.tokenizer.stop_token_ids))
        self.requests[request_id] = _Request(seq, max_tokens)
        if self.texts is not None:
            self.texts.add(request_id, sampling_params)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stops a request and frees its blocks; unknown or finished ids are ignored. True if it was running."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.finish(request.seq)
        if self.texts is not None:
            self.texts.remove(request_id)
        return True

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step -------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        try:
            sampled = self.runner.run(scheduled)
        except ExpertsUnavailableError as e:  # the step's requests fail; the engine and the others go on
            # the details (which worker, which address) go to the log; clients get no internals
            logger.warning("a step's experts failed: %s", e)
            return [self._fail(seq, "the MoE workers serving this request failed; retry") for seq, _ in scheduled]
        except Exception:  # noqa: BLE001 - one bad step fails its requests; a broken engine fails every step
            self.failed_steps_in_a_row += 1
            if self.failed_steps_in_a_row >= MAX_FAILED_STEPS_IN_A_ROW:
                raise  # the device or the model is broken: the engine core dies and is replaced
            logger.exception("a step of %d requests failed; failing them and going on", len(scheduled))
            return [self._fail(seq, "the engine failed while running this request; retry") for seq, _ in scheduled]
        self.failed_steps_in_a_row = 0
        seqs = self.scheduler.postprocess(scheduled, sampled.token_ids)
        outputs = [self._postprocess(seq, logprobs) for seq, logprobs in zip(seqs, sampled.logprobs)]
        if self.texts is not None:
            outputs = [self._stop_at_text(self.texts.process(out)) for out in outputs]
        return outputs

    def _postprocess(self, seq: Sequence, logprobs: TokenLogprobs | None) -> RequestOutput:
        """The sequence's new token; ends the request on a stop token or at its length (stop strings are
        TextStreams' to find)."""
        request = self.requests[seq.request_id]
        token, n = seq.output_token_ids[-1], len(seq.output_token_ids)
        reason, stop_reason = None, None
        # the sampling state's stop ids are empty under ignore_eos
        if token in seq.sampling.stop_token_ids and n >= seq.params.min_tokens:
            reason, stop_reason = "stop", token
        elif n >= request.max_tokens or len(seq) >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq)
            del self.requests[seq.request_id]
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=[token], new_text=None, finished=reason is not None,
            finish_reason=reason, stop_reason=stop_reason, logprobs=[logprobs] if logprobs else [],
            num_prompt_tokens=len(seq.prompt_token_ids), num_output_tokens=n, num_cached_tokens=seq.num_cached_tokens)

    def _stop_at_text(self, out: RequestOutput) -> RequestOutput:
        """A stop string found in the text ends the request here too."""
        request = self.requests.pop(out.request_id, None) if out.finished else None
        if request is not None:
            self.scheduler.finish(request.seq)
        return out

    def _fail(self, seq: Sequence, error: str) -> RequestOutput:
        self.scheduler.finish(seq)
        self.requests.pop(seq.request_id, None)
        if self.texts is not None:
            self.texts.remove(seq.request_id)
        return RequestOutput(request_id=seq.request_id, new_token_ids=[], new_text="", finished=True,
                             finish_reason="error", error=error, num_prompt_tokens=len(seq.prompt_token_ids),
                             num_output_tokens=len(seq.output_token_ids))

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
        return [done[name] for name in names]

    # ---- introspection (metrics, placement) ---------------------------------------------------------------------
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
        return not self.requests and self.blocks.num_free_blocks == self.num_blocks - 1
