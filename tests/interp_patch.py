"""Bit-exact float conversions for the Triton interpreter (``TRITON_INTERPRET=1``), see CPU_TESTING.md.

The interpreter (triton 3.6) rounds its own way: fp32 -> bf16 truncates, fp32 -> fp8e4m3 has carry, tie and
subnormal bugs and no saturation, and ``tl.dot`` on bf16 operands multiplies the raw uint16 storage. On the
GPU these are ``cvt.rn.bf16.f32``, ``cvt.rn.satfinite.e4m3x2.f32`` and a bf16 MMA with fp32 accumulation.
:func:`apply` routes the interpreter's conversions through torch, whose casts round to nearest even like the
GPU (e4m3 inputs are clamped to +-448 first: the GPU saturates), and upcasts bf16 dot operands to fp32
(exact: a bf16 product is exact in fp32, and the accumulation is fp32 on the GPU too).

Everything here is a no-op unless the interpreter is in use; ``apply`` is idempotent.
"""

from __future__ import annotations

import numpy as np
import torch

FP8_MAX = 448.0
_applied = False


def _torch_dtypes() -> dict:
    import triton.language as tl

    return {
        tl.float64: torch.float64, tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16,
        tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2,
    }


_UINT = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}


def convert(data: np.ndarray, src, dst) -> np.ndarray | None:
    """Convert the interpreter's storage ``data`` from triton dtype ``src`` to ``dst`` with torch (RNE).

    Returns the destination bits as an unsigned numpy array of the destination width (the interpreter's own
    convention), or None when a dtype has no torch equivalent.
    """
    table = _torch_dtypes()
    if src not in table or dst not in table:
        return None
    t_src, t_dst = table[src], table[dst]
    arr = np.ascontiguousarray(data)
    t = torch.from_numpy(arr.reshape(-1).copy()).view(t_src)
    if t_dst == torch.float8_e4m3fn:
        # the GPU's satfinite cast: +-inf and overflow go to +-448, NaN stays NaN
        t = t.double().clamp(-FP8_MAX, FP8_MAX)
    out = t.to(t_dst).view(_UINT[t_dst.itemsize])
    return out.numpy().reshape(arr.shape)


def apply() -> None:
    """Monkeypatch ``triton.runtime.interpreter`` (call before any kernel runs)."""
    global _applied
    if _applied:
        return
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter as itp

    original_convert = itp._convert_float
    original_cast = itp.InterpreterBuilder.cast_impl

    def _convert_float(input, input_dtype, output_dtype, rounding_mode):
        if rounding_mode in (None, ir.ROUNDING_MODE.RTNE):
            out = convert(input, input_dtype, output_dtype)
            if out is not None:
                return out
        return original_convert(input, input_dtype, output_dtype, rounding_mode)

    def cast_impl(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if s.is_floating() and d.is_floating() and (s.is_bf16() or d.is_bf16() or s.is_fp8() or d.is_fp8()):
            out = convert(src.data, s, d)
            if out is not None:
                return itp.TensorHandle(out.view(itp._get_np_dtype(dst_type)), d)
        return original_cast(self, src, dst_type)

    original_dot = itp.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def up(x):
            if x.dtype.scalar == tl.bfloat16:
                return itp.TensorHandle(convert(x.data, tl.bfloat16, tl.float32).view(np.float32), tl.float32)
            return x

        return original_dot(self, up(a), up(b), d, input_precision, max_num_imprecise_acc)

    itp._convert_float = _convert_float
    itp.InterpreterBuilder.cast_impl = cast_impl
    itp.InterpreterBuilder.create_fp_trunc = lambda self, src, dst_type: self.cast_impl(src, dst_type)
    itp.InterpreterBuilder.create_fp_ext = lambda self, src, dst_type: self.cast_impl(src, dst_type)
    itp.InterpreterBuilder.create_dot = create_dot
    _applied = True
