"""`dsv4 serve` as a user runs it: flag errors in one line, a taken port refused at once, and a real server
process that prints its URL, answers the README's requests and exits cleanly on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from dsv4.cli import main


def test_bad_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and "Traceback" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_process(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "dsv4", "serve", "--port", str(port), "--device", "cpu",
                             "--max-model-len", "512"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        lines = []
        while not any(f"on {url}/v1" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            lines.append(proc.stderr.readline())  # type: ignore[union-attr]
        # the README's curl example, and its openai example
        body = {"model": "dsv4-embedded", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16,
                "temperature": 0}  # greedy: an unseeded sample could hit EOS early
        r = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(body),
                       headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        out = client.chat.completions.create(model="dsv4-embedded", messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=16, temperature=0)
        assert out.choices[0].finish_reason == "length"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    log = [line for line in "".join(lines).splitlines() + err.splitlines() if line.strip()]
    # concise: the loading and URL lines, cache sizes, one line per request, and uvicorn's shutdown notes
    assert sum("chat model=dsv4-embedded" in line for line in log) == 2, log
    assert len(log) <= 12, log
