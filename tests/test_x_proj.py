"""The fused x projection (dsv4/model/x_proj.py): its rows are the checkpoint tensors, its outputs are each
part's own GEMM, state dicts with the checkpoint's names still load, and the per-forward batch metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dsv4.checkpoint import write_random_checkpoint
from dsv4.config import CSA, HCA, SLIDING, QuantConfig
from dsv4.embedded import embedded_model_config
from dsv4.engine.forward_batch import ForwardBatch
from dsv4.model.attention import BatchMeta, ring_rows
from dsv4.model.deepseek_v4 import DeepseekV4
from dsv4.model.layers import ModelOptions
from dsv4.model.x_proj import XProjection, fp8_fusable, x_parts
from dsv4.ops.quant import act_quant_sim, e8m0_to_float
from dsv4.weights import WeightLoadError, _RowLedger, checkpoint_tensors, fused_placements, load_weights

TINY = embedded_model_config().replace(num_mtp_layers=0)
# wq_a 128 + wkv 128 rows: whole FP8 scale blocks, so native FP8 parts share one weight
ALIGNED = TINY.replace(hidden_size=128, q_lora_rank=128, head_dim=128, num_heads=2, o_lora_rank=64, rope_dim=32,
                       quantization=QuantConfig(), expert_dtype="fp8")


def _stored(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in path.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def _model(cfg, path: Path, dtype: torch.dtype, weight_format: str = "dequant") -> DeepseekV4:
    m = DeepseekV4(cfg, dtype, ModelOptions(ops="ref", quant_sim=False, weight_format=weight_format),
                   with_mtp=False).eval()
    load_weights(m, cfg, path, progress=False, weight_format=weight_format)
    return m


def test_parts_per_layer_kind() -> None:
    names = {k: [p.name for p in x_parts(TINY, TINY.layer_kinds.index(k))] for k in (SLIDING, CSA, HCA)}
    assert names[SLIDING] == ["wq_a", "wkv"]
    assert names[HCA] == ["wq_a", "wkv", "compressor.wkv", "compressor.wgate"]
    assert names[CSA] == ["wq_a", "wkv", "indexer.weights_proj", "compressor.wkv", "compressor.wgate",
                          "indexer.compressor.wkv", "indexer.compressor.wgate"]
    assert fp8_fusable(x_parts(ALIGNED, 1)) and not fp8_fusable(x_parts(TINY, 1))  # wq_a: 32 rows


def test_fused_rows_are_the_checkpoint_tensors(tmp_path: Path) -> None:
    """bf16 dequant: every row block of x_proj.weight is its stored tensor; native FP8: bytes and scales."""
    ckpt = write_random_checkpoint(TINY, tmp_path / "plain", seed=2)
    stored, sd = _stored(ckpt), _model(TINY, ckpt, torch.bfloat16).state_dict()
    specs = checkpoint_tensors(TINY)
    placed = fused_placements(specs)
    assert {pl.param for pl in placed.values()} == {f"layers.{i}.attn.x_proj.weight" for i in range(4)}
    for name, pl in placed.items():
        assert torch.equal(sd[pl.param][pl.row: pl.row + specs[name].shape[0]], stored[name]), name
    assert sd["layers.1.attn.x_proj.weight"].shape[0] == sum(p.rows for p in x_parts(TINY, 1))

    qckpt = write_random_checkpoint(ALIGNED, tmp_path / "fp8", seed=3)
    stored, sd = _stored(qckpt), _model(ALIGNED, qckpt, torch.bfloat16, "native").state_dict()
    specs = checkpoint_tensors(ALIGNED)
    placed = fused_placements(specs, "native")
    assert placed["layers.1.attn.wkv.weight"] == ("layers.1.attn.x_proj.fp8.weight", 128,
                                                  "layers.1.attn.x_proj.fp8.scale", 1)
    for name, pl in placed.items():
        rows = specs[name].shape[0]
        got = sd[pl.param][pl.row: pl.row + rows]
        if pl.scale is None:
            assert torch.equal(got, stored[name]), name
            continue
        assert got.dtype == torch.float8_e4m3fn and torch.equal(got.view(torch.uint8), stored[name].view(torch.uint8))
        s = sd[pl.scale][pl.scale_row: pl.scale_row + rows // 128]
        assert torch.equal(s, e8m0_to_float(stored[name[: -len("weight")] + "scale"])), name


@pytest.mark.parametrize("weight_format", ["dequant", "native"])
def test_load_state_dict_takes_checkpoint_names(tmp_path: Path, weight_format: str) -> None:
    """A state dict under the checkpoint's names (wq_a, compressor.wkv, ...) loads strictly into the fused model."""
    ckpt = write_random_checkpoint(ALIGNED, tmp_path / "c", seed=4)
    a = _model(ALIGNED, ckpt, torch.float32, weight_format)
    specs = checkpoint_tensors(ALIGNED)
    placed = fused_placements(specs, weight_format)
    state = {k: v for k, v in a.state_dict().items() if ".x_proj." not in k}
    for name, pl in placed.items():
        rows = specs[name].shape[0]
        state[name] = a.state_dict()[pl.param][pl.row: pl.row + rows].clone()
        if pl.scale is not None:
            state[name[: -len("weight")] + "scale"] = a.state_dict()[pl.scale][pl.scale_row: pl.scale_row + rows // 128]
    b = DeepseekV4(ALIGNED, torch.float32, ModelOptions(ops="ref", quant_sim=False, weight_format=weight_format),
                   with_mtp=False)
    b.load_state_dict(state, strict=True)
    for k, v in a.state_dict().items():
        assert torch.equal(v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v,
                           b.state_dict()[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else b.state_dict()[k]), k


def test_row_ledger_names_gaps_and_overlaps() -> None:
    targets = {"p": torch.zeros(8, 2)}
    for spans, needle in (([(0, 3), (4, 8)], "rows 3..3 are not loaded"), ([(0, 5), (4, 8)], "overlapping"),
                          ([(0, 6)], "rows 6..7 are not loaded")):
        ledger = _RowLedger()
        for a, b in spans:
            ledger.rows(targets, "p", a, b - a, f"t{a}", fused=True)
        with pytest.raises(WeightLoadError, match=needle):
            ledger.check(targets)
    ledger = _RowLedger()
    ledger.rows(targets, "p", 4, 4, "b", fused=True)
    ledger.rows(targets, "p", 0, 4, "a", fused=True)
    ledger.check(targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_quant", [False, True])
def test_outputs_are_each_parts_own_gemm(dtype: torch.dtype, act_quant: bool) -> None:
    """Activation-dtype parts: their own GEMM in the activation dtype; compressor parts: the fp32 GEMM of the
    upcast input (as the separate fp32 modules computed); FP8-stored parts see act_quant's rounded input."""
    parts = x_parts(TINY, 1)
    xp = XProjection(parts, TINY.hidden_size, dtype, act_quant)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        xp.weight.copy_(torch.randn(xp.weight.shape, generator=g) * 0.1)
    x = torch.randn(5, TINY.hidden_size, generator=g).to(dtype)
    out, row = xp(x), 0
    for p in parts:
        w = xp.weight[row: row + p.rows]
        row += p.rows
        xin = act_quant_sim(x, 128) if act_quant and p.fp8 else x
        want = F.linear(xin.float(), w.float()) if p.fp32 else F.linear(xin, w)
        got = out[p.name]
        assert got.dtype == (torch.float32 if p.fp32 else dtype) and got.shape == (5, p.rows), p.name
        tol = 1e-6 if dtype == torch.float32 or p.fp32 else 1e-2
        assert ((got.float() - want.float()).abs().max() <= tol * want.float().abs().max()), p.name


def test_batch_meta_ring_rows_once_per_forward() -> None:
    """The shared metadata equals the per-layer computation it replaces, for a mixed batch; computed once."""
    slots, prefix, tokens = [2, 0, 1], [5, 0, 30], [[1], list(range(40)), [3, 4]]
    b = ForwardBatch.build(slots, prefix, tokens)
    meta = BatchMeta(b)
    for ring, window in ((16, 16), (24, 16)):
        want: list[list[int]] = [[], [], [], []]
        for slot, p0, ids in zip(slots, prefix, tokens, strict=True):  # the rule of ring_rows, token by token
            n = len(ids)
            for pos in range(p0, p0 + n):
                dest = slot * ring + pos % ring if pos >= p0 + n - ring else -1
                early = pos < p0 + ring - window + 1
                for lst, v in zip(want, (slot, p0, dest if early else -1, -1 if early else dest), strict=True):
                    lst.append(v)
        got = meta.ring_rows(ring, window)
        assert [x.tolist() for x in got] == want
        assert meta.ring_rows(ring, window) is got and all(
            torch.equal(x, y) for x, y in zip(ring_rows(b, ring, window), got, strict=True))
    assert meta.max_entries(4) == 40 // 4 and meta.max_entries(16) == 2


def test_batch_meta_one_token_each() -> None:
    """Decode batches take the shortcut (no per-token gathers, no store after attention); its rows are the ones
    the general rule gives (every token stored early), whatever the ring slack."""
    b = ForwardBatch.build([2, 0, 1], [5, 0, 30], [[1], [2], [3]])
    meta = BatchMeta(b)
    assert meta.one_each
    for ring, window in ((16, 16), (24, 16)):
        got = meta.ring_rows(ring, window)
        assert got.late is None
        assert got.early.tolist() == [2 * ring + 5, 0, ring + 30 % ring]
        assert got.slot.tolist() == [2, 0, 1] and got.p0.tolist() == [5, 0, 30]
