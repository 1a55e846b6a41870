"""Throughput against latency: one curve per run (ours and any --compare files), TTFT and TPOT side by side.

The further right a curve runs and the lower it stays, the better the server: each point is one load level,
labelled with its concurrency or request rate, so where a curve bends up shows where queueing starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gptoss_serve.bench.loadtest.sweep import Curve

PLOT_STATS = ("median", "mean", "p90", "p99")
_PANELS = (("ttft", "TTFT"), ("tpot", "TPOT"))


def plot_curves(curves: Sequence[Curve], path: str | Path, *, stat: str = "median", title: str = "") -> Path:
    """Writes a PNG; x is output tokens/s, y the chosen statistic of TTFT (left) and TPOT (right) in ms."""
    if stat not in PLOT_STATS:
        raise ValueError(f"stat must be one of {PLOT_STATS}, got {stat!r}")
    # Figure without pyplot: no GUI backend, no global state, safe in threads and on headless machines.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5), layout="constrained")
    axes = fig.subplots(1, 2)
    labels = _distinct([c.label for c in curves])
    for ax, (key, name) in zip(axes, _PANELS, strict=True):
        for curve, label in zip(curves, labels, strict=True):
            points = [p for p in curve.points if p.get(f"{stat}_{key}_ms") is not None]
            points.sort(key=lambda p: float(p.get("output_throughput") or 0.0))
            xs = [float(p.get("output_throughput") or 0.0) for p in points]
            ys = [float(p[f"{stat}_{key}_ms"]) for p in points]
            (line,) = ax.plot(xs, ys, marker="o", label=label)
            for x, y, p in zip(xs, ys, points, strict=True):
                ax.annotate(_point_name(curve.swept, p), (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=line.get_color())
        ax.set_xlabel("output throughput (tokens/s)")
        ax.set_ylabel(f"{stat} {name} (ms)")
        ax.set_title(f"{name} against throughput")
        ax.grid(True, alpha=0.3)
        if curves:
            ax.legend(fontsize=8)
    fig.suptitle(title or f"{stat} latency against output throughput")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")
    return path


def _distinct(labels: list[str]) -> list[str]:
    """Two runs of one model both default to its name: number the repeats so the legend tells them apart."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def _point_name(swept: str, point: dict) -> str:
    if swept == "request_rate":
        rate = point.get("request_rate")
        return f"r={rate:g}" if isinstance(rate, (int, float)) else f"r={rate}"
    return f"c={point.get('max_concurrency')}"
