"""Constrained decoding in the engine: a grammar matcher per constrained request (llguidance), the token bitmasks of a
step's constrained rows, and the tokens they consume.

    grammars = GrammarCompiler(tokenizer)
    matcher = grammars.matcher(params.structured_output)    # add_request: ValueError for a grammar that won't compile
    masks = token_bitmasks([...matchers of the step's rows])  # before sampling: int32 [R, ceil(V / 32)], 1 = allowed
    advance([(matcher, token), ...])                          # after sampling

A compiled grammar is kept (by its text, the most recent GRAMMAR_CACHE_SIZE, and no more than GRAMMAR_CACHE_BYTES of
grammar text) and each request gets a copy of it, so a schema sent again skips the compile. Bitmasks of a step are filled in one call on llguidance's thread pool, and the
tokens consumed in one more; requests without a grammar cost nothing.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from llguidance import LLExecutor, LLMatcher

# llguidance's view of the vocabulary, built once per process; it lives with the grammars it serves (no torch there:
# the ingress compiles against it too, to refuse a schema the engine could not follow)
from gptoss_serve.cluster.constraints import ll_tokenizer
from gptoss_serve.cluster.sampling_params import StructuredOutput
from gptoss_serve.model.tokenizer import Tokenizer

__all__ = ["GRAMMAR_CACHE_BYTES", "GRAMMAR_CACHE_SIZE", "GrammarCompiler", "GrammarMatcher", "advance", "bitmask_width", "ll_tokenizer",
           "token_bitmasks"]

GRAMMAR_CACHE_SIZE = 256
# a compiled grammar holds ~130 times its text in memory (1.6 MB for a 12 KB schema): 256 large schemas held GBs
GRAMMAR_CACHE_BYTES = 2 << 20


class GrammarMatcher:
    """One request's place in its grammar."""

    def __init__(self, matcher: LLMatcher, executor: LLExecutor, description: str, vocab_size: int) -> None:
        self.matcher, self.executor, self.description = matcher, executor, description
        self.vocab_size = vocab_size  # of llguidance's tokenizer: its masks have one bit per token of it

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows no further token (but EOS)."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    @property
    def error(self) -> str | None:
        return (self.matcher.get_error() or "error") if self.matcher.is_error() else None


class GrammarCompiler:
    """Compiles the engine's grammars, keeps the recent ones, and hands each request a matcher of its own."""

    def __init__(self, tokenizer: Tokenizer, *, cache_size: int = GRAMMAR_CACHE_SIZE,
                 cache_bytes: int = GRAMMAR_CACHE_BYTES, num_threads: int | None = None) -> None:
        self.tokenizer, self.cache_size, self.cache_bytes = tokenizer, cache_size, cache_bytes
        self.executor = LLExecutor(num_threads)
        self._compiled: OrderedDict[str, LLMatcher] = OrderedDict()  # grammar text -> an untouched matcher
        self._cached_bytes = 0  # of the grammar texts kept

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        compiled = self._compiled.get(spec.grammar)
        if compiled is None:
            compiled = LLMatcher(ll_tokenizer(self.tokenizer), LLMatcher.grammar_from_lark(spec.grammar), log_level=0)
            if compiled.is_error():
                raise ValueError(f"structured output ({spec.description}): {compiled.get_error()}")
            self._compiled[spec.grammar] = compiled
            self._cached_bytes += len(spec.grammar)
            while self._compiled and (len(self._compiled) > self.cache_size or self._cached_bytes > self.cache_bytes):
                self._cached_bytes -= len(self._compiled.popitem(last=False)[0])
        else:
            self._compiled.move_to_end(spec.grammar)
        return GrammarMatcher(compiled.deep_copy(), self.executor, spec.description, self.tokenizer.vocab_size)


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def token_bitmasks(matchers: list[GrammarMatcher], *, pin: bool = False) -> torch.Tensor:
    """-> int32 [R, ceil(V / 32)] on the host, V the tokenizer's vocabulary: bit t % 32 of word t // 32 is set where
    token t is allowed next (a model's logits may be wider or narrower: see kernels/token_bitmask.py). One call fills
    every row, on llguidance's threads (it drops the GIL)."""
    width = bitmask_width(matchers[0].vocab_size) if matchers else 0
    masks = torch.empty(len(matchers), width, dtype=torch.int32, pin_memory=pin)  # [R, W]
    if matchers:
        matchers[0].executor.unsafe_compute_mask_ptr([(m.matcher, row) for row, m in enumerate(matchers)],
                                                     masks.data_ptr(), masks.shape[1] * 4, masks.shape[0])
    return masks


def advance(pairs: list[tuple[GrammarMatcher, int]]) -> None:
    """Each matcher consumes its sampled token (all in one call). A token the grammar refuses leaves its matcher in
    error (see GrammarMatcher.error); it cannot happen to a token drawn under the matcher's own bitmask."""
    if pairs:
        pairs[0][0].executor.consume_token_par([(m.matcher, token) for m, token in pairs])
