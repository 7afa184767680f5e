"""Programmatic dependent launch (PDL) for the Triton kernels, on Hopper and later GPUs.

A decode step is ~100 small launches, most of them a few microseconds long; between two of them the GPU drains
one grid and ramps up the next. With PDL a kernel is launched while its predecessor still runs: its programs get
resident and wait at ``griddepcontrol.wait`` until the predecessor has finished and its writes are visible, so
the launch and ramp-up overlap the predecessor's tail. CUDA-graph capture keeps these launches as programmatic
edges, so replayed steps get the same overlap.

Every kernel launched with PDL calls :func:`enter` before its first load or store. The wait there is for the
whole previous grid, and that grid, if launched with PDL, waited for its own predecessor before finishing, so
everything earlier in the stream is complete too: a kernel that skipped the wait would break the chain. ``enter``
also lets the next kernel launch as soon as every program of this one has started (``launch_dependents``): they
are all resident by then, so the early programs of the next kernel take no slot this kernel still needs.

On other devices and in Triton's interpreter ``PDL`` is False and nothing changes. :func:`set_enabled` (the
engine's ``--disable-pdl``, the benchmarks' ``--no-pdl``) launches without the attribute; the kernels then still
execute the two instructions, which are no-ops without PDL.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_enabled = True


def set_enabled(on: bool) -> None:
    """Launch PDL-capable kernels with the PDL attribute (default) or without it."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


@functools.cache
def supported(device: torch.device) -> bool:
    """sm_90+ CUDA devices, compiled (not interpreted) Triton."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def launch(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch: the kernel's ``PDL`` constexpr and Triton's ``launch_pdl``."""
    if not supported(device):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": _enabled}


@triton.jit
def enter(PDL: tl.constexpr):
    """The first statement of a PDL-capable kernel: wait for the previous grid, then let the next one launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
