"""Plain-text tables: one run laid out as `vllm bench serve` prints it, and one row per point of a sweep."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gptoss_serve.bench.loadtest.metrics import LoadResult

WIDTH = 50
CLIENT_BOUND_WARNING = ("WARNING: the load generator was CPU-bound: its own event loop delayed the chunks it timed, "
                        "so latencies are overstated and throughput understated (a bound, not a measure).")
_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
           "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def _rule(title: str = "", char: str = "-") -> str:
    return f" {title} ".center(WIDTH, char) if title else char * WIDTH


def format_result(result: LoadResult) -> str:
    c = result.config
    rows: list[tuple[str, Any]] = [
        ("Target:", f"{c.url} ({c.endpoint})"),
        ("Model:", result.model),
        *([("Workload:", f"conversations ({c.system_prompt_len}-token system prompt, {c.turns} turns)")]
          if c.workload == "conversation" else []),
        ("Successful requests:", result.completed),
        ("Failed requests:", result.failed),
    ]
    if result.cancelled:
        rows.append(("Cancelled at the end:", result.cancelled))
    rows += [
        ("Maximum request concurrency:", c.concurrency),
        ("Request rate configured (req/s):", c.effective_rate),
        ("Benchmark duration (s):", result.duration),
        ("Total input tokens:", result.total_input_tokens),
        ("Total generated tokens:", result.total_output_tokens),
        ("Request throughput (req/s):", result.request_throughput),
    ]
    if result.request_goodput is not None:
        rows.append(("Request goodput (req/s):", result.request_goodput))
    rows += [
        ("Output token throughput (tok/s):", result.output_throughput),
        ("Total token throughput (tok/s):", result.total_token_throughput),
        ("Peak concurrent requests:", result.max_concurrent_requests),
        ("Load generator CPU (share of a core):", result.client_cpu),
    ]
    lines = [_rule("Serving Benchmark Result", "="), *(_row(k, v) for k, v in rows)]
    for name, title in _TITLES.items():
        stats = getattr(result, name)
        short = name.upper() if name != "e2el" else "E2EL"
        lines.append(_rule(title))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99"), ("std", "Std")):
            lines.append(_row(f"{label} {short} (ms):", getattr(stats, stat)))
    if result.ttft_by_turn:
        lines.append(_rule("Median TTFT by conversation turn"))
        for turn, stats in result.ttft_by_turn.items():
            tokens = result.input_tokens_by_turn[turn]
            lines.append(_row(f"Turn {turn}, {tokens:.0f} input tok (ms):", stats.median))
    if result.cached_share_by_turn:
        lines.append(_rule("Prompt tokens cached, by turn (usage)"))
        for turn, share in result.cached_share_by_turn.items():
            lines.append(_row(f"Turn {turn}:", f"{share:.3f}"))
    if result.server is not None:
        lines.append(_rule("The server's counters (--metrics-url)"))
        lines.append(_row("Prefix-cache hit rate, prompt tokens:", result.server.hit_rate))
        for replica, rate in result.server.hit_rate_by_replica.items():
            lines.append(_row(f"  replica {replica}:", rate))
        for reason, count in sorted(result.server.routing.items()):
            lines.append(_row(f"Routed by {reason}:", count))
    if result.errors_by_status:
        lines.append(_rule("Failures by status or reason"))
        for reason, count in result.errors_by_status.items():
            lines.append(_row(f"{reason}:", count))
            if example := result.error_examples.get(reason):
                lines.append(f"    e.g. {example[:WIDTH * 2]}")
    if result.client_bound:
        lines.append(CLIENT_BOUND_WARNING)
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def _row(key: str, value: Any) -> str:
    text = _num(value)
    return f"{key} {text:>{max(1, WIDTH - len(key) - 1)}}"  # right-aligned, however long the value


SWEEP_COLUMNS: tuple[tuple[str, str, int], ...] = (
    # header, JSON key, decimals
    ("done", "completed", 0), ("fail", "failed", 0), ("req/s", "request_throughput", 2),
    ("out tok/s", "output_throughput", 1), ("TTFT med", "median_ttft_ms", 1), ("TTFT p99", "p99_ttft_ms", 1),
    ("TPOT med", "median_tpot_ms", 2), ("TPOT p99", "p99_tpot_ms", 2), ("ITL med", "median_itl_ms", 2),
    ("E2EL med", "median_e2el_ms", 1), ("goodput", "request_goodput", 2), ("gen cpu", "load_generator_cpu", 2),
)


def format_sweep(points: Sequence[Mapping[str, Any]], *, swept: str, title: str = "") -> str:
    """One row per point (the JSON dicts of the results); `swept` is "max_concurrency" or "request_rate"."""
    header = ["conc" if swept == "max_concurrency" else "rate", *(h for h, _, _ in SWEEP_COLUMNS)]
    rows = [[_num(p.get(swept))] + [_num(_as_float(p.get(key)), d) if d else _num(p.get(key))
                                     for _, key, d in SWEEP_COLUMNS] for p in points]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    lines = [title] if title else []
    lines += [fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)]
    lines.append("latencies in ms")
    return "\n".join(lines)


def _as_float(value: Any) -> float | None:
    return None if value is None or isinstance(value, str) else float(value)
