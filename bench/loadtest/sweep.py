"""A sweep: the same workload at several concurrencies or request rates, one run after another."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gptoss_serve.bench.loadtest.config import ConfigError, LoadConfig
from gptoss_serve.bench.loadtest.metrics import LoadResult
from gptoss_serve.bench.loadtest.runner import run_load
from gptoss_serve.bench.loadtest.workload import Workload

Swept = Literal["max_concurrency", "request_rate"]


@dataclass(frozen=True, kw_only=True)
class SweepResult:
    label: str
    swept: Swept  # the JSON key that varies from point to point
    points: Sequence[LoadResult]

    def to_json_dict(self, *, detailed: bool = False) -> dict[str, Any]:
        return {"label": self.label, "swept": self.swept,
                "points": [p.to_json_dict(detailed=detailed) for p in self.points]}


async def run_sweep(config: LoadConfig, *, concurrencies: Sequence[int] = (), request_rates: Sequence[float] = (),
                    progress: bool = False) -> SweepResult:
    """Runs `config` once per concurrency (or per request rate; the other setting stays as configured)."""
    if bool(concurrencies) == bool(request_rates):
        raise ConfigError("a sweep needs concurrencies or request rates (one of the two)")
    if concurrencies:
        swept: Swept = "max_concurrency"
        configs = [config.replace(concurrency=n) for n in concurrencies]
    else:
        swept = "request_rate"
        configs = [config.replace(request_rate=r) for r in request_rates]
    for each in configs:  # every point is checked before the first one sends anything
        each.validate()
    # one workload: every point sends the same requests (conversations are built by each run, from the same seed)
    workload = Workload.from_config(config) if config.workload == "random" else None
    points = [await run_load(each, workload=workload, progress=progress) for each in configs]
    label = config.label or (points[0].model if points else "run")
    return SweepResult(label=label, swept=swept, points=points)


@dataclass(frozen=True, slots=True)
class Curve:
    """One line of a plot: a label and its points as JSON dicts."""

    label: str
    swept: str
    points: list[dict[str, Any]]


def curve_of(data: dict[str, Any], *, label: str | None = None) -> Curve:
    """A sweep JSON ({"points": [...]}) or a single run's JSON (one point) as a curve."""
    if "points" in data:
        return Curve(label or data.get("label") or "run", data.get("swept", "max_concurrency"), list(data["points"]))
    swept = "request_rate" if data.get("request_rate") not in (None, "inf") else "max_concurrency"
    return Curve(label or data.get("label") or data.get("model_id") or "run", swept, [data])


def load_curve(path: str | Path) -> Curve:
    """Reads a JSON written by --result-json, for --compare."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a load-test result")
    return curve_of(data)
