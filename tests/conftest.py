"""Test session set-up: without a CUDA GPU, Triton kernels run in the interpreter with exact float casts.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` decorator runs, so this happens at conftest import,
before the test modules import ``dsv4``.
"""

from __future__ import annotations

import os
import sys

import torch

# tests/gpu/ shares the helpers in tests/ (harness.py, oracle.py)
sys.path.insert(0, os.path.dirname(__file__))

# The suite was written against the random embedded model (byte tokenizer, 512 ids); the shipped trained
# model has its own tests (test_tiny_quality.py) that name its directory.
os.environ.setdefault("DSV4_EMBEDDED", "random")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton  # noqa: F401
    except ImportError:  # kernel tests skip themselves; the references need no triton
        pass
    else:
        from interp_patch import apply

        apply()
