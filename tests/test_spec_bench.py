"""benchmarks/spec_decode.py in its CPU smoke mode (tiny widths): card, rows, JSON line; a draft that is always
right is fully accepted, one never right never is, and every output equals plain greedy."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the smoke mode is the CPU run; on a GPU the script builds the Flash widths")


def _load():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "spec_decode.py"
    spec = importlib.util.spec_from_file_location("spec_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke(capsys):
    result = _load().main(["--ks", "2", "--batches", "1,2", "--ps", "0,1"])
    out = capsys.readouterr().out
    assert out.startswith("# spec_decode bench: device=cpu")
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    rows = {(r["batch"], r["draft"]): r for r in result["rows"]}
    assert set(rows) == {(b, d) for b in (1, 2) for d in ("plain", "mtp", "p=0", "p=1")}
    assert all(r["same"] for r in result["rows"])
    for b in (1, 2):
        assert rows[(b, "p=1")]["acc"] == 1.0 and rows[(b, "p=0")]["acc"] == 0.0
        assert rows[(b, "plain")]["speedup"] == 1.0 and rows[(b, "p=1")]["tok_s"] > 0
