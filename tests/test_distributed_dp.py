"""Data-parallel attention on CPU: gloo ranks on loopback, DP-attention=2 with EP=2 (and EP=4: groups of two
ranks) for the experts.

The two attention groups run different requests with caches of their own; the logits and greedy outputs are
the one-process ones (fp32: only the summation order of the MoE partials differs). Steps where one group has no
request (a lone request, and the tail of requests that outlive the others) must not hang. A rank that fails
stops the other in bounded time.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import rel_err
from test_distributed import CFG, CHUNKS, PROMPTS, ckpt, engine_config  # noqa: F401  (ckpt: the fixture)

from dsv4 import LLM, EngineConfig, SamplingParams
from dsv4.distributed.dp_attention import DPCacheManager
from dsv4.distributed.launch import RankFailedError, launch
from dsv4.distributed.parallel import ParallelConfigError, check_model, layout
from dsv4.engine.forward_batch import ForwardBatch

# different lengths and budgets: both groups get requests, and one group runs out of work first
MORE = [*PROMPTS, [11, 12, 13], [(3 * i) % 301 for i in range(50)]]
MAX_NEW = [9, 3, 6, 12, 2]


def dp_config(model: Path, **kw: int) -> EngineConfig:
    return EngineConfig(**{**engine_config(model).__dict__, "ep_size": 2, "dp_size": 2, "enable_dp_attention": True,
                           **kw})


def dp_run(args: tuple[str], config: EngineConfig) -> int:
    """Logits of PROMPTS[0] alone (chunks, then decode: group 1 idle), then the greedy outputs of MORE at once
    (requests per group recorded at admission); saved to ``args[0]``."""
    llm = LLM(config, progress=False)
    runner, mgr = llm.runner, llm.runner.cache_manager
    slot, ids, rows, p = mgr.alloc(), list(PROMPTS[0]), [], 0
    for n in CHUNKS + [1] * 3:
        if p + n > len(ids):
            ids.append(int(rows[-1][-1].argmax()))
        mgr.reserve(slot, p + n)
        rows.append(runner.forward(ForwardBatch.build([slot], [p], [ids[p : p + n]], all_logits=True))[0])
        p += n
    mgr.free(slot)
    groups: list[int] = []
    if isinstance(mgr, DPCacheManager):
        alloc = mgr.alloc

        def recording_alloc(fit_tokens: int = 0) -> int:
            s = alloc(fit_tokens)
            groups.append(mgr.group_of(s))
            return s

        mgr.alloc = recording_alloc  # type: ignore[method-assign]
    params = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in MAX_NEW]
    outs = llm.generate(MORE, params)
    replays = runner.graphs.replays if runner.graphs is not None else 0
    torch.save({"logits": torch.cat(rows), "tokens": [o.token_ids for o in outs], "groups": groups,
                "replays": replays}, args[0])
    return 0


def follower_fails_mid_run(args: tuple[str], config: EngineConfig) -> int:
    """Serve two requests (one per group), then hand group 1 a cache call its rank cannot replay: rank 1 raises
    while rank 0 goes on into the step's collectives."""
    llm = LLM(config, progress=False)
    llm.generate(MORE[:2], SamplingParams(max_new_tokens=2, temperature=0.0))
    llm.runner.cache_manager.managers[1].pending.append(("boom", ()))  # type: ignore[attr-defined]
    llm.generate(MORE[:2], SamplingParams(max_new_tokens=2, temperature=0.0))
    return 0


@pytest.fixture(scope="module")
def single_dp(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811
    out = tmp_path_factory.mktemp("single_dp") / "out.pt"
    assert dp_run((str(out),), engine_config(ckpt)) == 0
    return torch.load(out)


def test_dp_layout_and_config_checks() -> None:
    p = layout(1, 2, 1, dp_size=2)  # 2 ranks, each its own attention group and its own expert range
    assert (p.tp_size, p.dp_size, p.dp_rank, p.ep_rank) == (1, 2, 1, 1)
    p = layout(4, 4, 3, dp_size=2)  # 4 ranks: groups {0,1} {2,3}, attention TP 2 inside each
    assert (p.tp_size, p.tp_rank, p.dp_size, p.dp_rank, p.ep_rank) == (2, 1, 2, 1, 3)
    with pytest.raises(ParallelConfigError, match="--dp-size 3 must divide the 4 ranks"):
        layout(4, 4, 0, dp_size=3)
    with pytest.raises(ParallelConfigError, match="query heads do not split over 4 ranks"):
        check_model(CFG.replace(num_heads=6), layout(8, 8, 0, dp_size=2))
    assert EngineConfig(ep_size=2, dp_size=2, enable_dp_attention=True).attn_dp_size == 2
    for kw, match in (({"ep_size": 2, "dp_size": 2}, "--dp-size > 1 needs --enable-dp-attention"),
                      ({"ep_size": 2, "enable_dp_attention": True}, "--dp-size must be > 1"),
                      ({"ep_size": 4, "dp_size": 3, "enable_dp_attention": True}, "--dp-size must divide the 4"),
                      ({"dp_size": 2, "enable_dp_attention": True}, "--dp-size must divide the 1 ranks"),
                      ({"dp_size": 0}, "--dp-size must be an integer >= 1")):
        with pytest.raises(ValueError, match=match):
            EngineConfig(**kw)  # type: ignore[arg-type]
    # one line, the flag named (what `dsv4 generate` prints as its error)
    with pytest.raises(ValueError) as e:
        EngineConfig(ep_size=2, dp_size=2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("ep", [2, 4], ids=["2ranks", "4ranks-attn-tp2"])
def test_dp_attention_matches_one_process(ckpt: Path, single_dp: dict, tmp_path: Path, ep: int) -> None:  # noqa: F811
    """ep 2: two ranks, one per group; ep 4: four ranks, two groups of two (attention TP inside each, the MoE
    output all-reduced and sliced)."""
    out = tmp_path / "out.pt"
    t0 = time.monotonic()
    assert launch(dp_run, (str(out),), dp_config(ckpt, ep_size=ep), grace_s=5) == 0
    got = torch.load(out)
    assert got["logits"].shape == single_dp["logits"].shape == (sum(CHUNKS) + 3, CFG.vocab_size)
    assert rel_err(got["logits"], single_dp["logits"]).max() <= 1e-5
    assert got["tokens"] == single_dp["tokens"]
    assert [len(t) for t in got["tokens"]] == MAX_NEW
    # both groups served requests (each holds 2 of the 4 slots: max_running_requests 4 over 2 groups)
    assert sorted(set(got["groups"])) == [0, 1], got["groups"]
    assert time.monotonic() - t0 < 90


def test_dp_follower_failing_stops_rank_0(ckpt: Path, capfd: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """Rank 1 fails in the middle of serving, as rank 0 waits for it in a collective: the launcher stops rank 0
    and names rank 1, in bounded time, with rank 1's error on stderr."""
    t0 = time.monotonic()
    with pytest.raises(RankFailedError) as e:
        launch(follower_fails_mid_run, (), dp_config(ckpt), grace_s=2)
    assert e.value.rank == 1 and "rank 1 failed" in str(e.value)
    assert "unknown cache operation 'boom'" in capfd.readouterr().err
    assert time.monotonic() - t0 < 60


def _graph_rank(rank: int, ep: int, port: int, model: str, out: str) -> None:
    """One of ``ep`` ranks (DP attention 2, EP ``ep``) with decode "graphs" of buckets 1 and 2: off CUDA a replay runs
    the captured function on the static buffers, so the buckets, the padding and the idle group's rows are the
    GPU's."""
    from dsv4.distributed.batch_sync import send_stop
    from dsv4.distributed.follower import follow
    from dsv4.distributed.parallel import from_world
    from dsv4.engine import model_runner

    model_runner.dp_graph_max_bs = lambda cfg: 2  # type: ignore[attr-defined]  (graph_max_bs is 0 on CPU)
    torch.set_num_threads(1)  # as the launcher does: a core per rank
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=ep, rank=rank,
                            timeout=timedelta(seconds=60))
    config = dp_config(Path(model), ep_size=ep)
    if rank == 0:
        dp_run((out,), config)
        send_stop(from_world(config.tp_size, ep, 2))
    else:
        follow(config)
    os._exit(0)  # no process-group teardown (it can wait on a peer that already left: dsv4/distributed/launch.py)


@pytest.mark.parametrize("ep", [2, 4], ids=["2ranks", "4ranks-attn-tp2"])
def test_dp_attention_decode_graphs(ckpt: Path, single_dp: dict, tmp_path: Path, ep: int) -> None:  # noqa: F811
    """Decode steps replay one bucket on every rank: the lone request's steps (bucket 1, group 1 all padding)
    and the batch's (bucket 2, the smaller group padded); the logits and tokens are the one-process ones."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    mp.spawn(_graph_rank, args=(ep, port, str(ckpt), str(tmp_path / "out.pt")), nprocs=ep)
    got = torch.load(tmp_path / "out.pt")
    assert rel_err(got["logits"], single_dp["logits"]).max() <= 1e-5
    assert got["tokens"] == single_dp["tokens"]
    # the lone request's 3 decode steps and the batch's (a step that prefills a late request runs eagerly)
    assert got["replays"] >= 3 + 8, got["replays"]
    assert time.monotonic() - t0 < 60
