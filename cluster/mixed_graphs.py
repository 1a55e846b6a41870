"""Mixed steps (prompt chunks beside decodes) replayed from piecewise CUDA graphs, one set per token bucket.

A decode step replays one whole graph (decode_graphs.py), but a step with a prompt chunk cannot: its attention's
shape (how many rows each sequence has, how far each chunk reaches) changes every step. Everything else in the
layer only sees a step's tokens as rows, so for a bucket of T tokens each stretch between two attentions is captured
as a graph of its own, and a step replays them with its attention run eagerly in between:

    piece 0        embedding, rotary tables, layer 0 up to its attention (norm, QKV, rotation)
    attention 0    eager, on the step's N real rows: store keys and values, paged attention
    piece 1        layer 0's output projection, norm, MoE; layer 1 up to its attention
    ...
    piece L        the last layer's output projection, norm, MoE; the final norm

This is vLLM's piecewise mode, without a compiler: the model's forward runs once under capture per bucket, and the
attention backend below ends the capture of one piece and begins the next where the model calls it, handing back
a buffer that the eager attention fills at replay. A step of N tokens runs in the smallest bucket T >= N: rows N..T
are padding (token 0 at position 0), computed by the pieces and never attended to or read. Pieces and the eager
attentions between them run in order on one stream, so a tensor passed from one piece to the next (the residual
stream, the rotary tables, a layer's q, k and v) holds, at replay, what the piece before wrote.

Each bucket keeps its layers' q, k and v (where its pieces write them for the eager attention): T tokens x the
QKV width x the layers, ~0.25 MB a token on gpt-oss (~320 MB for every bucket up to 256 tokens), besides the decode
graphs' memory; the rest of a bucket's intermediates share one memory pool with the other buckets.

Worth it where a step's kernels are shorter than Python takes to launch them (a few hundred tokens at most): above
that the step is bound by the device and padding only adds work, so steps larger than the largest bucket, and
every step of an engine with `enforce_eager`, run eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gptoss_serve.cluster.step_inputs import StepInputs
from gptoss_serve.model.attention import Attention, AttentionBackend
from gptoss_serve.model.transformer import GptOssForCausalLM

# the step's real attention: its inputs -> the backend that stores keys and values and attends over the cache
Attend = Callable[[StepInputs], AttentionBackend]
BUCKET_STEPS = (8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024)


def token_buckets(max_tokens: int) -> list[int]:
    """Step sizes with a graph of their own, up to max_tokens (a padded step computes at most ~1.5x its tokens)."""
    return sorted({b for b in BUCKET_STEPS if b < max_tokens} | {max_tokens})


class _PieceBreaks:
    """The attention backend a bucket's forward runs with: at each attention it records the layer's q, k and v,
    ends the piece being captured and begins the next, and returns the buffer the eager attention fills at replay.
    Without capture (the warm-up before it), it only records and returns the buffer."""

    def __init__(self, out: torch.Tensor, pool, capture: bool) -> None:
        self.out, self.pool, self.capture = out, pool, capture
        self.pieces: list[torch.cuda.CUDAGraph] = []
        self.attentions: list[tuple[Attention, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if capture:
            self._begin()

    def _begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        # thread-local: other threads (NCCL's, the engine's watches) go on querying events meanwhile
        graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
        self.pieces.append(graph)

    def end(self) -> None:
        if self.capture:
            self.pieces[-1].capture_end()

    def __call__(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.attentions.append((layer, q, k, v))
        if self.capture:
            self.end()
            self._begin()
        return self.out[:q.shape[0]].view(q.shape)


class MixedStepGraphs:
    def __init__(self, model: GptOssForCausalLM, attend: Attend, *, max_tokens: int, device: torch.device) -> None:
        """Captures every bucket up to max_tokens (at start-up: every kernel they run must be compiled by now, or
        is compiled by the warm-up forward of each bucket here)."""
        self.model, self.attend = model, attend
        self.buckets = token_buckets(max_tokens)
        config = model.config
        largest = self.buckets[-1]
        self.token_ids = torch.zeros(largest, dtype=torch.int32, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int32, device=device)
        # what each layer's attention hands back: the eager attention's output, rows 0..N of it
        self.out = torch.zeros(largest, config.num_attention_heads * config.head_dim, dtype=model.dtype,
                               device=device)
        self.steps: dict[int, _PieceBreaks] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # each bucket's final-normed hidden states [T, H]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        for bucket in reversed(self.buckets):  # the largest first: later ones fit in the memory it leaves
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                self._forward(bucket, _PieceBreaks(self.out, pool, capture=False))  # compile, allocate
                torch.cuda.synchronize(device)  # the warm-up's memory back in the cache before the capture
                breaks = _PieceBreaks(self.out, pool, capture=True)
                try:
                    self.hidden[bucket] = self._forward(bucket, breaks)
                finally:  # a failed capture must still end, or the stream stays in capture mode
                    breaks.end()
            torch.cuda.current_stream(device).wait_stream(stream)
            if len(breaks.pieces) != config.num_hidden_layers + 1:
                raise RuntimeError(f"a bucket's forward captured {len(breaks.pieces)} pieces for "
                                   f"{config.num_hidden_layers} attention layers")
            self.steps[bucket] = breaks
        torch.cuda.synchronize(device)

    def _forward(self, bucket: int, breaks: _PieceBreaks) -> torch.Tensor:
        return self.model.model(self.token_ids[:bucket], self.positions[:bucket], breaks)

    def bucket(self, num_tokens: int) -> int | None:
        """The bucket a step of num_tokens tokens replays, or None when it is larger than every bucket."""
        return next((b for b in self.buckets if b >= num_tokens), None)

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """The step's forward pass -> final-normed hidden states [N, H] of its real rows."""
        n = inputs.num_tokens
        bucket = self.bucket(n)
        self.token_ids[:n].copy_(inputs.token_ids)
        self.positions[:n].copy_(inputs.positions)
        self.token_ids[n:bucket].zero_()  # padding rows: token 0 at position 0
        self.positions[n:bucket].zero_()
        step, attend = self.steps[bucket], self.attend(inputs)
        for piece, (layer, q, k, v) in zip(step.pieces, step.attentions):
            piece.replay()
            self.out[:n].copy_(attend(layer, q[:n], k[:n], v[:n]).flatten(-2))
        step.pieces[-1].replay()
        return self.hidden[bucket][:n]
