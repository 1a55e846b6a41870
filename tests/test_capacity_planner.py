"""The capacity planner (issue 33): hand-computed predictions on tiny tables, and the CLI on the example profile."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_serve.bench import plan
from gptoss_serve.cluster.capacity_planner import Layout, Planner, layouts_for
from gptoss_serve.cluster.capacity_profile import AttentionTable, Curve, ModelShape, Profile, ProfileError, interpolate
from gptoss_serve.cluster.capacity_workload import EngineLimits, Lengths, Workload

EXAMPLE = Path(__file__).resolve().parents[1] / "bench/results/2026-12-07-plan-profile-20b-h100-example.json"


def tiny(*, attention=((1.0, 3.0), (2.0, 4.0)), batches=(1, 3), contexts=(10, 30), experts=((1, 0.5), (3, 1.5)),
         exchange=((1, 0.1), (3, 0.3)), more_experts=None, layers=2, num_experts=4, attention_bytes=20,
         expert_bytes=40, card=100) -> Profile:
    """2 layers, block size 1, no window: a sequence of n tokens holds n KV tokens; card - 10 usable bytes a GPU."""
    curves = {1: Curve.from_pairs(experts, "e")} | (more_experts or {})
    return Profile(name="tiny", card="none", model=ModelShape("tiny", layers, num_experts, 1, 1, 0),
                   card_memory_bytes=card, reserved_bytes=10, attention_weights_bytes=attention_bytes,
                   expert_weights_bytes=expert_bytes, kv_bytes_per_token=1,
                   attention_step=AttentionTable(list(batches), list(contexts), [list(r) for r in attention]),
                   expert_layer=curves, exchange_layer={1: Curve.from_pairs(exchange, "x")} if exchange else {})


def work(prompt=5, output=5, **kw) -> Workload:
    return Workload(Lengths.fixed(prompt), Lengths.fixed(output), **kw)


LIMITS = EngineLimits(gpu_memory_utilization=1.0, max_num_seqs=256, max_num_batched_tokens=2048)


def test_interpolation_is_linear_inside_flat_below_and_extrapolated_above():
    assert interpolate([1, 3], [1.0, 3.0], 2) == 2.0
    assert interpolate([1, 3], [1.0, 3.0], 0.5) == 1.0
    assert interpolate([1, 3], [1.0, 3.0], 5) == 5.0
    t = tiny().attention_step
    assert t.at(2, 20) == pytest.approx(2.5)          # (2 + 3) / 2
    assert t.at(1, 30) == 2.0 and t.at(3, 5) == 3.0


def test_sequence_kv_tokens_count_full_and_window_blocks():
    shape = ModelShape("m", 24, 32, 4, block_size=16, sliding_window=128)
    assert shape.sequence_tokens(200) == (13 + 9) * 16   # 13 full blocks, window 8 blocks + the one filling
    assert shape.sequence_tokens(20) == (2 + 2) * 16


def test_step_time_composition():
    p = Planner(tiny(), work(concurrency=1), LIMITS)
    dp = p.step(Layout("data_parallel", 1), 1, 10)
    assert dp["total"] == pytest.approx(1.0 + 2 * 0.5)
    split = p.step(Layout("split", 1, 1), 1, 10)
    assert split["total"] == pytest.approx(1.0 + 2 * (0.1 + 0.5))          # attention + L x (exchange + experts)
    bound = p.step(Layout("split", 3, 1), 3, 10)                            # one worker serves 3 replicas' layers
    assert bound["critical_path"] == pytest.approx(3.0 + 2 * (0.3 + 1.5))
    assert bound["total"] == pytest.approx(3 * 2 * 1.5)
    # ping-pong prefill: halves of 2 tokens: a = A(1) = 1.0, e = 2 x (0.1 + 0.5) = 1.2 per micro-batch
    pp = p.step(Layout("split", 1, 1, 2), 2, 10, prefill=True)
    assert pp["total"] == pytest.approx(max(2 * 1.0, 2 * 1.2) + min(1.0, 1.2) / 2)
    # decode steps stay whole with micro_batches 2, as the engine runs them
    assert p.step(Layout("split", 1, 1, 2), 2, 10)["total"] == p.step(Layout("split", 1, 1, 1), 2, 10)["total"]


def test_fallbacks_for_worker_counts_not_measured():
    prof = tiny()
    assert prof.experts_time(3, 2) == pytest.approx(0.75)      # the whole layer / 2
    assert prof.experts_time(1, 2) == pytest.approx(0.5)       # never below the 1-token layer
    assert prof.exchange_time(3, 4) == pytest.approx(0.3)      # the nearest measured worker count


def test_kv_capacity_limits_concurrency():
    # 90 usable bytes; data parallel keeps 90 - 60 = 30 KV tokens, a split's attention GPU 90 - 20 = 70
    planner = Planner(tiny(), work(concurrency=10), LIMITS)
    dp = planner.predict(Layout("data_parallel", 2))
    assert dp.kv_tokens_per_replica == 30 and dp.max_seqs_per_replica == 3 and dp.max_concurrency == 6
    assert dp.kv_limited and dp.batch == 3
    split = planner.predict(Layout("split", 1, 1))
    assert split.max_seqs_per_replica == 7 and split.batch == 7
    # hand-computed data-parallel cycle at batch 3: prefill 15 tokens in one chunk (A 15 + 2 x E 7.5 = 30),
    # decode 5 steps of A(3) + 2 x E(3) = 6 -> 60 s for 15 tokens a replica
    assert dp.breakdown["cycle"] == pytest.approx(60.0)
    assert dp.tokens_per_s == pytest.approx(2 * 15 / 60)
    assert dp.tpot_s == pytest.approx(60 / 5)
    # weights that do not fit
    big = Planner(tiny(expert_bytes=80), work(concurrency=1), LIMITS).predict(Layout("data_parallel", 1))
    assert not big.fits and "no KV cache" in big.reason


def test_split_recommended_when_kv_bound_data_parallel_when_not():
    # flat-ish steps (batching is nearly free), so holding more sequences at once wins
    kw = dict(attention=((1.0, 1.1),), batches=(1, 8), contexts=(10,), experts=((1, 1.0), (8, 1.1)),
              exchange=((1, 0.01), (8, 0.01)))
    roomy = Planner(tiny(**kw), work(concurrency=4), LIMITS)
    preds, best, _ = roomy.plan(2)
    assert best.layout.kind == "data_parallel"
    bound = Planner(tiny(expert_bytes=55, **kw), work(concurrency=14), LIMITS)   # DP: 15 KV tokens = 1 sequence
    preds, best, why = bound.plan(2)
    dp = next(p for p in preds if p.layout.kind == "data_parallel")
    assert dp.kv_limited and dp.max_concurrency == 2
    assert best.layout.kind == "split" and "KV-bound" in why


def test_latency_limit_changes_the_recommendation():
    # 3 GPUs, 1 layer; attention 0.1 s a sequence, experts weight-bound: 1.0 s whole, 0.5 s on each of 2 workers
    kw = dict(attention=((0.1, 10.0),), batches=(1, 100), contexts=(10,), experts=((1, 1.0), (100, 1.0)),
              more_experts={2: Curve.from_pairs([(1, 0.5), (100, 0.5)], "e2")}, exchange=((1, 0.0), (100, 0.0)),
              layers=1, card=1000)
    free = Planner(tiny(**kw), work(prompt=1, output=10, request_rate=0.01), LIMITS).plan(3)[1]
    assert free.layout.kind == "data_parallel"          # the most capacity
    limited = Planner(tiny(**kw), work(prompt=1, output=10, request_rate=0.01, tpot_limit_s=0.75), LIMITS)
    preds, best, _ = limited.plan(3)
    assert all(not p.meets_limits for p in preds if p.layout.kind == "data_parallel")  # its step is >= 1 s
    assert (best.layout.replicas, best.layout.workers) == (1, 2) and best.tpot_s <= 0.75


def test_layouts_cover_data_parallel_and_every_split_that_divides_the_experts():
    labels = [layout.label for layout in layouts_for(4, 32)]
    assert labels[0] == "data parallel x4"
    assert {"split 2:2", "split 3:1", "split 3:1 ping-pong"} <= set(labels)
    assert "split 1:3" not in labels                     # 3 workers cannot share 32 experts evenly
    assert "split 1:3" in [layout.label for layout in layouts_for(4, 36)]
    with pytest.raises(ProfileError):
        layouts_for(0, 32)


def test_the_example_profile_loads_and_round_trips(tmp_path):
    data = json.loads(EXAMPLE.read_text())
    prof = Profile.from_dict(data)
    assert Profile.from_dict(json.loads(json.dumps(prof.to_dict()))).to_dict() == prof.to_dict()
    assert "BENCHMARKS.md" in data["source"]


def test_cli_prints_a_recommendation(capsys, tmp_path):
    out_json = tmp_path / "plan.json"
    assert plan.main(["--profile", str(EXAMPLE), "--gpus", "4", "--concurrency", "256", "--json", str(out_json),
                      "--save-profile", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "recommended:" in out and "split 2:2" in out and "data parallel x4" in out
    assert "num_attention_replicas=" in out and "groupName:" in out
    rec = json.loads(out_json.read_text())
    assert rec["recommended"] and rec["app_args"]["num_gpus_per_replica"] == 1
    assert (tmp_path / "p.json").exists()


def test_split_app_args_and_worker_groups():
    layout = plan.worker_groups(Layout("split", 2, 2))
    assert [g["groupName"] for g in layout] == ["attention", "moe"]
    args = plan.app_args(Layout("split", 2, 2, 2), plan.build_parser().parse_args(["--profile", "x"]))
    assert args["num_moe_workers"] == 2 and args["micro_batches"] == 2 and args["expert_transport"] == "nccl"


@pytest.mark.parametrize("argv, message", [
    (["--profile", "/nonexistent/profile.json"], "no such file"),
    (["--profile", "{bad}"], "not valid JSON"),
    (["--profile", "{missing}"], "missing field"),
    (["--profile", str(EXAMPLE), "--gpus", "-1"], "--gpus must be at least 1"),
    (["--profile", str(EXAMPLE), "--prompt-len", "400", "32"], "low above high"),
    (["--measure", "--model", "/tmp/none"], "needs a CUDA GPU"),
])
def test_bad_input_is_one_clear_line_and_a_nonzero_exit(argv, message, tmp_path):
    if argv[1] == "{bad}":
        (tmp_path / "bad.json").write_text("{not json")
        argv = ["--profile", str(tmp_path / "bad.json")]
    if argv[1] == "{missing}":
        (tmp_path / "m.json").write_text(json.dumps({"model": {"name": "x", "layers": 1, "experts": 1}}))
        argv = ["--profile", str(tmp_path / "m.json")]
    if argv[0] == "--measure":
        pytest.importorskip("torch")
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, "-m", "gptoss_serve.bench.plan", *argv], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr
