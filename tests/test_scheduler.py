"""The scheduler's chunking of prompts beside decoding sequences (long_prefill_token_threshold)."""

from __future__ import annotations

from gptoss_serve.cluster.block_manager import BlockManager
from gptoss_serve.cluster.sampling_params import SamplingParams
from gptoss_serve.cluster.scheduler import Scheduler
from gptoss_serve.cluster.sequence import Sequence


def _run_step(scheduler: Scheduler) -> dict[str, int]:
    """One step as the engine runs it, every sampled sequence given a token. -> request id: tokens computed."""
    scheduled = scheduler.schedule()
    for seq in scheduler.advance(scheduled):
        seq.output_token_ids.append(7)
    scheduler.after_step(scheduled)
    return {seq.request_id: n for seq, n in scheduled}


def _scheduler(threshold: int) -> Scheduler:
    blocks = BlockManager(num_blocks=200, block_size=16, sliding_window=None)
    return Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64, long_prefill_token_threshold=threshold)


def _add(scheduler: Scheduler, name: str, prompt_len: int) -> None:
    first = 1_000 * len(scheduler.running) + 1_000 * len(scheduler.waiting)  # no prefix shared: no cache hits
    seq = Sequence(name, list(range(first, first + prompt_len)), SamplingParams(max_tokens=100, ignore_eos=True))
    seq.length_cap = prompt_len + 100
    scheduler.add(seq)


def test_a_long_prompt_takes_small_chunks_only_while_others_decode():
    scheduler = _scheduler(threshold=8)
    _add(scheduler, "long", 300)
    assert _run_step(scheduler) == {"long": 64}  # alone: the whole budget
    _add(scheduler, "short", 10)
    assert _run_step(scheduler) == {"long": 64}  # "short" waits: nothing left of the budget, and nobody decodes
    assert _run_step(scheduler) == {"long": 64}
    assert _run_step(scheduler) == {"long": 64}
    assert _run_step(scheduler) == {"long": 44, "short": 10}  # the rest of the budget; neither decodes yet
    assert _run_step(scheduler) == {"long": 1, "short": 1}  # both decode
    _add(scheduler, "next", 100)
    assert _run_step(scheduler) == {"long": 1, "short": 1, "next": 8}  # beside decodes: 8 tokens a step
    assert _run_step(scheduler) == {"long": 1, "short": 1, "next": 8}


def test_without_a_threshold_a_prompt_beside_decodes_takes_the_rest_of_the_budget():
    scheduler = _scheduler(threshold=0)
    _add(scheduler, "short", 10)
    _run_step(scheduler)
    _add(scheduler, "next", 100)
    assert _run_step(scheduler) == {"short": 1, "next": 63}
