"""What one load-test run does: the target, the load shape, the workload and the latency targets."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

Endpoint = Literal["chat", "completions", "responses"]
LengthDist = Literal["fixed", "uniform", "sharegpt"]
WorkloadKind = Literal["random", "conversation"]

ENDPOINTS: tuple[Endpoint, ...] = ("chat", "completions", "responses")
LENGTH_DISTS: tuple[LengthDist, ...] = ("fixed", "uniform", "sharegpt")
WORKLOADS: tuple[WorkloadKind, ...] = ("random", "conversation")
GOODPUT_KEYS = ("ttft", "tpot", "e2el")

# vLLM's random dataset defaults, so a run with no length options is comparable with `vllm bench serve`.
DEFAULT_INPUT_LEN = 1024
DEFAULT_OUTPUT_LEN = 128
# Means of ShareGPT conversations as vLLM's benchmarks sample them (first human turn, first reply).
SHAREGPT_INPUT_LEN = 216
SHAREGPT_OUTPUT_LEN = 200


class ConfigError(ValueError):
    """The options contradict each other or are out of range (the message says which)."""


@dataclass(frozen=True, kw_only=True)
class LoadConfig:
    url: str
    endpoint: Endpoint = "chat"
    model: str | None = None  # None: the first id GET /v1/models lists
    # Load shape: a fixed number of requests in flight, or timed arrivals (optionally capped by concurrency).
    concurrency: int | None = None
    request_rate: float | None = None  # requests/s; None or inf with a concurrency means "closed loop"
    burstiness: float = 1.0  # gamma shape of the inter-arrival gaps: 1 is Poisson, < 1 burstier
    # Bounds: whichever comes first; at least one must be given so that a run always ends.
    num_requests: int | None = None
    duration: float | None = None  # seconds during which new requests are sent
    grace_period: float = 30.0  # after `duration`, how long requests in flight may finish before they are cancelled
    timeout: float = 300.0  # hard limit on one request, from send to the last byte
    # Workload: independent random prompts, or users holding long conversations (conversation.py).
    workload: WorkloadKind = "random"
    system_prompt_len: int = 16384  # conversation: tokens of the system prompt every conversation starts with
    turns: int = 8  # conversation: a user's turns before it starts a new conversation
    system_prompts: int = 1  # conversation: distinct system prompts; user u holds prompt u % system_prompts
    think_time: float = 0.0  # conversation: seconds a user waits between an answer and its next turn
    input_len: int | None = None  # None: the length distribution's default (conversation: each new user message)
    output_len: int | None = None
    length_dist: LengthDist = "fixed"
    range_ratio: float = 0.5  # uniform draws lie in [len*(1-r), len*(1+r)]
    temperature: float = 0.0
    ignore_eos: bool = True  # ask for exactly output_len tokens (vLLM's extra fields, which our server accepts)
    seed: int = 0
    extra_body: Mapping[str, Any] = field(default_factory=dict)  # merged into every request body
    # Goodput: a request counts when it meets every target (milliseconds), as vLLM's --goodput.
    goodput: Mapping[str, float] = field(default_factory=dict)
    allow_hosts: tuple[str, ...] = ()  # non-loopback hosts the user named explicitly
    api_key: str | None = None
    label: str | None = None  # names this run's curve in plots
    # the app's Prometheus endpoint (server_metrics.py), scraped before the run and, metrics_settle seconds after its
    # end (Ray's exporters report every 10 s), again: prefix-cache hit rate and routing decisions of the run
    metrics_url: str | None = None
    metrics_settle: float = 12.0

    @property
    def mean_input_len(self) -> int:
        if self.input_len is not None:
            return self.input_len
        return SHAREGPT_INPUT_LEN if self.length_dist == "sharegpt" else DEFAULT_INPUT_LEN

    @property
    def mean_output_len(self) -> int:
        if self.output_len is not None:
            return self.output_len
        return SHAREGPT_OUTPUT_LEN if self.length_dist == "sharegpt" else DEFAULT_OUTPUT_LEN

    @property
    def effective_rate(self) -> float:
        """Arrival rate in requests/s; inf when requests go out as soon as a slot is free."""
        return math.inf if self.request_rate is None else self.request_rate

    def replace(self, **changes: Any) -> LoadConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        if self.endpoint not in ENDPOINTS:
            _fail(f"endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")
        if self.length_dist not in LENGTH_DISTS:
            _fail(f"length_dist must be one of {LENGTH_DISTS}, got {self.length_dist!r}")
        if self.workload not in WORKLOADS:
            _fail(f"workload must be one of {WORKLOADS}, got {self.workload!r}")
        if self.workload == "conversation":
            self._validate_conversation()
        elif self.endpoint == "responses":
            _fail("the responses endpoint is for the conversation workload (--workload conversation)")
        if self.concurrency is None and self.request_rate is None:
            _fail("give a concurrency or a request rate")
        if self.concurrency is not None and self.concurrency < 1:
            _fail(f"concurrency must be >= 1, got {self.concurrency}")
        if self.request_rate is not None and not self.request_rate > 0:
            _fail(f"request rate must be > 0, got {self.request_rate}")
        if math.isinf(self.effective_rate) and self.concurrency is None:
            _fail("an infinite request rate needs a concurrency cap")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            _fail(f"burstiness must be a positive number, got {self.burstiness}")
        if self.num_requests is None and self.duration is None:
            _fail("give a number of requests or a duration (or both), so that the run ends by itself")
        if self.num_requests is not None and self.num_requests < 1:
            _fail(f"num_requests must be >= 1, got {self.num_requests}")
        for name in ("duration", "timeout"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                _fail(f"{name} must be a positive number of seconds, got {value}")
        if not (self.grace_period >= 0 and math.isfinite(self.grace_period)):
            _fail(f"grace_period must be >= 0 seconds, got {self.grace_period}")
        if not (self.metrics_settle >= 0 and math.isfinite(self.metrics_settle)):
            _fail(f"metrics_settle must be >= 0 seconds, got {self.metrics_settle}")
        if not 0 <= self.range_ratio < 1:
            _fail(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        for name, value in (("input_len", self.mean_input_len), ("output_len", self.mean_output_len)):
            if value < 1:
                _fail(f"{name} must be >= 1, got {value}")
            if self.length_dist == "sharegpt" and value < 8:
                _fail(f"sharegpt lengths need a mean of at least 8 tokens, got {name}={value}")
        if self.temperature < 0:
            _fail(f"temperature must be >= 0, got {self.temperature}")
        for key, target in self.goodput.items():
            if key not in GOODPUT_KEYS:
                _fail(f"goodput target {key!r} unknown; use {', '.join(GOODPUT_KEYS)}")
            if not target > 0:
                _fail(f"goodput target {key} must be > 0 ms, got {target}")


    def _validate_conversation(self) -> None:
        if self.endpoint == "responses" and self.ignore_eos:
            _fail("the responses endpoint takes no ignore_eos/min_tokens: add --no-ignore-eos")
        if self.concurrency is None or self.request_rate is not None:
            _fail("the conversation workload is closed-loop: give a concurrency (the users), not a request rate")
        if self.system_prompt_len < 0:
            _fail(f"system_prompt_len must be >= 0, got {self.system_prompt_len}")
        if self.turns < 1:
            _fail(f"turns must be >= 1, got {self.turns}")
        if self.system_prompts < 1:
            _fail(f"system_prompts must be >= 1, got {self.system_prompts}")
        if self.system_prompts > 1 and self.system_prompt_len == 0:
            _fail("system_prompts > 1 needs system_prompt_len > 0 (prompts of no token are all the same)")
        if not (self.think_time >= 0 and math.isfinite(self.think_time)):
            _fail(f"think_time must be >= 0 seconds, got {self.think_time}")


def parse_goodput(items: list[str]) -> dict[str, float]:
    """vLLM's syntax: ["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    targets: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition(":")
        key = key.strip().lower()
        if not sep or key not in GOODPUT_KEYS:
            _fail(f"goodput target {item!r} is not KEY:MS with KEY one of {', '.join(GOODPUT_KEYS)}")
        try:
            targets[key] = float(value)
        except ValueError:
            _fail(f"goodput target {item!r}: {value!r} is not a number of milliseconds")
    return targets


def _fail(message: str) -> NoReturn:
    raise ConfigError(message)
