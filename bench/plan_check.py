"""The capacity planner checked against measured runs: its colocated predictions beside what bench.engine_throughput
measured for the same bursts.

    python -m gptoss_serve.bench.plan_check --profile PROFILE.json --measured ENGINE_THROUGHPUT.json [--json FILE]

Each engine row (packed experts, CUDA graphs, async scheduling: how the service runs) is a burst of `batch`
requests of `prompt_len` tokens asking for `output_len` tokens each on one GPU. The planner predicts that burst for
the colocated layout (one GPU, `--burst` at concurrency `batch`); the check prints, per row, the predicted and the
measured TPOT (the decode step: batch / decode tok/s) and output tokens a second (batch * output_len over the run's
time, prefill included), and each prediction's error. The profile should come from the same card (bench.plan
--measure --save-profile); rows at batches or prompt lengths between the profile's grid points check its
interpolation. Exit status 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from gptoss_serve.bench.plan import PlanError, read_profile
from gptoss_serve.cluster.capacity_planner import Layout, Planner
from gptoss_serve.cluster.capacity_profile import Profile, ProfileError
from gptoss_serve.cluster.capacity_workload import EngineLimits, Lengths, Workload

COLOCATED = Layout("data_parallel", 1)


def served_rows(measured: dict) -> list[dict]:
    """The engine rows run as the service runs: packed experts, graphs, async scheduling."""
    rows = [r for r in measured.get("engine", [])
            if r.get("experts", "packed") == "packed" and not r.get("eager") and r.get("async_scheduling", True)]
    if not rows:
        raise PlanError("the measured file has no engine rows with packed experts, CUDA graphs and async scheduling "
                        "(write it with bench.engine_throughput --json)")
    return rows


def check_row(profile: Profile, row: dict, limits: EngineLimits) -> dict:
    """One measured burst against the planner's colocated prediction of it."""
    try:
        batch, prompt, output = int(row["batch"]), int(row["prompt_len"]), int(row["output_len"])
        measured_tpot = batch / float(row["decode_tokens_per_s"])
        measured_rate = batch * output / float(row["total_s"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise PlanError(f"an engine row lacks a figure the check needs ({e!r}): {row}") from None
    workload = Workload(Lengths.fixed(prompt), Lengths.fixed(output), concurrency=batch, burst=True)
    # the engine run held its whole batch (bench.engine_throughput sizes max_num_seqs to it)
    limits = dataclasses.replace(limits, max_num_seqs=max(limits.max_num_seqs, batch))
    pred = Planner(profile, workload, limits).predict(COLOCATED)
    if not pred.fits:
        raise PlanError(f"batch {batch} at {prompt}-token prompts: the planner says it does not fit: {pred.reason}")
    if pred.kv_limited:
        raise PlanError(f"batch {batch} at {prompt}-token prompts: the profile's card holds only "
                        f"{pred.max_seqs_per_replica} such sequences, so the planner would queue the rest")
    return {"batch": batch, "prompt_len": prompt, "output_len": output,
            "tpot_s": {"predicted": pred.tpot_s, "measured": measured_tpot,
                       "error": pred.tpot_s / measured_tpot - 1},
            "tokens_per_s": {"predicted": pred.tokens_per_s, "measured": measured_rate,
                             "error": pred.tokens_per_s / measured_rate - 1}}


def print_rows(checks: list[dict]) -> None:
    print(f"{'batch':>6} {'prompt':>7} {'output':>7}  {'TPOT ms pred':>12} {'measured':>9} {'error':>7}  "
          f"{'tok/s pred':>10} {'measured':>9} {'error':>7}")
    for c in checks:
        t, r = c["tpot_s"], c["tokens_per_s"]
        print(f"{c['batch']:>6} {c['prompt_len']:>7} {c['output_len']:>7}  {t['predicted'] * 1e3:>12.2f} "
              f"{t['measured'] * 1e3:>9.2f} {t['error']:>+7.1%}  {r['predicted']:>10.1f} {r['measured']:>9.1f} "
              f"{r['error']:>+7.1%}")
    worst = max(max(abs(c["tpot_s"]["error"]), abs(c["tokens_per_s"]["error"])) for c in checks)
    print(f"largest error: {worst:.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptoss_serve.bench.plan_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True, help="a saved profile (bench.plan --save-profile)")
    parser.add_argument("--measured", required=True, help="bench.engine_throughput --json output")
    parser.add_argument("--max-num-batched-tokens", type=int, default=EngineLimits().max_num_batched_tokens)
    parser.add_argument("--json", help="write the checks here")
    args = parser.parse_args(argv)
    try:
        profile = read_profile(args.profile)
        try:
            measured = json.loads(Path(args.measured).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"{args.measured}: cannot read measured runs: {e}") from None
        if not isinstance(measured, dict):
            raise PlanError(f"{args.measured}: not a bench.engine_throughput JSON object")
        if measured.get("machine") and profile.card and measured["machine"] != profile.card:
            print(f"note: the profile is from {profile.card}, the runs from {measured['machine']}")
        limits = EngineLimits(max_num_batched_tokens=args.max_num_batched_tokens)
        checks = [check_row(profile, row, limits) for row in served_rows(measured)]
    except (PlanError, ProfileError) as e:
        print(f"plan_check: error: {e}", file=sys.stderr)
        return 2
    print(f"profile: {profile.name}; measured: {measured.get('machine', '?')}")
    print_rows(checks)
    if args.json:
        Path(args.json).write_text(json.dumps({"profile": profile.name, "machine": measured.get("machine"),
                                               "checks": checks}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
