"""Every indexer scoring form and sweep candidate against the reference on the GPU at V4-Flash shapes
(skipped without CUDA; ``python -m pytest -q tests/gpu/test_indexer_forms_gpu.py``, about a minute).

The benchmark sweep (benchmarks/bench_indexer.py) may make any ``indexer_triton.CANDIDATES`` point a default,
so each is checked here at a shape of its own class: integer-valued inputs make every score exact in any
summation order, so the picks must equal the reference's entry for entry (ties included), in bf16 for every
candidate and in fp32 for each tile form.
"""

from __future__ import annotations

import pytest
import torch
from test_indexer_gpu import flash_case

from dsv4.ops import indexer as ref
from dsv4.ops import indexer_triton as tri

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = {
    "decode": [(16384 - 37 * i, 1) for i in range(16)],
    "verify2": [(16384 - 5 * i, 2) for i in range(16)],
    "verify4": [(16384 - 5 * i, 4) for i in range(16)] + [(9, 4)],
    "extend": [(8192 - 1024, 1024), (70, 9)],
}
POINTS = [(cls, i) for cls in SHAPES for i in range(len(tri.CANDIDATES[cls]) + 1)]


def _config(cls: str, i: int) -> dict:
    return tri.DEFAULTS[cls] | ({} if i == 0 else tri.CANDIDATES[cls][i - 1])


@pytest.mark.parametrize("cls,i", POINTS, ids=[f"{c}-{tri.config_name(_config(c, i))}" for c, i in POINTS])
def test_candidate_exact_bf16(cls, i):
    a = flash_case(SHAPES[cls], torch.bfloat16, integer=True)
    assert tri.shape_class(a["q"].shape[0], a["slots"].shape[0]) == cls
    assert torch.equal(tri.indexer_topk(**a, config=_config(cls, i)), ref.indexer_topk(**a))


@pytest.mark.parametrize("form", list(tri.FORMS))
@pytest.mark.parametrize("cls", ["decode", "verify4", "extend"])
def test_forms_exact_fp32(form, cls):
    a = flash_case(SHAPES[cls], torch.float32, integer=True)
    assert torch.equal(tri.indexer_topk(**a, config=dict(form=form)), ref.indexer_topk(**a))


@pytest.mark.parametrize("form", list(tri.FORMS))
def test_forms_bf16_random_scores(form):
    """Random bf16 inputs: each form's scores within 1e-2 of the reference's (norm-wise), no NaN."""
    a = flash_case(SHAPES["verify4"])
    args = {k: v for k, v in a.items() if k != "topk"}
    want = ref.paged_scores(**args)
    got = tri.paged_scores(**args, config=dict(form=form), out=torch.full_like(want, float("-inf")))
    seen = want > float("-inf")
    assert torch.equal(got > float("-inf"), seen) and not torch.isnan(got).any()
    rel = ((got - want).where(seen, 0.0).norm() / want.where(seen, 0.0).norm()).item()
    print(f"\nindexer form {form}: bf16 scores rel err {rel:.2e}")
    assert rel <= 1e-2
