"""dsv4/engine/sampling_params.py."""

from __future__ import annotations

import dataclasses

import pytest

from dsv4.engine.sampling_params import SamplingParams, stop_ids_for


def test_defaults() -> None:
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (16, 1.0, -1, 1.0, 0.0)
    assert p.seed is None and p.stop == [] and p.stop_token_ids == [] and not p.ignore_eos and p.logprobs is None
    assert not p.greedy and p.top_k_or_off == 0
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=5).top_k_or_off == 5


def test_max_tokens_alias_and_stop_string() -> None:
    assert SamplingParams(max_tokens=7).max_new_tokens == 7
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams.from_dict({"max_tokens": 3, "temperature": 0}).max_new_tokens == 3
    with pytest.raises(ValueError, match="unknown field `best_of`"):
        SamplingParams.from_dict({"best_of": 2})


def test_frozen_and_replace() -> None:
    stop = ["a"]
    p = SamplingParams(stop=stop)
    stop.append("b")
    assert p.stop == ["a"]  # own copy
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    q = p.replace(temperature=0.0, max_tokens=4)
    assert q.greedy and q.max_new_tokens == 4 and q.stop == ["a"]
    with pytest.raises(ValueError, match="top_p"):
        p.replace(top_p=0)


@pytest.mark.parametrize("kw, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"min_p": -0.01}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_tokens": -1}, "max_new_tokens"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"seed": -1}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-3]}, "stop_token_ids"),
    ({"ignore_eos": 1}, "ignore_eos"),
])
def test_bad_values_name_the_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} "):
        SamplingParams(**kw)  # type: ignore[arg-type]


def test_edges_accepted() -> None:
    SamplingParams(temperature=0, top_p=1, min_p=1, top_k=0, logprobs=0, max_new_tokens=1, seed=0)
    SamplingParams(logprobs=20, top_k=-1, min_p=0)


def test_vocab_check_and_stop_ids() -> None:
    p = SamplingParams(stop_token_ids=[5, 99])
    p.validate(vocab_size=100)
    with pytest.raises(ValueError, match="stop_token_ids"):
        p.validate(vocab_size=99)
    assert stop_ids_for(p, (1,)) == {1, 5, 99}
    assert stop_ids_for(p.replace(ignore_eos=True), (1,)) == {5, 99}
