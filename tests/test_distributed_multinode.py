"""Two "nodes" on loopback: ``dsv4 generate --nnodes 2 --node-rank {0,1} --dist-init-addr 127.0.0.1:PORT`` as two
separate commands (one gloo rank each) print what one process prints; data-parallel attention over the two
nodes (each node one attention group, the experts split between them)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed import ckpt  # noqa: F401  (the fixture)

from dsv4.distributed.launch import free_port


def test_two_nodes_print_what_one_process_prints(ckpt: Path, capfd: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    from dsv4.cli import main

    argv = ["generate", "--model", str(ckpt), "--device", "cpu", "--dtype", "float32", "--max-model-len", "128",
            "--token-ids", "--json", "--temperature", "0", "--max-new-tokens", "5", "1,2,3,4,5,6,7,8,9", "300,2",
            "7,7,7"]
    assert main(argv) == 0
    want = capfd.readouterr().out
    flags = ["--ep-size", "2", "--dp-size", "2", "--enable-dp-attention", "--nnodes", "2",
             "--dist-init-addr", f"127.0.0.1:{free_port()}"]
    t0 = time.monotonic()
    nodes = [subprocess.Popen([sys.executable, "-m", "dsv4", *argv, *flags, "--node-rank", str(r)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    try:
        outs = [p.communicate(timeout=150) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    (out1, err1), (out0, err0) = outs
    assert [p.returncode for p in nodes] == [0, 0], (err0, err1)
    assert out0 == want and len(want.splitlines()) == 3
    assert out1 == ""  # node 1 only runs rank 1: it prints nothing
    assert time.monotonic() - t0 < 150
