"""The interpreter patch (tests/interp_patch.py) makes Triton's CPU casts and bf16 dots match the GPU's."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only")


@triton.jit
def _cast_kernel(x_ptr, bf_ptr, f8_ptr, up_ptr, f8up_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(bf_ptr + offs, x.to(tl.bfloat16))
    tl.store(f8_ptr + offs, x.to(tl.float8e4nv))
    tl.store(up_ptr + offs, tl.load(bf_ptr + offs).to(tl.float32))
    tl.store(f8up_ptr + offs, tl.load(f8_ptr + offs).to(tl.float32))


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))


def _hard_values(n: int) -> torch.Tensor:
    """Random values plus exact bf16 and e4m3 ties, values near and past 448, subnormals, -0, inf, NaN."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-12, 10, (n,), generator=g).float())
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-4, 1 + 3 * 2**-4, 1.0625 * 2**-7, 2**-10, 3 * 2**-10,
                         2**-9 * 1.5, 2**-9 * 0.5, 447.0, 449.0, 464.0, 479.0, 480.0, 1e5, -1e9, 2**-130, -0.0,
                         float("inf"), float("-inf"), float("nan")])
    # bf16 halfway points between neighbours, built from bits so they are exact ties
    mid = (torch.randint(0, 2**15, (32,), generator=g, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)
    return torch.cat((ties, mid, x))[:n]


def test_casts_bit_exact():
    n = 512
    x = _hard_values(n)
    bf = torch.empty(n, dtype=torch.bfloat16)
    f8 = torch.empty(n, dtype=torch.float8_e4m3fn)
    up, f8up = torch.empty(n), torch.empty(n)
    _cast_kernel[(1,)](x, bf, f8, up, f8up, N=n)
    want_bf = x.to(torch.bfloat16)
    want_f8 = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(bf.view(torch.int16), want_bf.view(torch.int16))
    assert torch.equal(f8.view(torch.uint8), want_f8.view(torch.uint8))
    assert torch.equal(up.view(torch.int32), want_bf.float().view(torch.int32))
    assert torch.equal(f8up.view(torch.int32), want_f8.float().view(torch.int32))


def test_bf16_dot_matches_fp32_of_bf16():
    a = torch.randn(16, 32).to(torch.bfloat16)
    b = torch.randn(32, 16).to(torch.bfloat16)
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, M=16, N=16, K=32)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-6, atol=1e-6)
