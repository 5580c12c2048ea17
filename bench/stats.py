"""Percentiles, ratios and rounding of results: `statistics.quantiles`, nothing hand-made."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any


def spread(values: Iterable[float]) -> dict[str, float | None]:
    """p50, p90, p99, max and mean of `values` (µs, any order). The percentiles interpolate
    linearly between closest ranks (`statistics.quantiles(method="inclusive")`, numpy's default)."""
    data = sorted(values)
    if not data:
        return {"p50_us": None, "p90_us": None, "p99_us": None, "max_us": None, "mean_us": None}
    cuts = statistics.quantiles(data, n=100, method="inclusive") if len(data) > 1 else [data[0]] * 99
    return {"p50_us": cuts[49], "p90_us": cuts[89], "p99_us": cuts[98], "max_us": data[-1], "mean_us": statistics.fmean(data)}


def median(values: Iterable[float]) -> float | None:
    data = list(values)
    return statistics.median(data) if data else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def per_1k(cpu_ms: float, count: int) -> float | None:
    return cpu_ms / (count / 1000) if count else None


def tidy(obj: Any) -> Any:
    """Round floats for a readable JSON file (µs to 0.1, ratios to 3 significant digits)."""
    if isinstance(obj, float):
        return round(obj, 1) if abs(obj) >= 100 else float(f"{obj:.3g}")
    if isinstance(obj, dict):
        return {k: tidy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [tidy(v) for v in obj]
    return obj
