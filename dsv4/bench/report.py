"""What both benchmarks share: seeded random request shapes, percentiles, the table and the JSON line."""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO


def random_lengths(rng: random.Random, n: int, length: int, range_ratio: float) -> list[int]:
    """``n`` lengths drawn uniformly from ``[ceil(length * range_ratio), length]`` (ratio 1: all equal), >= 1.

    SGLang's ``--random-range-ratio`` convention, so runs of both tools can be compared.
    """
    if not 0 <= range_ratio <= 1:
        raise ValueError(f"--range-ratio must be in [0, 1], got {range_ratio}")
    if length < 1:
        raise ValueError(f"lengths must be >= 1, got {length}")
    lo = max(1, math.ceil(length * range_ratio))
    return [rng.randint(lo, length) for _ in range(n)]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:,.2f}" if abs(v) < 1e6 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def print_card(title: str, items: Mapping[str, Any], out: TextIO | None = None) -> None:
    """What was measured, before the numbers: one ``key: value`` line each."""
    out = out or sys.stdout  # looked up per call: sys.stdout may be swapped (tests, redirection)
    print(f"== {title} ==", file=out)
    width = max(len(k) for k in items)
    for k, v in items.items():
        print(f"{k:<{width}}  {_fmt(v)}", file=out)


def print_table(rows: Mapping[str, Any], out: TextIO | None = None) -> None:
    """A two-column table: metric, value."""
    out = out or sys.stdout
    width = max(len(k) for k in rows)
    vals = {k: _fmt(v) for k, v in rows.items()}
    vwidth = max(len(v) for v in vals.values())
    rule = "-" * (width + vwidth + 3)
    print(rule, file=out)
    for k, v in vals.items():
        print(f"{k:<{width}} | {v:>{vwidth}}", file=out)
    print(rule, file=out)


def print_json(result: Mapping[str, Any], out: TextIO | None = None) -> None:
    """The last line: one JSON object (NaN becomes null so any JSON parser reads it)."""
    out = out or sys.stdout
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
    print(json.dumps(clean, sort_keys=False), file=out, flush=True)
