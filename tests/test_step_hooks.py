"""What ModelRunner does for experts on MoE workers (cluster/expert_parallel/step_hooks.py), against a scripted link
on the CPU: decode graphs captured once a link is up and again after a reconnect, their warm-up passes announced and
watched as steps are, replayed steps announced and counted, samples checked against the link they ran over; and
ModelRunner calling the hooks at their points of a real engine step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_config import EngineConfig
from gptoss_serve.cluster.expert_parallel import step_hooks
from gptoss_serve.cluster.expert_parallel.step_hooks import (ColocatedExpertStep, ExpertParallelStep,
                                                             RemoteStepSamples, expert_step_hooks)
from gptoss_serve.cluster.sampler import SamplerOutput
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.model.experts import ExpertsUnavailableError
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer


class ScriptedClient:
    def __init__(self) -> None:
        self.replayed: list[tuple[int, int]] = []
        self.failure: str | None = None  # what the step watch would have said

    def record_replayed_step(self, tokens: int, layers: int) -> None:
        self.replayed.append((tokens, layers))

    def check(self) -> None:
        if self.failure is not None:
            raise ExpertsUnavailableError(self.failure)


class ScriptedLink:
    """ExpertLink's surface, logging each call in `calls`."""

    backend, timeout_s = "nccl", 1.0

    def __init__(self) -> None:
        self.client: ScriptedClient | None = None
        self.calls: list = []

    def get(self) -> ScriptedClient:
        if self.client is None:
            self.client = ScriptedClient()
            self.calls.append("connect")
        return self.client

    def begin_step(self, token_counts: list[int]) -> None:
        self.get()
        self.calls.append(("begin", token_counts))

    def watch_step(self) -> None:
        self.calls.append("watch")

    def reset(self) -> None:
        self.calls.append("reset")
        self.client = None


class ScriptedCapture:
    """DecodeGraphs' part in it: one warm-up pass of the forward outside the capture, then the captured one."""

    def __init__(self, monkeypatch) -> None:
        self.monkeypatch, self.captures = monkeypatch, 0

    def __call__(self, forward):
        self.captures += 1
        inputs = SimpleNamespace(num_tokens=4)
        forward(inputs)
        with self.monkeypatch.context() as m:
            m.setattr(step_hooks, "capturing", lambda: True)
            forward(inputs)
        return SimpleNamespace(capture=self.captures)


def forward_logging(link: ScriptedLink):
    def forward(inputs) -> torch.Tensor:
        link.calls.append(("forward", inputs.num_tokens))
        return torch.zeros(inputs.num_tokens, 8)

    return forward


def test_decode_graphs_are_captured_once_a_link_is_up_and_again_after_a_reconnect(monkeypatch):
    link, capture = ScriptedLink(), ScriptedCapture(monkeypatch)
    hooks = ExpertParallelStep(link, decode_graphs=True)
    first = hooks.graphs(forward_logging(link), capture)
    assert hooks.graphs(forward_logging(link), capture) is first and capture.captures == 1
    link.reset()  # a failed step: the next one reconnects, and the old graphs held the old link's communicators
    second = hooks.graphs(forward_logging(link), capture)
    assert second is not first and capture.captures == 2
    assert link.calls.count("connect") == 2


def test_a_warm_up_pass_before_the_capture_is_announced_and_watched_as_a_step(monkeypatch):
    link = ScriptedLink()
    ExpertParallelStep(link, decode_graphs=True).graphs(forward_logging(link), ScriptedCapture(monkeypatch))
    # the warm-up exchanges for real; the captured pass queues nothing until it is replayed
    assert link.calls == ["connect", ("begin", [4]), ("forward", 4), "watch", ("forward", 4)]


def test_a_replayed_step_is_announced_and_counted_on_the_link_its_graphs_hold(monkeypatch):
    link = ScriptedLink()
    hooks = ExpertParallelStep(link, decode_graphs=True)
    hooks.graphs(forward_logging(link), ScriptedCapture(monkeypatch))
    link.calls.clear()
    hooks.begin_replayed_step(8, 24)
    assert link.calls == [("begin", [8])] and link.client.replayed == [(8, 24)]


def test_without_decode_graphs_no_graphs_and_no_link_is_set_up(monkeypatch):
    link = ScriptedLink()
    assert ExpertParallelStep(link, decode_graphs=False).graphs(forward_logging(link), ScriptedCapture(monkeypatch)) \
        is None
    assert link.calls == []


class DoneSamples:
    event, tokens = None, torch.zeros(1, dtype=torch.int64)

    def result(self) -> SamplerOutput:
        return SamplerOutput(token_ids=[7], logprobs=[None])


def test_samples_are_checked_against_the_link_they_ran_over():
    link = ScriptedLink()
    link.get()
    good = ExpertParallelStep(link, decode_graphs=False).wrap(DoneSamples())
    assert isinstance(good, RemoteStepSamples) and good.result().token_ids == [7]
    # the link the step ran over was aborted by its watch: the step's samples are garbage, and the link is reset
    stale = ExpertParallelStep(link, decode_graphs=False).wrap(DoneSamples())
    link.client.failure = "a MoE worker did not answer within 1 s"
    with pytest.raises(ExpertsUnavailableError, match="did not answer"):
        stale.result()
    assert link.calls[-1] == "reset"
    # a step over an old link fails the same, and leaves the newer link alone
    old_client = link.get()
    old = ExpertParallelStep(link, decode_graphs=False).wrap(DoneSamples())
    link.reset()
    newer = link.get()
    old_client.failure = "aborted"
    with pytest.raises(ExpertsUnavailableError):
        old.result()
    assert link.client is newer


def test_the_hooks_follow_where_the_experts_are():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert isinstance(expert_step_hooks(object(), device=gpu, enforce_eager=False), ColocatedExpertStep)
    remote = SimpleNamespace(link=ScriptedLink())
    assert expert_step_hooks(remote, device=gpu, enforce_eager=False).decode_graphs  # NCCL on a GPU: captured
    assert not expert_step_hooks(remote, device=gpu, enforce_eager=True).decode_graphs
    assert not expert_step_hooks(remote, device=cpu, enforce_eager=False).decode_graphs
    remote.link.backend = "gloo"  # waits on the host: nothing a graph can capture
    assert not expert_step_hooks(remote, device=gpu, enforce_eager=False).decode_graphs


class NoExperts:
    """Remote-like experts whose workers answer zeros (or fail, when told to); no weights are read for them."""

    def __init__(self, link: ScriptedLink) -> None:
        self.link, self.fail = link, False

    def __call__(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise ExpertsUnavailableError("MoE worker 0 did not answer")
        return torch.zeros_like(hidden)

    def dispatch(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self(hidden, expert_ids, weights)

    def combine(self, pending: torch.Tensor) -> torch.Tensor:
        return pending


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_model_runner_calls_the_hooks_at_each_step(tiny_bf16, micro_batches):
    link = ScriptedLink()
    experts = NoExperts(link)
    model = load_model(tiny_bf16, dtype=torch.float32, experts_factory=lambda layer: experts)
    engine = LLMEngine(model, load_tokenizer(), EngineConfig(num_kv_blocks=64, max_model_len=256,
                                                             async_scheduling=False), micro_batches=micro_batches)
    runner = engine.runner
    assert isinstance(runner.expert_hooks, ExpertParallelStep) and runner.graphs is None
    engine.add_request("a", list(range(5, 14)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    engine.add_request("b", list(range(20, 27)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    engine.step()  # both prompts
    engine.step()  # one decode token each
    prefill = [9, 7] if micro_batches == 2 else [16]
    decode = [1, 1] if micro_batches == 2 else [2]
    assert link.calls == ["connect", ("begin", prefill), "watch", ("begin", decode), "watch"]
    assert engine.is_idle()
    link.calls.clear()
    experts.fail = True
    engine.add_request("c", list(range(30, 36)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    [failed] = engine.step()
    assert failed.finish_reason == "error"
    assert link.calls == [("begin", [6]), "reset"]  # the workers may be mid-step: the link starts afresh
