"""The profiler half of benchmarks/decode.py: run a step under torch.profiler and print its top device ops, the
launches per step and the GPU's idle share."""

from __future__ import annotations

from collections.abc import Callable

import torch

CUDA = torch.cuda.is_available()


def profiled(fn: Callable[[], object]) -> torch.profiler.profile:
    """Run ``fn`` under the torch profiler (CUDA activity with a GPU, CPU ops without)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if CUDA else ProfilerActivity.CPU]) as prof:
        fn()
    return prof


def profile_report(prof, n: int, step_us: float, label: str, key: dict) -> dict:
    """Print and return the top device ops of ``n`` profiled steps of median time ``step_us``."""
    from torch.autograd import DeviceType

    want = DeviceType.CUDA if CUDA else DeviceType.CPU
    evs = [e for e in prof.events() if e.device_type == want and "ProfilerStep" not in e.name
           and "annotation" not in str(getattr(e, "activity_type", None) or "")
           and (CUDA or getattr(e, "cpu_parent", None) is None)]
    if not evs:
        print(f"# profile {label}: the profiler recorded no device events (CUPTI unavailable?)")
    by_name: dict[str, list[float]] = {}
    for e in evs:
        by_name.setdefault(e.name, []).append(e.time_range.end - e.time_range.start)
    busy, end = 0.0, float("-inf")
    for s, t in sorted((e.time_range.start, e.time_range.end) for e in evs):
        busy, end = busy + max(0.0, t - max(s, end)), max(end, t)
    launches = sum(1 for e in evs if not e.name.startswith(("Memcpy", "Memset"))) / n
    idle = max(0.0, 1 - busy / n / step_us) if CUDA else None
    what = "kernel" if CUDA else "top-level CPU op (no CUDA here)"
    print(f"# profile: {label}: step {step_us:.0f} us (median, without the profiler), "
          f"{launches:.0f} launches/step, {what}s busy {busy / n:.0f} us/step"
          + (f", GPU idle {idle * 100:.0f}% of the step" if idle is not None else ""))
    print(f"{what} | calls/step | us/step | share")
    total = sum(sum(v) for v in by_name.values()) or 1.0
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:20]
    for name, ts in top:
        print(f"{name[:100]} | {len(ts) / n:.1f} | {sum(ts) / n:.1f} | {sum(ts) / total * 100:.1f}%", flush=True)
    return dict(key, step_us=round(step_us, 1), launches_per_step=round(launches, 1),
                busy_us_per_step=round(busy / n, 1), idle_share=None if idle is None else round(idle, 3),
                top=[dict(name=k, calls=len(v) / n, us=round(sum(v) / n, 1)) for k, v in top])
