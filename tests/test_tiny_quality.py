"""Quality gates of the shipped trained tiny model (dsv4/data/tiny_v4), on CPU through the engine's reference path.

The numbers come from the model's train_report.json, written by tools/train_tiny.py from the same files: the
held-out loss over a fixed slice of the held-out split (its token ids are recorded in the report, so the
corpus need not be present), the fixed greedy sample, and the FP8 KV cache (quant_sim) perplexity.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from tiny_common import engine_heldout_loss, greedy_sample  # noqa: E402

from dsv4.embedded import SHIPPED_DIR, shipped_model_dir  # noqa: E402

pytestmark = pytest.mark.skipif(shipped_model_dir() is None, reason="no shipped trained model in this install")


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads((SHIPPED_DIR / "train_report.json").read_text())


def test_heldout_perplexity_matches_report(report: dict) -> None:
    windows = report["heldout_windows"]
    ppl = math.exp(engine_heldout_loss(SHIPPED_DIR, windows))
    assert abs(ppl / report["heldout_ppl"] - 1) < 0.005, (ppl, report["heldout_ppl"])
    assert ppl < 60  # trained: a uniform guess over 4096 ids is 4096
    fp8 = math.exp(engine_heldout_loss(SHIPPED_DIR, windows, quant_sim=True))
    assert abs(fp8 / ppl - 1) < 0.01, (fp8, ppl)


def test_greedy_sample_reproduced(report: dict) -> None:
    ids, text = greedy_sample(SHIPPED_DIR)
    assert ids == report["greedy_token_ids"]
    assert text == report["greedy_text"]


def test_default_model_is_the_shipped_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsv4.embedded import embedded_model_dir

    monkeypatch.setenv("DSV4_EMBEDDED", "")
    assert embedded_model_dir() == SHIPPED_DIR
