"""EngineConfig and the command line generated from it (dsv4/cli.py with a stand-in engine)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from dataclasses import dataclass, field, fields
from pathlib import Path

import pytest

from dsv4.cli import main, parse_token_ids
from dsv4.engine.engine_config import EngineConfig, EngineConfigError, add_cli_args, config_from_args, from_cli
from dsv4.engine.outputs import RequestOutput
from dsv4.engine.sampling_params import SamplingParams


def _parse(*argv: str) -> EngineConfig:
    p = argparse.ArgumentParser()
    add_cli_args(p, EngineConfig)
    return from_cli(p.parse_args(list(argv)))


def test_every_field_has_help_and_a_flag() -> None:
    p = argparse.ArgumentParser()
    add_cli_args(p, EngineConfig)
    text = p.format_help()
    for f in fields(EngineConfig):
        assert f.metadata.get("help"), f.name
        assert f"--{f.name.replace('_', '-')}" in text
    assert "--no-quant-sim" in text and "--model-path" in text


def test_defaults_round_trip() -> None:
    assert _parse() == EngineConfig()


def test_flags_and_aliases() -> None:
    c = _parse("--model-path", "/m", "--dtype", "float32", "--device", "cuda:1", "--seed", "7",
               "--max-running-requests", "8", "--max-model-len", "4096", "--chunked-prefill-size", "512",
               "--kv-cache-dtype", "fp8", "--no-quant-sim", "--ops", "ref")
    assert c == EngineConfig(model="/m", dtype="float32", device="cuda:1", seed=7, max_running_requests=8,
                             max_model_len=4096, chunked_prefill_size=512, kv_cache_dtype="fp8",
                             quant_sim=False, ops="ref")
    assert _parse("--model", "/x").model == "/x"
    assert _parse("--max-model-len", "none").max_model_len is None
    assert _parse("--quant-sim").quant_sim is True


@pytest.mark.parametrize("argv", [["--dtype", "fp16"], ["--ops", "cuda"], ["--max-running-requests", "x"],
                                  ["--kv-cache-dtype", "int8"]])
def test_argparse_rejects(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _parse(*argv)
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("kw, flag", [
    ({"max_running_requests": 0}, "--max-running-requests"),
    ({"chunked_prefill_size": -1}, "--chunked-prefill-size"),
    ({"max_model_len": 0}, "--max-model-len"),
    ({"device": "tpu"}, "--device"),
    ({"dtype": "fp16"}, "--dtype"),
    ({"seed": -1}, "--seed"),
    ({"model": ""}, "--model"),
])
def test_bad_values(kw: dict[str, object], flag: str) -> None:
    with pytest.raises(EngineConfigError, match=flag):
        EngineConfig(**kw)  # type: ignore[arg-type]


def test_resolved_device_and_dtype() -> None:
    import torch

    c = EngineConfig(device="cpu")
    assert c.torch_device() == torch.device("cpu") and c.torch_dtype() == torch.float32
    assert EngineConfig(device="cpu", dtype="bfloat16").torch_dtype() == torch.bfloat16


def test_generic_dataclass() -> None:
    @dataclass(frozen=True)
    class Knobs:
        ratio: float = field(default=0.5, metadata={"help": "a ratio"})
        name: str | None = field(default=None, metadata={"help": "a name", "aliases": ("-n",)})
        fast: bool = field(default=False, metadata={"help": "go fast"})

    p = argparse.ArgumentParser()
    add_cli_args(p, Knobs)
    assert config_from_args(Knobs, p.parse_args(["--ratio", "2", "-n", "a", "--fast"])) == Knobs(2.0, "a", True)


# ---- dsv4 generate with a stand-in LLM -----------------------------------------------------------------
class FakeLLM:
    calls: list[tuple[EngineConfig, list[str | list[int]], list[SamplingParams]]] = []

    def __init__(self, config: EngineConfig, progress: bool = True) -> None:
        self.config = config

    def generate(self, prompts: list[str | list[int]], params: list[SamplingParams],
                 progress: bool = False) -> list[RequestOutput]:
        FakeLLM.calls.append((self.config, prompts, params))
        return [RequestOutput(request_id=i, prompt=p if isinstance(p, str) else None,
                              prompt_token_ids=p if isinstance(p, list) else [0, 1], token_ids=[5, 6],
                              text=f"out{i}", finish_reason="length",
                              logprobs=[-0.5, -1.0] if sp.logprobs is not None else None,
                              top_logprobs=[{5: -0.5}, {6: -1.0}] if sp.logprobs else None)
                for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]


@pytest.fixture
def fake_llm(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    mod = types.ModuleType("dsv4.engine.llm")
    mod.LLM = FakeLLM  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dsv4.engine.llm", mod)
    FakeLLM.calls = []
    return FakeLLM


def test_generate_text(fake_llm: type[FakeLLM], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "Hello", "World", "--max-new-tokens", "2", "--temperature", "0", "--seed", "3",
                 "--ops", "ref"]) == 0
    out, err = capsys.readouterr()
    assert out == "out0\nout1\n" and "loading" in err
    config, prompts, params = fake_llm.calls[0]
    assert config.ops == "ref" and config.seed == 3 and prompts == ["Hello", "World"]
    assert [p.seed for p in params] == [3, 4] and params[0].max_new_tokens == 2 and params[0].greedy


def test_generate_json_token_ids(fake_llm: type[FakeLLM], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--token-ids", "0, 72,105", "--json", "--logprobs", "1", "--max-tokens", "2"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["prompt_token_ids"] == [0, 72, 105] and line["token_ids"] == [5, 6]
    assert line["finish_reason"] == "length" and line["logprobs"] == [-0.5, -1.0]
    assert line["top_logprobs"] == [{"5": -0.5}, {"6": -1.0}]


@pytest.mark.parametrize("argv, needle", [
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--top-p", "0"], "top_p"),
    (["generate", "hi", "--logprobs", "50"], "logprobs"),
    (["generate", "hi", "--max-running-requests", "0"], "--max-running-requests"),
    (["generate", "hi", "--model", "/definitely/not/here"], "no such directory"),
    (["generate", "--token-ids", "1,x"], "--token-ids"),
    (["generate"], "no PROMPT"),
    (["generate", "hi", "--top-k", "many"], "--top-k"),
    (["frobnicate"], "invalid choice"),
])
def test_generate_errors_one_line(argv: list[str], needle: str, fake_llm: type[FakeLLM],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    out, err = capsys.readouterr()
    assert out == "" and needle in err and len(err.strip().splitlines()) == 1, err
    assert fake_llm.calls == []


def test_model_config_error_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from dsv4.config import ConfigError

    class BadLLM(FakeLLM):
        def __init__(self, config: EngineConfig, progress: bool = True) -> None:
            raise ConfigError("config field `head_dim` is missing")

    mod = types.ModuleType("dsv4.engine.llm")
    mod.LLM = BadLLM  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dsv4.engine.llm", mod)
    assert main(["generate", "hi", "--model", str(tmp_path)]) == 2
    assert "head_dim" in capsys.readouterr().err.splitlines()[-1]


def test_parse_token_ids() -> None:
    assert parse_token_ids("1,2, 3") == [1, 2, 3]


def test_python_m_dsv4_help() -> None:
    r = subprocess.run([sys.executable, "-m", "dsv4", "generate", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--model-path" in r.stdout and "--max-new-tokens" in r.stdout


def test_import_dsv4_is_lazy() -> None:
    code = "import sys, dsv4; assert 'torch' not in sys.modules; print(dsv4.SamplingParams().max_new_tokens)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "16", r.stderr
