"""bench.plan_check: the planner's colocated predictions beside measured engine rows, and its errors on bad input."""

import json

import pytest

from gptoss_serve.bench import plan_check
from gptoss_serve.cluster.capacity_planner import Layout, Planner
from gptoss_serve.cluster.capacity_workload import EngineLimits, Lengths, Workload
from tests.test_capacity_planner import tiny


def predicted(batch, prompt, output):
    workload = Workload(Lengths.fixed(prompt), Lengths.fixed(output), concurrency=batch, burst=True)
    return Planner(tiny(card=1000), workload, EngineLimits()).predict(Layout("data_parallel", 1))


def engine_row(batch, prompt, output, *, tpot, rate, **kw):
    """A bench.engine_throughput row whose TPOT and tok/s are the given ones."""
    return {"batch": batch, "prompt_len": prompt, "output_len": output, "decode_tokens_per_s": batch / tpot,
            "total_s": batch * output / rate, "experts": "packed", "eager": False, "async_scheduling": True} | kw


@pytest.fixture
def files(tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(tiny(card=1000).to_dict()))
    return profile, tmp_path / "measured.json"


def test_errors_are_the_predictions_over_the_measured_figures(files, capsys):
    profile, measured = files
    p = predicted(2, 5, 4)
    rows = [engine_row(2, 5, 4, tpot=2 * p.tpot_s, rate=p.tokens_per_s / 0.8),
            engine_row(2, 5, 4, tpot=1.0, rate=1.0, eager=True),              # not how the service runs: left out
            engine_row(2, 5, 4, tpot=1.0, rate=1.0, experts="dequantized")]
    measured.write_text(json.dumps({"machine": "none", "engine": rows}))
    out = profile.parent / "checks.json"
    assert plan_check.main(["--profile", str(profile), "--measured", str(measured), "--json", str(out)]) == 0
    (check,) = json.loads(out.read_text())["checks"]
    assert check["tpot_s"]["error"] == pytest.approx(-0.5)
    assert check["tokens_per_s"]["error"] == pytest.approx(-0.2)
    assert check["tpot_s"]["predicted"] == pytest.approx(p.tpot_s) and p.tpot_s > 0
    assert "largest error: 50.0%" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot read measured runs"),
    ("[]", "not a bench.engine_throughput JSON object"),
    (json.dumps({"engine": []}), "no engine rows"),
    (json.dumps({"engine": [{"batch": 1, "prompt_len": 5, "output_len": 4}]}), "lacks a figure"),
    (json.dumps({"engine": [engine_row(1, 10**6, 4, tpot=1.0, rate=1.0)]}), "does not fit"),
    (json.dumps({"engine": [engine_row(10**6, 5, 4, tpot=1.0, rate=1.0)]}), "holds only"),
])
def test_bad_measured_files_are_named_in_one_line(files, capsys, content, message):
    profile, measured = files
    measured.write_text(content)
    assert plan_check.main(["--profile", str(profile), "--measured", str(measured)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_missing_profile_is_named(files, capsys):
    _, measured = files
    measured.write_text(json.dumps({"engine": []}))
    assert plan_check.main(["--profile", "/nonexistent/p.json", "--measured", str(measured)]) == 2
    assert "no such file" in capsys.readouterr().err
