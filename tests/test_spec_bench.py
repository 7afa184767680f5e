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
    result = _load().main(["--ks", "2", "--batches", "2", "--ps", "0,1"])
    out = capsys.readouterr().out
    assert out.startswith("# spec_decode bench: device=cpu")
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    rows = {(r["batch"], r["draft"]): r for r in result["rows"]}
    assert set(rows) == {(2, d) for d in ("plain", "mtp", "p=0", "p=1")}
    assert all(r["same"] for r in result["rows"])
    assert rows[(2, "p=1")]["acc"] == 1.0 and rows[(2, "p=0")]["acc"] == 0.0
    assert rows[(2, "plain")]["speedup"] == 1.0 and rows[(2, "p=1")]["tok_s"] > 0


def test_breakdown_with_graph_runners(capsys, monkeypatch):
    """--breakdown through the CUDA-graph runners on the CPU (their "replays" run eagerly on the static buffers):
    every verify step replays the verify graph, tails included (k = 3 drafts cut short by max_tokens); the only
    eager target forward of a run is its prefill."""
    from dsv4.engine.engine_config import EngineConfig

    monkeypatch.setattr(EngineConfig, "graph_max_bs", lambda self: min(2, self.max_running_requests))
    result = _load().main(["--ks", "3", "--batches", "2", "--ps", "1", "--tokens", "8", "--breakdown"])
    out = capsys.readouterr().out
    assert "#   breakdown k=3 batch=2 p=1: " in out
    rows = {r["draft"]: r for r in result["rows"]}
    assert all(r["same"] for r in rows.values()) and rows["p=1"]["acc"] == 1.0
    for name in ("mtp", "p=1"):
        bd = rows[name]["breakdown"]
        assert bd["verify_steps"] > 0 and bd["verify_graph"] == bd["verify_steps"], bd
        assert bd["eager_forwards"] == 1 and bd["step_ms"] > 0 and bd["forward_ms"] > 0 and bd["draft_ms"] > 0
    assert rows["plain"]["breakdown"]["decode_steps"] > 0


def test_verify_step_syncs_once(capsys):
    """--count: one verify step (k = 3, batch 2, the graph runners' CPU stand-ins) reads the device once (the
    accepted lengths and samples) and makes no blocking host-to-device copy."""
    result = _load().main(["--count", "--ks", "3", "--batches", "2"])
    assert "# one verify step, k=3, batch 2" in capsys.readouterr().out
    assert result["host read"] == 1 and result["syncs"] == 1, result
    assert result["graph replay"] == 2  # the verify and all three draft steps: one graph each
