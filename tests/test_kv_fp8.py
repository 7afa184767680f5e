"""FP8 KV stores (--kv-cache-dtype fp8): rows dequantise to the FP8 KV simulation bit for bit, and the compressed
entry store (reference and kernel) writes exactly the entries the plain pool would hold."""

from __future__ import annotations

import pytest
import torch
from test_kernels_compressor import make_case, run

from dsv4.ops import compressor as ref
from dsv4.ops.kv_fp8 import Fp8KV, alloc_fp8_kv, fp8_kv_bytes_per_row, gather_rows, scatter_rows
from dsv4.ops.quant import act_quant_sim

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("hd,rd", [(512, 64), (72, 8), (32, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_the_simulation(hd, rd, dtype):
    x = (torch.randn(50, hd, device=DEV) * torch.exp2(torch.randint(-12, 12, (50, 1), device=DEV).float())).to(dtype)
    x[3] = 0.0  # all-zero blocks: the 1e-4 amax floor
    store = alloc_fp8_kv((5, 10), hd, rd, dtype, DEV)
    rows = torch.randperm(50, device=DEV)
    scatter_rows(store, rows, x)
    sim = torch.cat((act_quant_sim(x[:, : hd - rd], 64), x[:, hd - rd :]), dim=-1)
    assert torch.equal(gather_rows(store, rows), sim)
    # storing the simulated rows again changes nothing they dequantise to
    scatter_rows(store, rows, sim)
    assert torch.equal(gather_rows(store, rows), sim)
    assert store.shape == (5, 10, hd) and store.dtype == dtype


def test_bytes_per_row():
    assert fp8_kv_bytes_per_row(512, 64, torch.bfloat16) == 448 + 7 + 128  # vs 1024 in bf16


def _fp8_pool(pool: torch.Tensor, rd: int) -> Fp8KV:
    return Fp8KV(*alloc_fp8_kv(tuple(pool.shape[:-1]), pool.shape[-1], rd, pool.dtype, pool.device))


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_compressed_entries_into_fp8_pool(impl):
    """The main compressor (CSA ratio 4, FP8 simulation on) into an FP8 pool: every written entry dequantises to
    what the same op writes into a plain pool; entries of other pages stay as they were."""
    if impl == "triton":
        pytest.importorskip("triton")
        from dsv4.ops import compressor_triton as tri

        fn = tri.compress_update
    else:
        fn = ref.compress_update
    rd = 8
    case = make_case([(7, 1), (0, 9), (13, 6), (3, 1)], 4, True, d=72, rd=rd)
    plain = run(fn, case, quant="fp8")
    written = ~torch.isnan(plain["pool"][..., 0])
    pool8 = _fp8_pool(case["pool"], rd)
    before = gather_rows(pool8, torch.arange(written.numel(), device=DEV))
    fn(**{k: v for k, v in dict(case, quant="fp8", pool=pool8).items() if k != "batch"})
    got = gather_rows(pool8, torch.arange(written.numel(), device=DEV))
    flat = written.flatten()
    assert flat.any()
    assert torch.equal(got[flat], plain["pool"].view(-1, 72)[flat])
    assert torch.equal(got[~flat], before[~flat])
