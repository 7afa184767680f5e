"""Kernels against their references on the GPU at V4-Flash shapes (skipped without CUDA).

bf16 relative error <= 1e-2 (fp8 casts and scales bit-exact); fp32 attention <= 1e-5; model logits with
ops="triton" against ops="ref" on a Flash-shaped two-layer model (CSA + HCA). Run on the device machine by
benchmarks/kernel_check.sh; the printed lines are what docs/benchmarks.md records.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_attention import batch_of, make_world, to_fp8

from dsv4.ops import attention as attn_ref
from dsv4.ops import attention_mq_triton as attn_mq
from dsv4.ops import attention_triton as attn_tri
from dsv4.ops import qkv as qkv_ref
from dsv4.ops import qkv_triton as qkv_tri
from dsv4.ops import quant as quant_ref
from dsv4.ops import quant_triton as quant_tri
from dsv4.ops.rope import rope_cos_sin, rope_inv_freq

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
H, HD, RD, WINDOW = 64, 512, 64, 128


@pytest.fixture(autouse=True)
def _multi_query_on(monkeypatch):
    """The multi-query form is opt-in (attention_mq_triton.ENABLED): its tests run it through its entry."""
    monkeypatch.setattr(attn_mq, "ENABLED", True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Per-row max relative error, worst row (for elementwise kernels)."""
    a, b = a.float().flatten(1), b.float().flatten(1)
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("inf")
    return ((a - b).abs().amax(-1) / b.abs().amax(-1).clamp_min(1e-12)).max().item()


def _norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (METHOD.md's measure for reductions; NaN fails)."""
    a, b = a.float(), b.float()
    if torch.isnan(a).any():
        return float("inf")
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scale_fmt", ["ue8m0", None])
def test_act_quant_flash(scale_fmt):
    x = (torch.randn(512, 4096, device="cuda") * torch.exp2(torch.randint(-8, 8, (512, 1), device="cuda"))).bfloat16()
    q, s = quant_tri.act_quant(x, 128, scale_fmt)
    q_ref, s_ref = quant_ref.act_quant(x, 128, scale_fmt)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s.view(torch.uint8) if scale_fmt else s, s_ref.view(torch.uint8) if scale_fmt else s_ref)
    assert torch.equal(quant_tri.act_dequant(q, s, torch.bfloat16), quant_ref.act_dequant(q_ref, s_ref, torch.bfloat16))
    assert torch.equal(quant_tri.act_quant_sim(x, 128, scale_fmt), quant_ref.act_quant_sim(x, 128, scale_fmt))


def _cos_sin(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.randint(0, 65536, (t,), device="cuda")
    return rope_cos_sin(pos, rope_inv_freq(RD, 160000.0, None).cuda())


def test_q_norm_rope_flash():
    t = 96
    q = torch.randn(t, H, HD, device="cuda").bfloat16()
    cos, sin = _cos_sin(t)
    got, want = qkv_tri.q_norm_rope(q, 1e-6, cos, sin), qkv_ref.q_norm_rope(q, 1e-6, cos, sin)
    same = (got == want).float().mean().item()
    print(f"\nq_norm_rope bf16: rel err {_rel(got, want):.2e}, bit-identical fraction {same:.6f}")
    assert _rel(got, want) <= 1e-2


@pytest.mark.parametrize("quant", [False, True])
def test_kv_norm_rope_store_flash(quant):
    t, slots = 96, 4
    kv = (torch.randn(t, HD, device="cuda") * 4).bfloat16()
    w = 1 + 0.1 * torch.randn(HD, device="cuda")
    cos, sin = _cos_sin(t)
    ring = torch.randn(slots, WINDOW, HD, device="cuda").bfloat16()
    dest = torch.where(torch.rand(t, device="cuda") < 0.8, torch.randperm(slots * WINDOW, device="cuda")[:t], -1)
    ring_ref = ring.clone()
    got = qkv_tri.kv_norm_rope_store(kv, w, 1e-6, cos, sin, quant, ring, dest)
    want = qkv_ref.kv_norm_rope_store(kv, w, 1e-6, cos, sin, quant, ring_ref, dest)
    same = (got == want).float().mean().item()
    print(f"\nkv_norm_rope_store bf16 quant={quant}: rel err {_rel(got, want):.2e}, bit-identical {same:.6f}")
    assert _rel(got, want) <= 1e-2 if not quant else _rel(got, want) <= 7e-2
    keep = dest >= 0
    assert torch.equal(ring.view(-1, HD)[dest[keep]], got[keep])


_CASES: dict = {}
FLASH_REQS = [(3000, 1), (4095, 1), (517, 4), (1200, 300), (0, 200), (9000, 1)]


def _flash_world(kind: str, dtype: torch.dtype) -> dict:
    """Decodes at long contexts, a verify-like 4-row extend, a 300-token prefill chunk (longer than the ring),
    a fresh 200-token prefill; built once per (kind, dtype)."""
    if (kind, dtype) not in _CASES:
        _CASES[kind, dtype] = make_world(kind, FLASH_REQS, h=H, hd=HD, rd=RD, window=WINDOW,
                                         ratio=4 if kind == "csa" else 128, topk=512, page_size=64, dtype=dtype,
                                         device="cuda")
    return _CASES[kind, dtype]


def _flash_case(kind: str, dtype: torch.dtype) -> dict:
    return batch_of(_flash_world(kind, dtype), list(range(len(FLASH_REQS))))


@pytest.mark.parametrize("kind", ["sliding", "csa", "hca"])
@pytest.mark.parametrize("split", [False, True])
def test_attention_flash(kind, split):
    """The default configuration: bf16 norm-wise error <= 1e-2 (the worst row's max error is printed too: two
    bf16 implementations that round at different points differ there by a bf16 step or two), fp32 <= 1e-5."""
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        args = _flash_case(kind, dtype)
        want = attn_ref.paged_sparse_attention(**args)
        got = attn_tri.paged_sparse_attention(**args, config=dict(split=split))
        err = _norm_rel(got, want) if dtype == torch.bfloat16 else _rel(got, want)
        print(f"\nattention {kind} split={split} {dtype}: rel err {err:.2e} (worst row max {_rel(got, want):.2e})")
        assert err <= tol


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_attention_fp8_flash(kind):
    """FP8 ring and pool (--kv-cache-dtype fp8): the kernel's in-register dequantisation against the reference's."""
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        args = to_fp8(_flash_case(kind, dtype))
        want = attn_ref.paged_sparse_attention(**args)
        for split in (False, True):
            got = attn_tri.paged_sparse_attention(**args, config=dict(split=split))
            err = _norm_rel(got, want) if dtype == torch.bfloat16 else _rel(got, want)
            print(f"\nattention fp8 stores {kind} split={split} {dtype}: rel err {err:.2e}")
            assert err <= tol


@pytest.mark.parametrize("kind", ["csa", "hca", "sliding"])
def test_attention_batch_invariant_flash(kind):
    """bf16, default configuration: a decode row and a 4-row extend give bitwise the same output alone (split
    form) and in batches of other sizes and contexts (the 500-row batches run the no-split form; CSA pick widths
    change with the batch), and split == no-split for the whole batch."""
    w = _flash_world(kind, torch.bfloat16)
    full = batch_of(w, list(range(len(FLASH_REQS))))
    a = attn_tri.paged_sparse_attention(**full, config=dict(split=False))
    b = attn_tri.paged_sparse_attention(**full, config=dict(split=True))
    print(f"\nattention {kind} split vs no-split: {(a != b).sum().item()} elements differ of {a.numel()}")
    assert torch.equal(a, b)
    for target in (0, 2):
        n = FLASH_REQS[target][1]
        alone = attn_tri.paged_sparse_attention(**batch_of(w, [target]))
        for others in ([1], [4], [3, 5], [5, 4, 3, 1]):
            got = attn_tri.paged_sparse_attention(**batch_of(w, [target] + others))[:n]
            assert torch.equal(got, alone), (target, others, (got != alone).sum().item())


@pytest.mark.parametrize("cfg", attn_tri.CANDIDATES, ids=attn_tri.config_name)
def test_attention_candidates(cfg):
    """Every configuration the benchmark may pick: split and not (bitwise equal), CSA and sliding, bf16; CSA fp32
    and FP8 stores."""
    for kind in ("csa", "sliding"):
        args = _flash_case(kind, torch.bfloat16)
        want = attn_ref.paged_sparse_attention(**args)
        outs = []
        for split in (False, True):
            got = attn_tri.paged_sparse_attention(**args, config=dict(cfg, split=split))
            err = _norm_rel(got, want)
            print(f"\nattention {kind} {attn_tri.config_name(cfg)} split={split}: rel err {err:.2e}")
            assert err <= 1e-2
            outs.append(got)
        assert torch.equal(outs[0], outs[1])
    args = _flash_case("csa", torch.float32)
    err = _rel(attn_tri.paged_sparse_attention(**args, config=dict(cfg, split=False)),
               attn_ref.paged_sparse_attention(**args))
    print(f"\nattention csa {attn_tri.config_name(cfg)} fp32: rel err {err:.2e}")
    assert err <= 1e-5
    args = to_fp8(_flash_case("csa", torch.bfloat16))
    err = _norm_rel(attn_tri.paged_sparse_attention(**args, config=dict(cfg, split=True)),
                    attn_ref.paged_sparse_attention(**args))
    print(f"\nattention csa fp8 stores {attn_tri.config_name(cfg)}: rel err {err:.2e}")
    assert err <= 1e-2


FLASH_RPR = (1, 300)  # FLASH_REQS' fewest and most rows per request


@pytest.mark.parametrize("kind", ["sliding", "csa", "hca"])
def test_attention_mq_flash(kind):
    """The OpSet entry on the mixed batch (decodes on the single-row kernel, the 4-, 300- and 200-row requests
    on the multi-query kernel): bf16 norm-wise <= 1e-2, fp32 <= 1e-5; then FP8 stores (CSA, HCA)."""
    cases = [(torch.bfloat16, 1e-2, False), (torch.float32, 1e-5, False)]
    if kind != "sliding":
        cases.append((torch.bfloat16, 1e-2, True))
    for dtype, tol, fp8 in cases:
        args = _flash_case(kind, dtype)
        args = to_fp8(args) if fp8 else args
        want = attn_ref.paged_sparse_attention(**args)
        got = attn_mq.paged_sparse_attention(**args, rows_per_request=FLASH_RPR)
        err = _norm_rel(got, want) if dtype == torch.bfloat16 else _rel(got, want)
        print(f"\nattention mq {kind} {dtype}{' fp8 stores' if fp8 else ''}: rel err {err:.2e} "
              f"(worst row max {_rel(got, want):.2e})")
        assert err <= tol


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_attention_mq_verify_flash(kind):
    """Verify-shaped batches at long contexts: 16 requests x k + 1 in {2, 3, 4} rows (4-row groups straddle the
    3-row requests), multi-query kernel alone (CSA: picks masked per row and batched); bf16 and fp32."""
    ctxs = [int(c) for c in torch.randint(600, 9000, (16,))]
    for k1 in (2, 3, 4):
        reqs = [(c, k1) for c in ctxs]
        for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
            w = make_world(kind, reqs, h=H, hd=HD, rd=RD, window=WINDOW, slack=k1, ratio=4 if kind == "csa" else 128,
                           topk=512, page_size=64, dtype=dtype, device="cuda")
            args = batch_of(w, list(range(len(reqs))))
            want = attn_ref.paged_sparse_attention(**args)
            for batched in (False, True) if kind == "csa" else (False,):
                got = attn_mq.paged_sparse_attention(**args, rows_per_request=(k1, k1),
                                                     mq_config=dict(csa_batched=batched))
                err = _norm_rel(got, want) if dtype == torch.bfloat16 else _rel(got, want)
                print(f"\nattention mq verify {kind} k+1={k1} {dtype} csa_batched={batched}: rel err {err:.2e}")
                assert err <= tol


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_attention_mq_batch_invariant_flash(kind):
    """bf16: the 4-row and the 300-row requests give bitwise the same rows alone and in batches that put them at
    other row offsets (other runs of the 4-row groups); a decode row beside them is the single-row kernel's."""
    w = _flash_world(kind, torch.bfloat16)
    for target in (2, 3):
        n = FLASH_REQS[target][1]
        alone = attn_mq.paged_sparse_attention(**batch_of(w, [target]), rows_per_request=(n, n))
        for others in ([0], [4, 1], [5, 2 if target == 3 else 3, 0]):
            which = others + [target]
            lens = [FLASH_REQS[i][1] for i in which]
            got = attn_mq.paged_sparse_attention(**batch_of(w, which), rows_per_request=(min(lens), max(lens)))
            assert torch.equal(got[-n:], alone), (target, others, (got[-n:] != alone).sum().item())
    decode = attn_tri.paged_sparse_attention(**batch_of(w, [0]))
    assert torch.equal(attn_mq.paged_sparse_attention(**batch_of(w, [0, 2]), rows_per_request=(1, 4))[:1], decode)


@pytest.mark.parametrize("cfg", attn_mq.CANDIDATES, ids=attn_mq.config_name)
def test_attention_mq_candidates(cfg):
    """Every multi-query configuration the benchmark may pick: CSA bf16 and FP8 stores, HCA bf16 (mixed batch)."""
    for kind, fp8 in (("csa", False), ("csa", True), ("hca", False)):
        args = _flash_case(kind, torch.bfloat16)
        args = to_fp8(args) if fp8 else args
        got = attn_mq.paged_sparse_attention(**args, rows_per_request=FLASH_RPR, mq_config=cfg)
        err = _norm_rel(got, attn_ref.paged_sparse_attention(**args))
        print(f"\nattention mq {kind}{' fp8 stores' if fp8 else ''} {attn_mq.config_name(cfg)}: rel err {err:.2e}")
        assert err <= 1e-2


# Last in the file: an illegal memory access poisons the CUDA context for every later test.
@pytest.mark.xfail(reason="the multi-query kernel with FP8 stores hit an illegal memory access on an H200 (session 6); "
                          "attention_mq_triton.MQ_FP8 = False keeps FP8 stores on the single-row kernel", strict=False)
@pytest.mark.parametrize("kind", ["hca", "csa"])
def test_attention_mq_fp8_stores_direct(kind):
    """The multi-query kernel itself on FP8 stores (the entry routes them to the single-row kernel)."""
    args = to_fp8(batch_of(_flash_world(kind, torch.bfloat16), [2, 3, 4]))  # the 4-, 300- and 200-row requests
    want = attn_ref.paged_sparse_attention(**args)
    got = attn_mq.multi_query_attention(**args)
    torch.cuda.synchronize()
    err = _norm_rel(got, want)
    print(f"\nattention mq {kind} fp8 stores, kernel alone: rel err {err:.2e}")
    assert err <= 1e-2
