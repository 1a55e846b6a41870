"""What crosses a process boundary around the engine: plain, picklable dataclasses, and no torch import.

    ingress ──EngineRequest──> router ──> attention replica ──AddRequests / AbortRequests──> engine core
            <──StreamItem lists──     <──                <──CoreReady / StepDone / Rejected / CoreDied──

The engine core (engine_core.py) takes commands from its client (engine_core_client.py) and answers with one
`StepDone` a step for the whole batch; the Serve hops above it carry `StreamItem`s, one list a step a call; replicas
and routers report their `RoutingLoad` to Serve's request router (most_room_router.py). The CPU-only ingress imports
this module, so nothing here may pull in torch or the model.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from gptoss_serve.cluster.sampling_params import SamplingParams

# the first word of the error of a request whose own grammar failed in a step (a 400: the same request fails again)
GRAMMAR_FAILED = "structured_output"


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0  # time.time() when the ingress received it: latencies count from here


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float  # of the sampled token, under the raw model distribution
    rank: int  # 1 + how many tokens the model found strictly likelier
    top: list[tuple[int, float]]  # the params.logprobs likeliest (token id, logprob), likeliest first


@dataclass(frozen=True)
class RequestTimes:
    """When a request reached each milestone, stamped by the engine core as it happened (time.time() there, the
    clock of EngineStats.time; 0.0: not reached). vLLM's request phases come from them: queue (arrival -> first
    scheduled), prefill (-> first token) and decode (-> last token). A preempted request keeps its first scheduling,
    as in vLLM: its wait to run again counts in its prefill or decode time."""

    arrival: float  # the engine took the request
    scheduled: float = 0.0  # first scheduled
    first_token: float = 0.0  # its first output token reached the host
    # its last output token did, when the engine ended it (stop token, length, a stop string it found itself); a
    # request ended beside the core (a stop string the replica found) ended in the step of its output: that step's
    # EngineStats.time
    last_token: float = 0.0

    @property
    def queue_time(self) -> float:
        return self.scheduled - self.arrival

    @property
    def prefill_time(self) -> float:
        return self.first_token - self.scheduled

    def decode_time(self, last_token: float) -> float:
        return last_token - self.first_token


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
    error_status: int = 503  # 400 when the request itself is to blame (its grammar), else 503: the engine failed
    # the request's milestones so far, on the output that carries its first token and on the one the engine ended it
    # with (so once or twice a request); None on the others
    times: RequestTimes | None = None


@dataclass(frozen=True)
class EngineStats:
    """An engine's state after a step (its counters are running totals since the core started)."""

    running: int = 0
    waiting: int = 0
    free_blocks: int = 0
    num_blocks: int = 1
    kv_usage: float = 0.0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, tokens found there
    max_model_len: int = 0
    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    kv_cache_dtype: str = ""  # what the cache stores: "bfloat16", "float8_e4m3fn", ...
    block_size: int = 16
    num_preemptions: int = 0  # sequences preempted (their blocks freed, to be recomputed) since the core started
    kernel_compiles: int = 0  # Triton kernel variants first needed after the engine's start-up (LLMEngine's)
    step_tokens: int = 0  # tokens (prefill and decode) the step computes; 0 in stats sent without a step
    time: float = 0.0  # time.time() when taken
    extra: object | None = None  # the expert exchange's stats, about once a second (ExpertMetrics.record reads them)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting


# ---- the engine core's commands (client -> core), all of one event-loop turn in one message ---------------------
@dataclass(frozen=True)
class AddRequests:
    requests: list[EngineRequest]


@dataclass(frozen=True)
class AbortRequests:
    request_ids: list[str]


@dataclass(frozen=True)
class Shutdown:
    pass


EngineCommand = AddRequests | AbortRequests | Shutdown


# ---- the engine core's messages (core -> client) ----------------------------------------------------------------
@dataclass(frozen=True)
class CoreReady:
    stats: EngineStats


@dataclass(frozen=True)
class StepDone:
    """One step of the whole batch (or, with no outputs, the idle state right after aborts emptied the engine)."""

    outputs: list[RequestOutput]
    stats: EngineStats


@dataclass(frozen=True)
class Rejected:
    """Requests the engine refused (the client's mistake: a 400 each): (request id, why)."""

    requests: list[tuple[str, str]]


@dataclass(frozen=True)
class CoreDied:
    message: str


CoreMessage = CoreReady | StepDone | Rejected | CoreDied


# ---- the Serve hops ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamItem:
    """One step's output for one request, or the error that ended it."""

    request_id: str
    output: RequestOutput | None = None
    error: str | None = None
    status: int = 200  # for errors: 400 bad request, 429 full, 503 unavailable, 500 internal

    @property
    def is_last(self) -> bool:
        return self.error is not None or (self.output is not None and self.output.finished)


@dataclass(frozen=True)
class RoutingLoad:
    """How loaded a replica of a hop is, as Serve's request router reads it (MostRoomRouter): the fraction of its KV
    cache free, and the requests it holds. Serve carries routing stats as a dict: `as_stats` / `from_stats`."""

    queued: int  # requests held: running and waiting in an engine, or in flight through a router
    free_blocks: int = 1
    num_blocks: int = 1
    time: float = field(default_factory=time.time)  # when measured: requests sent after it are not counted in it

    @property
    def free_fraction(self) -> float:
        return self.free_blocks / max(1, self.num_blocks)

    def as_stats(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_stats(cls, stats: dict | None) -> RoutingLoad:
        """A replica's last report; an empty one (none yet) reads as idle with room."""
        stats = stats or {}
        return cls(queued=int(stats.get("queued", 0)), free_blocks=int(stats.get("free_blocks", 1)),
                   num_blocks=int(stats.get("num_blocks", 1)), time=float(stats.get("time", 0.0)))

    @classmethod
    def of_engine(cls, stats: EngineStats) -> RoutingLoad:
        return cls(queued=stats.running + stats.waiting, free_blocks=stats.free_blocks, num_blocks=stats.num_blocks,
                   time=stats.time)
