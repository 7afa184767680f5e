"""One command, many ranks: ``dsv4 generate``/``dsv4 serve`` with ``--tp-size``/``--ep-size`` > 1 start one
process per local rank (one per GPU, or CPU processes) and supervise them.

Rank 0 runs the command itself (engine, scheduler, server) and sends each forward's batch to the others
(:mod:`dsv4.distributed.batch_sync`); the others run :func:`~dsv4.distributed.follower.follow`. The ranks meet
through torch.distributed's TCP rendezvous at ``--dist-init-addr`` (node 0; one node picks a free local port),
``--nnodes``/``--node-rank`` place this machine's ranks. Shutdown: when rank 0's command returns, the
followers are told to stop; when any rank fails (raises, or dies), the launcher stops every other rank of
this node (SIGTERM, then SIGKILL after a grace period) and exits with an error naming the rank; Ctrl-C or
SIGTERM to the launcher gives rank 0 the grace period to shut down and then stops them all.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv4.config import ModelConfig
from dsv4.distributed.parallel import DATA_TIMEOUT, check_model, from_world, layout
from dsv4.engine.engine_config import EngineConfig

EXIT_USAGE = 2  # what dsv4.cli returns for a user error
GRACE_S = 10.0  # how long ranks get to exit on their own before they are terminated, then killed

Target = Callable[[Any, EngineConfig], int]


class RankFailedError(RuntimeError):
    """A rank raised or died; every other rank of this node has been stopped."""

    def __init__(self, rank: int, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.rank, self.exit_code = rank, exit_code


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(target: Target, args: Any, config: EngineConfig, grace_s: float = GRACE_S) -> int:
    """Run ``target(args, config)`` as rank 0 of ``config.world_size`` ranks; returns rank 0's exit status.

    ``target`` must be picklable (a module-level function, or a partial of one: the ranks are spawned
    processes) and return an exit status. Raises :class:`RankFailedError` when a rank fails (the others are
    stopped first: ``grace_s`` to exit on their own, as long again after SIGTERM, then SIGKILL).
    """
    if config.model is None:
        # written once here: ranks resolving the embedded model at the same time would race to write it
        from dsv4.embedded import embedded_model_dir

        config = dataclasses.replace(config, model=str(embedded_model_dir()))
    # a layout the model cannot take fails here, once, rather than in every rank
    model_cfg = ModelConfig.from_json(Path(config.model))  # type: ignore[arg-type]
    check_model(model_cfg, layout(config.tp_size, config.ep_size, 0, config.attn_dp_size))
    nprocs = config.world_size // config.nnodes
    addr = config.dist_init_addr or f"127.0.0.1:{free_port()}"
    ctx = mp.start_processes(_rank_main, args=(target, args, config, addr, nprocs), nprocs=nprocs, join=False,
                             start_method="spawn")
    first = config.node_rank * nprocs

    class Terminated(Exception):
        pass

    def on_term(signum: int, frame: Any) -> None:
        raise Terminated

    # signal handlers can only be set from the main thread (a launcher driven from a thread has none)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if main else None
    try:
        while not ctx.join(grace_period=grace_s):
            pass
    except KeyboardInterrupt:  # Ctrl-C reached every rank too (one process group): rank 0 shuts down itself
        _stop_all(ctx.processes, None, grace_s)
        return 130
    except Terminated:  # only the launcher was told: pass it on to rank 0 (a server stops gracefully)
        _stop_all(ctx.processes, signal.SIGTERM, grace_s)
        return 143
    except mp.ProcessExitedException as e:
        rank = first + e.error_index
        if rank == 0 and e.exit_code == EXIT_USAGE:
            return e.exit_code  # rank 0's command reported a user error itself
        why = f"exit status {e.exit_code}" if e.exit_code >= 0 else f"signal {e.signal_name}"
        raise RankFailedError(rank, f"rank {rank} failed ({why}; its error is above) and every other rank of this "
                              f"node was stopped", e.exit_code) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _stop_all(procs: list, forward: signal.Signals | None, grace_s: float) -> None:
    """Give rank 0 ``forward`` and the grace period to stop the others itself, then terminate, then kill."""
    if forward is not None and procs and procs[0].is_alive():
        os.kill(procs[0].pid, forward)
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _rank_main(local_rank: int, target: Target, args: Any, config: EngineConfig, addr: str, nprocs: int) -> None:
    rank = config.node_rank * nprocs + local_rank
    if rank != 0:
        # the launcher decides when followers stop (rank 0 tells them, or the launcher terminates them)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        # SIGTERM ends rank 0's command as Ctrl-C does, so it still tells the followers to stop (uvicorn passes
        # the signal on to the handler it found once its own graceful shutdown is done)
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        cuda = config.torch_device().type == "cuda"
        if cuda:
            torch.cuda.set_device(local_rank)
            config = dataclasses.replace(config, device=f"cuda:{local_rank}")
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{addr}",
                                world_size=config.world_size, rank=rank, timeout=DATA_TIMEOUT)
        if rank == 0:
            code = target(args, config)
            if code:
                _exit(code)
            from dsv4.distributed.batch_sync import send_stop

            send_stop(from_world(config.tp_size, config.ep_size, config.attn_dp_size))
        else:
            from dsv4.distributed.follower import follow

            follow(config)
    except KeyboardInterrupt:
        _exit(130)
    except BaseException:
        print(f"dsv4: rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, end="")
        _exit(1)
    atexit._run_exitfuncs()  # Python-level cleanup still runs on success (e.g. multiprocessing's semaphores)
    _exit(0)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _exit(code: int) -> None:
    # NOTE: a rank ends without tearing down its process groups or the interpreter: after a failure, a teardown
    # whose peers are gone or stuck in a collective can block while the launcher waits for this exit; after
    # success, rank 0 (the rendezvous store's host) may be gone while a peer still tears down (seen once: a C++
    # abort at exit). The OS frees the sockets and the device; every output was written and flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
