"""Stop rules of one request, driven token by token through a byte-level tokenizer."""

from __future__ import annotations

from dsv4.engine.request import Request
from dsv4.engine.sampling_params import SamplingParams, stop_ids_for
from dsv4.tokenizer import ByteTokenizer, IncrementalDetokenizer


def _req(**kw) -> Request:
    tok = ByteTokenizer(300)
    params = SamplingParams(**kw)
    return Request(0, None, [0], params, stop_ids_for(params, (1,)), IncrementalDetokenizer(tok, [0]))


def _feed(r: Request, text: str) -> None:
    for b in text.encode():
        if r.finish_reason:
            return
        r.append(3 + b)


def test_stop_string_across_tokens_earliest_wins():
    r = _req(max_new_tokens=50, stop=["zzz", "lo w"])
    _feed(r, "hello world zzz")
    assert r.finish_reason == "stop" and r.text == "hel"
    assert r.output_ids[-1] == 3 + ord("w")


def test_earliest_of_several_stop_strings_in_one_step():
    r = _req(max_new_tokens=50, stop=["cd", "bcd"])
    _feed(r, "abcd")
    assert r.text == "a"


def test_multibyte_text_and_stop_in_final_flush():
    r = _req(max_new_tokens=len("ab€".encode()), stop=["€"])
    _feed(r, "ab€")
    assert (r.finish_reason, r.text) == ("stop", "ab")


def test_stop_id_and_length():
    r = _req(max_new_tokens=3)
    _feed(r, "xyzw")
    assert (r.finish_reason, r.text, len(r.output_ids)) == ("length", "xyz", 3)
    r = _req(max_new_tokens=10)
    _feed(r, "xy")
    r.append(1)  # EOS
    assert (r.finish_reason, r.text) == ("stop", "xy")
    r = _req(max_new_tokens=10, ignore_eos=True)
    r.append(1)
    assert r.finish_reason is None
