"""CPU-side pieces of CUDA-graph decode: the buckets, when graphs are used, the padding slot."""

from __future__ import annotations

from harness import new_cache
from oracle import tiny_config

from dsv4.engine.cuda_graph import graph_buckets
from dsv4.engine.engine_config import EngineConfig


def test_buckets():
    assert graph_buckets(1) == [1]
    assert graph_buckets(8) == [1, 2, 4, 8]
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert graph_buckets(40) == [1, 2, 4, 8, 16, 32, 40]


def test_graphs_only_on_cuda_and_capped():
    assert EngineConfig(device="cpu").graph_max_bs() == 0
    assert EngineConfig(device="cuda", disable_cuda_graph=True).graph_max_bs() == 0
    assert EngineConfig(device="cuda", max_running_requests=32).graph_max_bs() == 32
    assert EngineConfig(device="cuda", max_running_requests=512, cuda_graph_max_bs=128).graph_max_bs() == 128


def test_withheld_slot_never_handed_out():
    _, mgr = new_cache(tiny_config(), slots=3)
    pad = mgr.withhold_slot()
    assert pad == 2
    assert sorted(mgr.alloc() for _ in range(2)) == [0, 1]
    assert mgr.num_free_slots == 0
