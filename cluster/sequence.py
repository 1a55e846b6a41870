"""One request as the engine tracks it: its tokens, how many are in the KV cache, its blocks and its sampler state."""

from __future__ import annotations

import enum
import time
from dataclasses import InitVar, dataclass, field

from gptoss_serve.cluster.engine_protocol import RequestTimes
from gptoss_serve.cluster.sampler import SamplingState
from gptoss_serve.cluster.sampling_params import HARMONY_STOP_TOKEN_IDS, SamplingParams


# an output token sampled by the step still on the device (async scheduling): its value reaches the host one step
# later; the next step reads it on the device, from that step's samples at the sequence's `pending_row`
PENDING = -1


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    default_stop_token_ids: InitVar[tuple[int, ...]] = HARMONY_STOP_TOKEN_IDS  # unless params name their own
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose keys and values are in the cache
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache at admission
    # one block table per KV group (full-attention layers, sliding-window layers); 0 is the null block
    block_tables: dict[str, list[int]] = field(default_factory=dict)
    num_hashed_blocks: int = 0  # leading full blocks already registered in the prefix cache
    block_hashes: list[int] = field(default_factory=list)  # chained content hash of each full block
    length_cap: int = 0  # the engine sets it: prompt + max_tokens, within max_model_len; no token is computed past it
    pending_row: int = -1  # where its PENDING last token lies in the samples of the step in flight
    # its milestones, stamped as they happen: made with the sequence, when the engine takes the request
    times: RequestTimes = field(default_factory=lambda: RequestTimes(arrival=time.time()))
    # what the sampler keeps between steps (penalty counts, the seeded generator); it reads the tokens above live
    sampling: SamplingState = field(init=False, repr=False)

    def __post_init__(self, default_stop_token_ids: tuple[int, ...]) -> None:
        self.sampling = SamplingState(self.params, self.prompt_token_ids, self.output_token_ids,
                                      default_stop_token_ids=default_stop_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def tokens_in(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole list (a long sequence's block, once a block fills)."""
        prompt = self.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        return (prompt[start:] if start < len(prompt) else []) + \
            self.output_token_ids[max(start - len(prompt), 0):end - len(prompt)]

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def newest_is_pending(self) -> bool:
        """Its newest token was sampled by the step still on the device (its value is not on the host yet)."""
        return bool(self.output_token_ids) and self.output_token_ids[-1] == PENDING

    @property
    def at_length_cap(self) -> bool:
        """It has every token it may have (the last perhaps PENDING): nothing more is scheduled for it."""
        return len(self) >= self.length_cap

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self) - self.num_computed_tokens
