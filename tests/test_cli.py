"""`dsv4 generate` as a real subprocess on the embedded tiny model (the user cache points at a tmp dir)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HELLO_IDS = [0] + [3 + b for b in b"Hello"]  # the byte tokenizer's encoding of "Hello" (with BOS)


@pytest.fixture(scope="module")
def xdg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xdg-cli")


def run(xdg: Path, *args: str, exe: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(xdg)}
    cmd = (exe or [sys.executable, "-m", "dsv4"]) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def assert_user_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, nothing on stdout, no traceback, and exactly one error line that holds every needle."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout == ""
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, r.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def test_generate_hello(xdg: Path) -> None:
    r = run(xdg, "generate", "Hello", "--max-new-tokens", "16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stdout.endswith("\n")
    assert "loading" in r.stderr and "loading" not in r.stdout  # progress goes to stderr only
    assert (xdg / "dsv4").is_dir()  # the embedded model was written into the given cache
    # sampling (temperature 1 by default) is seeded: a second run prints the same text
    again = run(xdg, "generate", "Hello", "--max-new-tokens", "16")
    assert again.returncode == 0 and again.stdout == r.stdout


def test_generate_json(xdg: Path) -> None:
    r = run(xdg, "generate", "Hello", "World", "--max-new-tokens", "16", "--json", "--ignore-eos",
            "--temperature", "0")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [d["prompt"] for d in lines] == ["Hello", "World"]
    assert lines[0]["prompt_token_ids"] == HELLO_IDS
    for d in lines:
        assert len(d["token_ids"]) == 16 and d["finish_reason"] == "length"
        assert all(isinstance(t, int) and 0 <= t < 512 for t in d["token_ids"])
        assert d["logprobs"] is None
    assert lines[0]["token_ids"] != lines[1]["token_ids"]

    # --token-ids: the same ids as "Hello" give the same greedy tokens; 5,6,7 is a prompt of its own
    t = run(xdg, "generate", "--token-ids", "5,6,7", ",".join(map(str, HELLO_IDS)), "--max-new-tokens", "16",
            "--json", "--ignore-eos", "--temperature", "0", "--logprobs", "2")
    assert t.returncode == 0, t.stderr
    a, b = (json.loads(line) for line in t.stdout.splitlines())
    assert a["prompt"] is None and a["prompt_token_ids"] == [5, 6, 7] and len(a["token_ids"]) == 16
    assert b["prompt_token_ids"] == HELLO_IDS and b["token_ids"] == lines[0]["token_ids"]
    assert len(b["logprobs"]) == 16 and all(len(top) == 2 for top in b["top_logprobs"])
    # greedy: each token is the top alternative, with the same logprob
    for tok, lp, top in zip(b["token_ids"], b["logprobs"], b["top_logprobs"], strict=True):
        best = max(top, key=top.get)
        assert int(best) == tok and top[best] == lp


def test_bad_temperature(xdg: Path) -> None:
    r = run(xdg, "generate", "Hello", "--temperature", "-1")
    assert_user_error(r, "temperature")
    assert len(r.stderr.strip().splitlines()) == 1  # fails before loading anything


def test_missing_model(xdg: Path) -> None:
    r = run(xdg, "generate", "Hello", "--model", "/nonexistent")
    assert_user_error(r, "/nonexistent")
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["invalid json", "bad field", "no weights", "bad tokenizer"])
def test_broken_model_dir(xdg: Path, tmp_path: Path, case: str) -> None:
    from dsv4.embedded import embedded_model_config

    model = tmp_path / "model"
    model.mkdir()
    cfg = embedded_model_config().to_hf_dict()
    if case == "invalid json":
        text, needles = '{"hidden_size": 64,', [str(model / "config.json"), "not valid JSON"]
    elif case == "bad field":
        text, needles = json.dumps({**cfg, "o_groups": 3}), [str(model / "config.json"), "`o_groups`"]
    elif case == "no weights":
        text, needles = json.dumps(cfg), [str(model), "safetensors"]
    else:
        (model / "tokenizer.json").write_text('{"version": "1.0"')
        text, needles = json.dumps(cfg), [str(model / "tokenizer.json")]
    (model / "config.json").write_text(text)
    assert_user_error(run(xdg, "generate", "Hello", "--model", str(model), "--device", "cpu"), *needles)


def test_console_script_help(xdg: Path) -> None:
    exe = shutil.which("dsv4", path=str(Path(sys.executable).parent))
    assert exe is not None, "the dsv4 console script is not installed next to this python (pip install -e .)"
    r = run(xdg, "generate", "--help", exe=[exe])
    assert r.returncode == 0, r.stderr
    for flag in ("--max-new-tokens", "--temperature", "--json", "--token-ids", "--model-path", "--ignore-eos"):
        assert flag in r.stdout
