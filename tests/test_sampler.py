"""Per-request sampling: options checked when built, and each one shaping the distribution the way vLLM's does."""

from __future__ import annotations

import re

import pytest
import torch

from gptoss_serve.cluster.engine_protocol import TokenLogprobs
from gptoss_serve.cluster.sampler import Sampler, SamplingState, _apply_penalties
from gptoss_serve.cluster.sampling_params import HARMONY_STOP_TOKEN_IDS, SamplingParams

PROBS = torch.tensor([0.1, 0.2, 0.3, 0.4])


def states(*params: SamplingParams, prompt: list[int] | None = None) -> list[SamplingState]:
    return [SamplingState(p, list(prompt or [])) for p in params]


def sample(logits: torch.Tensor, *params: SamplingParams) -> list[int]:
    return Sampler().sample(logits, states(*params)).token_ids


def frequencies(tokens: list[int], vocab_size: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab_size).float() / len(tokens)  # [V]


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 1.5), ("max_tokens", True),
        ("min_tokens", -1), ("min_tokens", 2.0), ("min_tokens", 17),  # 17 > the default max_tokens of 16
        ("temperature", -1.0), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
        ("temperature", True),
        ("top_p", 0), ("top_p", 1.5), ("top_p", -0.1), ("top_p", None),
        ("top_k", -2), ("top_k", 1.0), ("top_k", False),
        ("min_p", -0.1), ("min_p", 1.01),
        ("seed", 1.5), ("seed", "7"), ("seed", True), ("seed", 2**64),
        ("presence_penalty", 2.5), ("presence_penalty", -2.01),
        ("frequency_penalty", -3.0), ("frequency_penalty", 2.1),
        ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", float("inf")),
        ("stop", 5), ("stop", ["ok", 3]), ("stop", [""]), ("stop", {"a"}),
        ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]), ("stop_token_ids", 200002), ("stop_token_ids", [True]),
        ("ignore_eos", 1), ("include_stop_str_in_output", "yes"), ("skip_special_tokens", None),
        ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0), ("logprobs", True),
    ],
)
def test_bad_values_name_their_field(field, value):
    with pytest.raises(ValueError) as error:
        SamplingParams(**{field: value})
    assert str(error.value).startswith(f"{field} must"), str(error.value)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", -1.0, "temperature must be >= 0, got -1.0"),
        ("top_p", 0, "top_p must be in (0, 1], got 0"),
        ("stop", 5, "stop must be a string or a list of strings, got int"),
        ("max_tokens", 0, "max_tokens must be >= 1, got 0"),
        ("logprobs", 21, "logprobs must be in [0, 20], got 21"),
    ],
)
def test_messages(field, value, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        SamplingParams(**{field: value})


def test_values_are_normalized():
    params = SamplingParams(stop="###", stop_token_ids=[7, 8], temperature=1, top_p=1, max_tokens=None)
    assert params.stop == ("###",) and params.stop_token_ids == (7, 8)
    assert isinstance(params.temperature, float) and isinstance(params.top_p, float)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams().stop == () and SamplingParams().stop_token_ids is None
    assert SamplingParams(top_k=-1).top_k == -1 and SamplingParams(seed=-1).seed == -1
    with pytest.raises(AttributeError):
        params.temperature = 0.5  # frozen


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams().greedy and not SamplingParams(temperature=0.01).greedy


def test_default_stop_tokens_are_harmonys():
    assert HARMONY_STOP_TOKEN_IDS == (200002, 200012)
    assert SamplingState(SamplingParams(), []).stop_token_ids == HARMONY_STOP_TOKEN_IDS
    assert SamplingState(SamplingParams(stop_token_ids=[5]), []).stop_token_ids == (5,)
    assert SamplingState(SamplingParams(), [], default_stop_token_ids=[9]).stop_token_ids == (9,)
    assert SamplingState(SamplingParams(ignore_eos=True), []).stop_token_ids == ()


def test_greedy_is_argmax():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))  # [B, V]
    assert sample(logits, *[SamplingParams(temperature=0)] * 8) == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1e-3), SamplingParams(top_k=1), SamplingParams(top_p=1e-6),
     SamplingParams(top_k=1, temperature=2.0), SamplingParams(temperature=1e-6, seed=3)],
)
def test_options_that_leave_only_the_argmax(params):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(256, 50, generator=gen)  # [B, V]
    best = logits.argmax(-1)  # [B]
    logits[torch.arange(256), best] += 0.5  # a clear winner: e^(-0.5 / 1e-3) is 0
    assert sample(logits, *[params] * 256) == best.tolist()


def test_top_k_keeps_the_k_likeliest():
    torch.manual_seed(0)
    logits = PROBS.log().expand(20000, 4)  # [B, V]
    freq = frequencies(sample(logits, *[SamplingParams(top_k=2)] * 20000), 4)
    torch.testing.assert_close(freq, torch.tensor([0, 0, 3 / 7, 4 / 7]), atol=0.015, rtol=0)


def test_top_k_off_rows_keep_everything_beside_top_k_rows():
    torch.manual_seed(0)
    logits = PROBS.log().expand(20000, 4)  # [B, V]
    params = [SamplingParams(top_k=(2, -1, 0, 0)[i % 4]) for i in range(20000)]
    tokens = sample(logits, *params)
    off = [t for i, t in enumerate(tokens) if i % 4]
    torch.testing.assert_close(frequencies(off, 4), PROBS, atol=0.015, rtol=0)
    assert set(t for i, t in enumerate(tokens) if i % 4 == 0) <= {2, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    torch.manual_seed(0)
    logits = PROBS.log().expand(20000, 4)  # [B, V]
    # 0.4 + 0.3 < 0.75 <= 0.4 + 0.3 + 0.2: three tokens stay
    freq = frequencies(sample(logits, *[SamplingParams(top_p=0.75)] * 20000), 4)
    torch.testing.assert_close(freq, torch.tensor([0, 2 / 9, 3 / 9, 4 / 9]), atol=0.015, rtol=0)


@pytest.mark.parametrize("companion", [SamplingParams(), SamplingParams(top_p=0.5)])
def test_top_p_applies_to_what_top_k_left(companion):
    """Rows cut by top-k rank only their k leading tokens, unless a companion's top-p needs the whole order."""
    torch.manual_seed(0)
    logits = PROBS.log().expand(30000, 4)  # [B, V]
    params = [SamplingParams(top_k=3, top_p=0.6) if i % 2 else companion for i in range(30000)]
    tokens = sample(logits, *params)
    # top-k 3 leaves 0.2, 0.3, 0.4, renormalized to 2/9, 3/9, 4/9; 4/9 < 0.6 <= 7/9 keeps two of them
    torch.testing.assert_close(frequencies(tokens[1::2], 4), torch.tensor([0, 0, 3 / 7, 4 / 7]), atol=0.015, rtol=0)
    # top-p 0.5 alone: 0.4 < 0.5 <= 0.7 keeps two tokens
    expected = PROBS if companion.top_p == 1.0 else torch.tensor([0, 0, 3 / 7, 4 / 7])
    torch.testing.assert_close(frequencies(tokens[0::2], 4), expected, atol=0.015, rtol=0)


def test_min_p_masks_unlikely_tokens():
    torch.manual_seed(0)
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(20000, 4)  # [B, V]
    freq = frequencies(sample(logits, *[SamplingParams(min_p=0.2)] * 20000), 4)  # cut: 0.2 * 0.5 = 0.1
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95, atol=0.015, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_samples_follow_the_softmax(temperature):
    torch.manual_seed(0)
    logits = PROBS.log().expand(20000, 4)  # [B, V]
    freq = frequencies(sample(logits, *[SamplingParams(temperature=temperature)] * 20000), 4)
    torch.testing.assert_close(freq, torch.softmax(PROBS.log() / temperature, -1), atol=0.015, rtol=0)


def test_a_seeded_request_follows_the_softmax_too():
    state = SamplingState(SamplingParams(seed=11), [])
    sampler, logits = Sampler(), PROBS.log().unsqueeze(0)  # [1, V]
    tokens = [sampler.sample(logits, [state]).token_ids[0] for _ in range(4000)]
    torch.testing.assert_close(frequencies(tokens, 4), PROBS, atol=0.03, rtol=0)


def test_huge_repetition_penalty_bans_seen_tokens():
    torch.manual_seed(0)
    # negative logits are multiplied by the penalty; a positive one is divided, which can take it no lower than 0
    logits = -torch.rand(2000, 6) - 0.5  # [B, V]
    logits[:, 0], logits[:, 1] = -0.1, -0.2  # the likeliest two, until seen
    # seen in the prompt (0) or in the output (1): both count
    requests = [SamplingState(SamplingParams(repetition_penalty=1e6), [0, 0], [1]) for _ in range(2000)]
    tokens = Sampler().sample(logits, requests).token_ids
    assert not {0, 1} & set(tokens)


def test_presence_and_frequency_penalties_ban_repeated_output_tokens():
    torch.manual_seed(0)
    logits = torch.zeros(2000, 4)  # [B, V]
    logits[:, 0] = 1.0
    params = SamplingParams(presence_penalty=2.0, frequency_penalty=2.0)
    requests = [SamplingState(params, [0], [0] * 10) for _ in range(2000)]  # the prompt does not count here
    tokens = Sampler().sample(logits, requests).token_ids
    assert 0 not in tokens and {1, 2, 3} == set(tokens)


def test_penalty_arithmetic():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])  # [B, V]
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    state = SamplingState(params, [0, 1], [2, 3, 3])
    _apply_penalties(logits, [state])
    torch.testing.assert_close(logits, torch.tensor([[1.0, -4.0, 1.0 - 0.75, -4.0 - 1.25, 1.0]]))


def test_output_counts_follow_the_engines_list():
    state = SamplingState(SamplingParams(temperature=0, frequency_penalty=0.15), [])
    sampler, logits = Sampler(), torch.tensor([[1.0, 0.9, 0.8]])  # [B, V]
    for _ in range(4):
        state.output_token_ids.append(sampler.sample(logits, [state]).token_ids[0])
    assert state.output_token_ids == [0, 1, 0, 2]
    state.output_token_ids.clear()  # the engine rewinds the request: counting starts over
    assert sampler.sample(logits, [state]).token_ids == [0]


def test_min_tokens_holds_stop_tokens_back():
    logits = torch.tensor([[0.0, 0.0, 9.0, 8.0, 1.0]])  # [B, V]: the stop tokens 2 and 3 lead
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[2, 3])
    state, sampler = SamplingState(params, []), Sampler()
    for _ in range(3):
        state.output_token_ids.append(sampler.sample(logits, [state]).token_ids[0])
    assert state.output_token_ids == [4, 4, 4]
    assert sampler.sample(logits, [state]).token_ids == [2]
    ignoring = SamplingState(SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[2], ignore_eos=True), [])
    assert sampler.sample(logits, [ignoring]).token_ids == [2]  # nothing stops it, so nothing is held back


def test_min_tokens_with_the_default_stop_tokens_on_the_full_vocabulary():
    logits = torch.zeros(2, 201088)  # [B, V]
    logits[:, 200002], logits[:, 200012], logits[:, 5] = 9.0, 8.0, 1.0
    requests = states(SamplingParams(temperature=0, min_tokens=1), SamplingParams(temperature=0))
    assert Sampler().sample(logits, requests).token_ids == [5, 200002]


def seeded_run(seed: int, companions: int, position: int, steps: int = 8) -> list[int]:
    gen = torch.Generator().manual_seed(0)
    mine = [torch.randn(1000, generator=gen) for _ in range(steps)]  # the same logits every run
    state = SamplingState(SamplingParams(seed=seed, top_p=0.9), [])
    others = [SamplingState(SamplingParams(seed=s) if s % 2 else SamplingParams(), []) for s in range(companions)]
    out = []
    for step in range(steps):
        batch = others[:position] + [state] + others[position:]
        logits = torch.randn(len(batch), 1000)  # [B, V]
        logits[position] = mine[step]
        out.append(Sampler().sample(logits, batch).token_ids[position])
    return out


def test_same_seed_same_samples_whatever_the_batch():
    alone = seeded_run(42, companions=0, position=0)
    assert seeded_run(42, companions=0, position=0) == alone
    assert seeded_run(42, companions=5, position=3) == alone
    assert seeded_run(42, companions=9, position=9) == alone
    assert seeded_run(43, companions=0, position=0) != alone


def test_logprobs_come_from_the_raw_logits():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 100, generator=gen)  # [B, V]
    params = [SamplingParams(logprobs=5, temperature=0.7, repetition_penalty=1.5, seed=1),
              SamplingParams(),
              SamplingParams(logprobs=0, temperature=0, presence_penalty=1.0)]
    out = Sampler().sample(logits, states(*params, prompt=list(range(50))))
    expected = torch.log_softmax(logits, -1)  # [B, V]
    assert out.logprobs[1] is None
    for row, k in ((0, 5), (2, 0)):
        lp = out.logprobs[row]
        assert isinstance(lp, TokenLogprobs) and lp.token_id == out.token_ids[row]
        assert lp.logprob == pytest.approx(expected[row, lp.token_id].item(), abs=1e-5)
        assert lp.rank == 1 + int((expected[row] > expected[row, lp.token_id]).sum())
        values, ids = expected[row].topk(k)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-5)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    assert out.logprobs[2].top == []


def test_logprobs_rank_of_a_greedy_pick_is_one_and_n_past_the_vocabulary_is_cut():
    logits = PROBS.log().unsqueeze(0)  # [B, V]
    lp = Sampler().sample(logits, states(SamplingParams(temperature=0, logprobs=20))).logprobs[0]
    assert lp.token_id == 3 and lp.rank == 1 and len(lp.top) == 4


def test_rejects_a_mismatched_batch():
    with pytest.raises(ValueError, match="logits must be"):
        Sampler().sample(torch.zeros(2, 4), states(SamplingParams()))


@pytest.mark.gpu
def test_on_cuda():
    device = torch.device("cuda")
    logits = PROBS.log().expand(20000, 4).to(device)  # [B, V]
    freq = frequencies(sample(logits, *[SamplingParams(temperature=0.5, top_k=3)] * 20000), 4)
    expected = torch.softmax(torch.tensor([0.2, 0.3, 0.4]).log() / 0.5, -1)
    torch.testing.assert_close(freq, torch.cat([torch.zeros(1), expected]), atol=0.015, rtol=0)

    def run(batch: list[SamplingParams], position: int) -> list[int]:
        requests = [SamplingState(p, [1, 2], [3]) for p in batch]
        out = []
        for step in range(8):
            step_logits = torch.randn(len(batch), 5000, device=device)  # [B, V]
            step_logits[position] = torch.arange(5000, device=device).float().sin() + step
            out.append(Sampler().sample(step_logits, requests).token_ids[position])
        return out

    mine = SamplingParams(seed=5, frequency_penalty=0.5, top_p=0.95, min_p=0.01, logprobs=2)
    alone = run([mine], 0)
    assert run([SamplingParams(), SamplingParams(seed=6), mine, SamplingParams(temperature=0)], 2) == alone


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [
    [SamplingParams(temperature=0)],
    [SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05), SamplingParams(seed=3)],
    [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_p=0.5)],  # greedy and drawn rows in one batch
    [SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.3, min_tokens=4, logprobs=3,
                    max_tokens=16)],
])
def test_a_launch_never_waits_for_the_device(batch):
    """Whatever the options, launching a step's sampling only queues work behind the forward pass: a blocking copy
    of a host list would wait for the whole stream and leave the device idle while the host prepares the next step
    (under async scheduling). The sync debug mode turns any such wait into an error."""
    device = torch.device("cuda")
    requests = [SamplingState(p, [1, 2, 3], [4, 5]) for p in batch]
    logits = torch.randn(len(batch), 201_088, device=device)  # [B, V]: the harmony stop ids (min_tokens) within it
    for state in requests:  # first use: the seeded requests' generators
        state.generator(logits.device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # the first launch marks the prompts for the penalties, the second only counts the new output token
        first = Sampler().launch(logits, requests)
        for state in requests:
            state.output_token_ids.append(6)
        second = Sampler().launch(logits, requests)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(first.result().token_ids) == len(second.result().token_ids) == len(batch)
