"""What travels between the deployments: engine requests in, stream items out (plain, picklable data)."""

from __future__ import annotations

from dataclasses import dataclass

from gptoss_serve.cluster.engine import RequestOutput
from gptoss_serve.cluster.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float  # time.time() when the ingress received it: latencies count from here


@dataclass(frozen=True)
class StreamItem:
    """One step's output for one request, or the error that ended it."""

    request_id: str
    output: RequestOutput | None = None
    error: str | None = None
    status: int = 200  # for errors: 400 bad request, 503 unavailable, 500 internal

    @property
    def is_last(self) -> bool:
        return self.error is not None or (self.output is not None and self.output.finished)
