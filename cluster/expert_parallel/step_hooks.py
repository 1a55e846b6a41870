"""What the engine's ModelRunner does for its experts at fixed points of a step, whichever process they live in.

ModelRunner calls an `ExpertStepHooks` before a step (`begin_step`, or `begin_replayed_step` for one replayed from
a CUDA graph), after queueing it (`watch_step`), when it fails (`reset`), on its samples (`wrap`), and for the
decode graphs to replay (`graphs`). `ExpertParallelStep` drives the link to the MoE workers through them;
`ColocatedExpertStep` does nothing: experts in this process need no announcing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from gptoss_serve.cluster.decode_graphs import DecodeGraphs, Forward
from gptoss_serve.cluster.expert_parallel.exchange import ExpertClient, capturing, wait_for_event
from gptoss_serve.cluster.sampler import PendingSample, SamplerOutput
from gptoss_serve.cluster.step_inputs import StepInputs
from gptoss_serve.model.experts import ExpertsUnavailableError

if TYPE_CHECKING:
    from gptoss_serve.cluster.expert_parallel.remote_experts import ExpertLink  # imports ray: only for its name

# a step's forward pass -> the decode graphs captured over it
CaptureGraphs = Callable[[Forward], DecodeGraphs]


class ExpertStepHooks(Protocol):
    def begin_step(self, token_counts: list[int]) -> None:
        """Before an eager step: its micro-batches' token counts."""

    def begin_replayed_step(self, tokens: int, layers: int) -> None:
        """Before replaying a decode graph of `tokens` rows (padded) through `layers` MoE layers."""

    def watch_step(self) -> None:
        """After the step's forward pass is queued."""

    def reset(self) -> None:
        """After the step's forward pass failed."""

    def wrap(self, samples: PendingSample) -> StepSamples:
        """The step's samples, as the engine will wait for them."""

    def graphs(self, forward: Forward, capture: CaptureGraphs) -> DecodeGraphs | None:
        """The decode graphs over the experts as they are now, captured (by `capture`, over `forward`) if need be;
        None when these experts' decode steps run eagerly."""


class ColocatedExpertStep:
    """Experts in this process: nothing to announce, watch or reset (their graphs, if any, ModelRunner captures at
    start-up)."""

    def begin_step(self, token_counts: list[int]) -> None:
        pass

    def begin_replayed_step(self, tokens: int, layers: int) -> None:
        pass

    def watch_step(self) -> None:
        pass

    def reset(self) -> None:
        pass

    def wrap(self, samples: PendingSample) -> StepSamples:
        return samples

    def graphs(self, forward: Forward, capture: CaptureGraphs) -> DecodeGraphs | None:
        return None


class RemoteStepSamples:
    """A step's samples when its experts are on MoE workers: the host waits for them at most the expert timeout
    (a hung worker would otherwise block the wait forever); past it the link is aborted and the step fails."""

    def __init__(self, samples: PendingSample, link: ExpertLink) -> None:
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


# what ModelRunner.launch hands the engine: a step's samples, read through `tokens` and `result()`
StepSamples = PendingSample | RemoteStepSamples


class ExpertParallelStep:
    """Experts on MoE workers, over an ExpertLink: each step is announced to the workers (its header) and watched
    (a link whose step does not complete within the expert timeout is aborted), a failed step resets the link (the
    next one reconnects), and the samples are checked against the link they ran over."""

    def __init__(self, link: ExpertLink, *, decode_graphs: bool) -> None:
        """decode_graphs: whether decode steps replay CUDA graphs. Over NCCL the exchange's sends and receives are
        captured with the rest of a decode step; the graphs hold the link's communicators, so they are captured once
        a link is up, and again after a reconnect (see `graphs`)."""
        self.link = link
        self.decode_graphs = decode_graphs
        self._graphs: DecodeGraphs | None = None
        self._graphs_client: ExpertClient | None = None  # the ExpertClient the graphs were captured over

    def begin_step(self, token_counts: list[int]) -> None:
        self.link.begin_step(token_counts)

    def begin_replayed_step(self, tokens: int, layers: int) -> None:
        """Announces the step, and counts the host-side stats its replayed dispatches cannot count themselves."""
        client = self._graphs_client
        self.link.begin_step([tokens])
        client.record_replayed_step(tokens, layers)

    def watch_step(self) -> None:
        self.link.watch_step()

    def reset(self) -> None:
        # the workers may be mid-step: the link is out of step with them
        self.link.reset()

    def wrap(self, samples: PendingSample) -> StepSamples:
        return RemoteStepSamples(samples, self.link)

    def graphs(self, forward: Forward, capture: CaptureGraphs) -> DecodeGraphs | None:
        """The decode graphs over the current link to the MoE workers, captured now if the link is new (at the
        first decode step, and after a reconnect: the old graphs held the old link's communicators)."""
        if not self.decode_graphs:
            return None
        client = self.link.get()
        if client is not self._graphs_client:
            self._graphs, self._graphs_client = None, None

            def announced(inputs: StepInputs) -> torch.Tensor:
                if capturing():
                    return forward(inputs)
                # a warm-up pass before the capture exchanges for real: announced, and watched as a step is
                self.link.begin_step([inputs.num_tokens])
                logits = forward(inputs)
                self.link.watch_step()
                return logits

            self._graphs = capture(announced)
            self._graphs_client = client
        return self._graphs


def expert_step_hooks(experts: object, *, device: torch.device, enforce_eager: bool) -> ExpertStepHooks:
    """The hooks for a model whose MoE layers hold `experts` (the first layer's): remote experts carry the link to
    their workers (RemoteExperts.link)."""
    link = getattr(experts, "link", None)
    if link is None:
        return ColocatedExpertStep()
    return ExpertParallelStep(link, decode_graphs=link.backend == "nccl" and device.type == "cuda" and not enforce_eager)
