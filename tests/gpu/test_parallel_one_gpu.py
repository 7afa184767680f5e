"""TP=2 / EP=2 on ONE GPU: two ranks share cuda:0 and talk over gloo (NCCL refuses two ranks on one device).

This runs every sharded GPU kernel path (half the query heads per rank, sliced experts and shared expert, fp32
MoE partials, vocab-parallel head) without a second GPU, so a sharding or kernel-shape bug shows up on a one-GPU
machine. Gloo collectives cannot be captured in a CUDA graph: the forwards run eagerly. The same Flash-shaped
model and comparison as tests/gpu/test_distributed_gpu.py.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv4.checkpoint import write_random_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_here = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, cfg_dict: dict, out: str, err: str) -> None:
    import sys

    sys.path.insert(0, str(_here))
    from test_distributed_gpu import logits_and_tokens

    from dsv4.distributed.batch_sync import send_stop
    from dsv4.distributed.follower import follow
    from dsv4.distributed.parallel import from_world
    from dsv4.engine.engine_config import EngineConfig

    try:
        torch.cuda.set_device(0)
        config = EngineConfig(**cfg_dict)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank)
        if rank == 0:
            logits_and_tokens((out,), config)
            send_stop(from_world(config.tp_size, config.ep_size))
        else:
            follow(config)
    except BaseException:
        Path(f"{err}.{rank}").write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import sys

    sys.path.insert(0, str(_here))
    from test_distributed_gpu import CFG

    return write_random_checkpoint(CFG, tmp_path_factory.mktemp("flash2_one_gpu"), seed=0)  # plain bf16: see test_distributed_gpu's docstring


def _config(ckpt: Path, dtype: str, tp: int = 1, ep: int = 1):
    import sys

    sys.path.insert(0, str(_here))
    from test_distributed_gpu import engine_config

    return dataclasses.replace(engine_config(ckpt, dtype, tp, ep), disable_cuda_graph=True)


@pytest.mark.parametrize(("tp", "ep"), [(2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize(("dtype", "tol"), [("bfloat16", 2e-2), ("float32", 1e-4)])
def test_two_ranks_on_one_gpu_match_one(ckpt: Path, tmp_path: Path, tp: int, ep: int, dtype: str, tol: float) -> None:
    import sys

    sys.path.insert(0, str(_here))
    from test_distributed_gpu import check_parallel, single

    want = single(ckpt, tmp_path, dtype)
    fp32 = want if dtype == "float32" else single(ckpt, tmp_path, "float32")
    out, err = tmp_path / "par.pt", tmp_path / "err"
    cfg = dataclasses.asdict(_config(ckpt, dtype, tp, ep))
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, cfg, str(out), str(err))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for r in range(2):
        if Path(f"{err}.{r}").exists():
            pytest.fail(f"rank {r} failed:\n{Path(f'{err}.{r}').read_text()[-3000:]}")
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    check_parallel(torch.load(out), want, fp32, dtype, tol, f"one GPU, gloo, TP={tp} EP={ep}")
