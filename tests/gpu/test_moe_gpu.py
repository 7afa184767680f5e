"""The grouped-GEMM routed experts (+ fused shared expert) against the reference at V4-Flash shapes, on the GPU.

E=256 experts of I=2048 over D=4096, top-6, swiglu_limit 10; bf16 activations. Forms: bf16 experts and shared
expert (the "dequant" build, no activation quantisation), FP8 experts + FP8 shared expert and FP4 experts + FP8
shared expert (the "native" builds, FP8 activations). ||out - ref|| / ||ref|| <= 1e-2 (bf16 outputs; an
activation rounding through FP8 can flip where the two sums differ by an ulp). Also: runs are bit-identical,
and a CUDA-graph capture replays to the eager result on new inputs (no host sync inside; at 8 tokens the direct
path with its tile counters). The direct decode path equals the grouped one bit for bit. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from dsv4.ops import moe as ref
from dsv4.ops import moe_decode_triton as direct
from dsv4.ops import moe_triton as tri

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
E, D, I, K, LIMIT = 256, 4096, 2048, 6, 10.0


def _fp8(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 codes (no NaN) and fp32 power-of-two scales per 128x128 block."""
    b = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda")
    b = torch.where((b & 0x7F) == 0x7F, b ^ 0x01, b)  # 0x7f / 0xff are NaN in e4m3fn
    s = torch.exp2(torch.randint(-14, -11, (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128)),
                                 device="cuda").float())
    return b.view(torch.float8_e4m3fn), s


def _fp4(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed e2m1 pairs [..., N, K/2] and fp32 power-of-two scales per 32 inputs [..., N, K/32]."""
    *lead, n, k = shape
    p = torch.randint(0, 256, (*lead, n, k // 2), dtype=torch.uint8, device="cuda")
    return p, torch.exp2(torch.randint(-9, -6, (*lead, n, k // 32), device="cuda").float())


def make_stack(form: str, e: int) -> ref.ExpertWeights:
    shapes = ((e, I, D), (e, I, D), (e, D, I))
    if form == "bf16":
        return ref.ExpertWeights(*((torch.randn(s, device="cuda") / s[-1] ** 0.5).bfloat16() for s in shapes))
    pairs = [(_fp8 if form == "fp8" else _fp4)(s) for s in shapes]
    return ref.ExpertWeights(*(p[0] for p in pairs), *(p[1] for p in pairs))


def make_batch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(n, D, device="cuda").bfloat16()
    scores = torch.rand(n, E, device="cuda")
    w, ids = scores.topk(K, dim=-1)
    return x, (w / w.sum(-1, keepdim=True) * 1.5).float(), ids


def _norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if torch.isnan(a).any() or torch.isinf(a).any():
        return float("inf")
    return ((a - b).norm() / b.norm()).item()


def _row_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).max().item()


FORMS = {"bf16": ("bf16", "bf16", False), "fp8": ("fp8", "fp8", True), "fp4": ("fp4", "fp8", True)}


@pytest.fixture(scope="module", params=list(FORMS))
def layer(request):
    routed, shared, act_quant = FORMS[request.param]
    torch.manual_seed(0)
    yield request.param, make_stack(routed, E), make_stack(shared, 1), act_quant
    torch.cuda.empty_cache()


@pytest.mark.parametrize("n", [1, 16, 64, 256, 2048])
def test_moe_experts_flash(layer, n):
    name, experts, shared, act_quant = layer
    x, w, ids = make_batch(n)
    want = ref.moe_experts(x, experts, w, ids, LIMIT, act_quant, shared, LIMIT, out_dtype=torch.bfloat16)
    got = tri.moe_experts(x, experts, w, ids, LIMIT, act_quant, shared, LIMIT, out_dtype=torch.bfloat16)
    again = tri.moe_experts(x, experts, w, ids, LIMIT, act_quant, shared, LIMIT, out_dtype=torch.bfloat16)
    err, row = _norm_rel(got, want), _row_rel(got, want)
    cfg = tri.default_config(n, K, E)
    print(f"\nmoe_experts {name} n={n} [{tri.config_name(cfg)}]: norm rel err {err:.2e}, worst row {row:.2e}")
    assert torch.equal(got, again), "two runs differ"
    assert err <= 1e-2


@pytest.mark.parametrize("cfg", tri.CANDIDATES, ids=tri.config_name)
@pytest.mark.parametrize("fp8_dot", [False, True])
def test_moe_experts_configs(layer, cfg, fp8_dot):
    """Every tile configuration the benchmark sweeps, both FP8 product paths (FP8 forms only matter)."""
    name, experts, shared, act_quant = layer
    if fp8_dot and name == "bf16":
        pytest.skip("e4m3 products need FP8 activations")
    x, w, ids = make_batch(96)
    want = ref.moe_experts(x, experts, w, ids, LIMIT, act_quant, shared, LIMIT, out_dtype=torch.bfloat16)
    got = tri.moe_experts(x, experts, w, ids, LIMIT, act_quant, shared, LIMIT, out_dtype=torch.bfloat16,
                          config=dict(cfg, fp8_dot=fp8_dot))
    err = _norm_rel(got, want)
    print(f"\nmoe_experts {name} n=96 [{tri.config_name(dict(cfg, fp8_dot=fp8_dot))}]: norm rel err {err:.2e}")
    assert err <= 1e-2


@pytest.mark.parametrize("n", [1, 64, 2048])
@pytest.mark.parametrize("prequant", [False, True])
@pytest.mark.parametrize("fp4_dot", [False, True])
def test_moe_experts_launch_keys(layer, n, prequant, fp4_dot):
    """The default tiles of each size class with the launch keys flipped: activations quantised once by act_quant
    (``prequant``) or inside every gate/up program, FP4 e4m3 group MMAs (``fp4_dot``) or the exact bf16 dequant."""
    name, experts, shared, act_quant = layer
    if name == "bf16" or (fp4_dot and name != "fp4"):
        pytest.skip("prequant needs FP8 activations; fp4_dot FP4 experts")
    x, w, ids = make_batch(n)
    cfg = dict(tri.default_config(n, K, E, name), prequant=prequant, fp4_dot=fp4_dot)
    want = ref.moe_experts(x, experts, w, ids, LIMIT, act_quant, shared, LIMIT, out_dtype=torch.bfloat16)
    got = tri.moe_experts(x, experts, w, ids, LIMIT, act_quant, shared, LIMIT, out_dtype=torch.bfloat16, config=cfg)
    err = _norm_rel(got, want)
    print(f"\nmoe_experts {name} n={n} [{tri.config_name(cfg)}]: norm rel err {err:.2e}")
    assert err <= 1e-2


@pytest.mark.parametrize("n", [1, 5, 20])
def test_moe_experts_direct(layer, n):
    """The direct decode path (no grouping step, the combine done by the last program of each output column
    tile) up to its 128-hit limit, tokens 0 and 1 on the same experts: against the reference, bit for bit the
    grouped path with the same tiles, and 10 runs identical (a memory-ordering race in the combine would show); the
    down GEMM fused into the gate/up launch (``fuse_down``) against the reference too."""
    name, experts, shared, act_quant = layer
    x, w, ids = make_batch(n)
    if n > 1:
        ids[1] = ids[0].flip(0)
    cfg = dict(tri.default_config(n, K, E, "dense" if name == "bf16" else name), direct=True)  # table forms
    args = (x, experts, w, ids, LIMIT, act_quant, shared, LIMIT)
    want = ref.moe_experts(*args, out_dtype=torch.bfloat16)
    got = tri.moe_experts(*args, out_dtype=torch.bfloat16, config=cfg)
    grouped = tri.moe_experts(*args, out_dtype=torch.bfloat16, config=dict(cfg, direct=False))
    same = all(torch.equal(got, tri.moe_experts(*args, out_dtype=torch.bfloat16, config=cfg)) for _ in range(10))
    err = _norm_rel(got, want)
    print(f"\nmoe_experts direct {name} n={n} [{tri.config_name(cfg)}]: norm rel err {err:.2e}, "
          f"== grouped {torch.equal(got, grouped)}, 10 runs identical {same}")
    assert err <= 1e-2 and same
    assert torch.equal(got, grouped)
    # the down GEMM fused into the gate/up launch
    fcfg = dict(cfg, **direct.FUSED_CANDIDATES[0])
    fused = tri.moe_experts(*args, out_dtype=torch.bfloat16, config=fcfg)
    f_err = _norm_rel(fused, want)
    eff = tri.effective_config(n, K, experts, shared, 2, act_quant, fcfg)
    print(f"moe_experts direct {name} n={n} [{tri.config_name(eff)}]: norm rel err {f_err:.2e}")
    assert eff["fuse_down"]
    assert f_err <= 1e-2 and torch.equal(fused, tri.moe_experts(*args, out_dtype=torch.bfloat16, config=fcfg))


@pytest.mark.parametrize("cfg", direct.CANDIDATES + direct.FUSED_CANDIDATES, ids=tri.config_name)
def test_moe_experts_direct_tiles(layer, cfg):
    """Every direct-path tile the benchmark sweeps, at batch 1 (FP8 and FP4 forms: the bf16 build shares the
    loops), and the down GEMM fused into the gate/up launch."""
    name, experts, shared, act_quant = layer
    if name == "bf16":
        pytest.skip("the quantized forms only")
    x, w, ids = make_batch(1)
    cfg = dict(cfg, direct=True, fp8_dot=True, fp4_dot=True)
    assert tri.effective_config(1, K, experts, shared, 2, act_quant, cfg)["fuse_down"] == bool(cfg.get("fuse_down"))
    args = (x, experts, w, ids, LIMIT, act_quant, shared, LIMIT)
    err = _norm_rel(tri.moe_experts(*args, out_dtype=torch.bfloat16, config=cfg),
                    ref.moe_experts(*args, out_dtype=torch.bfloat16))
    print(f"\nmoe_experts direct {name} n=1 [{tri.config_name(cfg)}]: norm rel err {err:.2e}")
    assert err <= 1e-2


def test_moe_experts_cuda_graph(layer):
    """Captured once, replayed on new routing: equals the eager call bit for bit (no host sync in the op)."""
    name, experts, shared, act_quant = layer
    n = 8
    x, w, ids = make_batch(n)

    def run() -> torch.Tensor:
        return tri.moe_experts(x, experts, w, ids, LIMIT, act_quant, shared, LIMIT, out_dtype=torch.bfloat16)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    x2, w2, ids2 = make_batch(n)
    x.copy_(x2)
    w.copy_(w2)
    ids.copy_(ids2)
    graph.replay()
    torch.cuda.synchronize()
    eager = tri.moe_experts(x2, experts, w2, ids2, LIMIT, act_quant, shared, LIMIT, out_dtype=torch.bfloat16)
    print(f"\nmoe_experts {name} cuda graph replay == eager: {torch.equal(out, eager)}")
    assert torch.equal(out, eager)


@pytest.mark.parametrize("n", [1, 8, 16, 256, 2048])
def test_moe_experts_skipped_hits(layer, n):
    """Expert parallel at EP=8 as rank 0 sees it: its 32 experts, every other rank's hit id -1 (``may_skip``), a
    token and (at n=1) the whole batch with no hit here. Bit for bit the weight-0 form (the same hits computed
    with weight 0 on their experts modulo 32), no NaN although the skipped hits' scratch rows are never written;
    ids without -1 under may_skip give the plain call's bits."""
    name, experts, shared, act_quant = layer
    local = ref.ExpertWeights(*(None if t is None else t[: E // 8] for t in experts))
    x, w, ids = make_batch(n)
    skip = torch.where(ids < E // 8, ids, -1)
    skip[0] = -1
    args = (LIMIT, act_quant, shared, LIMIT)
    for cfg in (None, dict(tri.default_config(n, K, E // 8, "dense" if name == "bf16" else name), direct=True)
                if n * K <= direct.max_hits() else dict(direct=False)):
        got = tri.moe_experts(x, local, w, skip, *args, out_dtype=torch.bfloat16, may_skip=True, config=cfg)
        zero = tri.moe_experts(x, local, torch.where(skip < 0, 0.0, w), ids % (E // 8), *args,
                               out_dtype=torch.bfloat16, config=cfg)
        hits = int((skip >= 0).sum())
        print(f"\nmoe_experts skip {name} n={n} {cfg}: {hits} of {skip.numel()} hits here, "
              f"== weight-0 form {torch.equal(got, zero)}")
        assert not torch.isnan(got).any() and torch.equal(got, zero)
        mine = ids % (E // 8)
        assert torch.equal(tri.moe_experts(x, local, w, mine, *args, out_dtype=torch.bfloat16, may_skip=True,
                                           config=cfg),
                           tri.moe_experts(x, local, w, mine, *args, out_dtype=torch.bfloat16, config=cfg))
    if n == 1:
        none = torch.full_like(ids, -1)
        got = tri.moe_experts(x, local, w, none, *args, out_dtype=torch.bfloat16, may_skip=True)
        assert torch.equal(got, tri.moe_experts(x, local, torch.zeros_like(w), ids % (E // 8), *args,
                                                out_dtype=torch.bfloat16))
