"""dsv4/chat/parser.py: one-shot parsing (CHAT_FORMAT.md P1-P5 and lenient truncation), and the streaming
parser fed the same texts in every split gives the same result without ever emitting partial markup."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import pytest

from dsv4.chat.parser import ParsedDelta, StreamingParser, parse_output, sequential_ids

D = "｜DSML｜"
EOS = "<｜end▁of▁sentence｜>"
MARKUP = ("</think>", D, EOS, "｜end")


def inv(name: str, *params: str) -> str:
    return f'<{D}invoke name="{name}">\n' + "\n".join(params) + f"\n</{D}invoke>"


def par(name: str, value: str, string: str | None = "true") -> str:
    attr = f' string="{string}"' if string is not None else ""
    return f'<{D}parameter name="{name}"{attr}>{value}</{D}parameter>'


def blk(*invokes: str) -> str:
    return f"\n\n<{D}tool_calls>\n" + "\n".join(invokes) + f"\n</{D}tool_calls>"


CODE = '  def f(x):\n    return "<a>" + \'\\\\\' if x < 1 else "</b>"\n\n'


@dataclass
class Case:
    id: str
    text: str
    reasoning: str | None
    content: str | None
    calls: list[tuple[str, dict | str]] = field(default_factory=list)
    thinking: bool = True
    tools: bool = True
    finished: str = "stop"
    truncated_call: bool = False  # parse_output drops a trailing call that an incremental stream announced


CASES = [
    Case("plain-thinking", "Let me think.</think>Hello there!" + EOS, "Let me think.", "Hello there!"),
    Case("plain-chat", "Hi! 🙂 你好" + EOS, None, "Hi! 🙂 你好", thinking=False),
    Case("P1-content-then-tools", "Look up.</think>Let me look that up for you." +
         blk(inv("get_weather", par("city", "Paris"))) + EOS,
         "Look up.", "Let me look that up for you.", [("get_weather", {"city": "Paris"})]),
    Case("P1-chat-tools-only", blk(inv("a", par("x", "1", "false")), inv("b", par("y", "[1, {\"k\": null}]", "false")))
         + EOS, None, None, [("a", {"x": 1}), ("b", {"y": [1, {"k": None}]})], thinking=False),
    Case("P2-raw-strings", "r</think>" + blk(inv("write", par("path", " a b.txt "), par("body", CODE),
                                                par("empty", ""))) + EOS,
         "r", None, [("write", {"path": " a b.txt ", "body": CODE, "empty": ""})]),
    Case("false-invalid-json-kept-as-string", "</think>" + blk(inv("f", par("a", "abc", "false"),
                                                                   par("b", "NaN", "false"),
                                                                   par("c", " {\"x\": 1} ", "false"))) + EOS,
         None, None, [("f", {"a": "abc", "b": "NaN", "c": {"x": 1}})]),
    Case("no-string-attr-and-duplicates", "</think>" + blk(inv("f", par("n", "5", None), par("s", "hi", None),
                                                               par("n", "6", "false"))) + EOS,
         None, None, [("f", {"n": 5, "s": "hi"})]),
    Case("zero-args-and-unicode",
         "思考</think>好的" + blk(inv("now"), inv("echo", par("t", "«ü» 😀\t\"q\""))) + EOS,
         "思考", "好的", [("now", {}), ("echo", {"t": "«ü» 😀\t\"q\""})]),
    Case("P3-truncated-thinking", "Still thinking about </b> and\n\n", "Still thinking about </b> and\n\n", None,
         finished="length"),
    Case("P3-truncated-answer", "ok</think>The answer is 4", "ok", "The answer is 4", finished="length"),
    Case("P3-text-after-tool-block", "r</think>Sure." + blk(inv("f", par("x", "1"))) + "\n\nDone, see above." + EOS,
         "r", "Sure.Done, see above.", [("f", {"x": "1"})]),
    Case("two-tool-blocks", "r</think>A" + blk(inv("f")) + "\n" + blk(inv("g")) + EOS, "r", "A",
         [("f", {}), ("g", {})]),
    Case("P4-invoke-cut-mid-parameter", "r</think>" + blk(inv("f", par("x", "1")))[:-len(f"\n</{D}tool_calls>")] +
         "\n" + f'<{D}invoke name="g">\n<{D}parameter name="p" string="true">partial val',
         "r", None, [("f", {"x": "1"})], finished="length", truncated_call=True),
    Case("P4-invoke-cut-after-parameter", "</think>" + f'\n\n<{D}tool_calls>\n<{D}invoke name="g">\n' +
         par("p", "v") + "\n", None, None, [], finished="length", truncated_call=True),
    Case("P4-invoke-ended-by-eos", "</think>" + f'\n\n<{D}tool_calls>\n<{D}invoke name="g">\n' + par("p", "v") + EOS,
         None, None, [], truncated_call=True),
    Case("P5-tools-in-unclosed-think", "I need the weather." + blk(inv("get_weather", par("city", "Oslo"))) + EOS,
         "I need the weather.", None, [("get_weather", {"city": "Oslo"})]),
    Case("implied-invoke-close", "</think>" + f"\n\n<{D}tool_calls>\n<{D}invoke name=\"f\">\n{par('a', 'x')}\n"
         f"<{D}invoke name=\"g\">\n{par('b', 'y')}\n</{D}tool_calls>" + EOS, None, None,
         [("f", {"a": "x"}), ("g", {"b": "y"})]),
    Case("malformed-invoke-skipped", "</think>" + f"\n\n<{D}tool_calls>\n<{D}invoke nom=f>\n{par('a', 'x')}\n"
         f"</{D}invoke>\n{inv('ok')}\n</{D}tool_calls>" + EOS, None, None, [("ok", {})]),
    Case("partial-marker-at-truncation", "r</think>Answer\n\n<｜DSML｜too", "r", "Answer", finished="length"),
    Case("partial-think-end-at-truncation", "abc</thi", "abc", None, finished="length"),
    Case("lone-lt-kept", "r</think>a <", "r", "a <", finished="stop"),
    Case("eos-and-garbage-after", "r</think>x" + EOS + "junk</think>", "r", "x"),
    Case("newlines-not-before-block", "r\n\n</think>a\n\n\nb\n\n" + EOS, "r\n\n", "a\n\n\nb\n\n"),
    Case("three-newlines-before-block", "</think>a\n\n\n" + blk(inv("f"))[2:] + EOS, None, "a\n",
         [("f", {})]),
    Case("no-tools-markup-is-content", "r</think>x" + blk(inv("f")) + EOS, "r", "x" + blk(inv("f")), tools=False),
    Case("chat-mode-think-end-is-text", "a</think>b" + EOS, None, "a</think>b", thinking=False, tools=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_parse_output(case: Case) -> None:
    out = parse_output(case.text, thinking=case.thinking, tools=case.tools, finished=case.finished,
                       tool_call_id=sequential_ids())
    assert out.reasoning_content == case.reasoning
    assert out.content == case.content
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == case.calls
    assert [c.id for c in out.tool_calls] == [f"call_{i}" for i in range(len(case.calls))]
    if case.tools:
        for text in (out.reasoning_content or "", out.content or ""):
            assert not any(m in text for m in MARKUP)


def _stream(case: Case, chunks: list[str], incremental: bool) -> tuple[str, str, dict[int, list[str]]]:
    """Feed chunks; check every step emits only a prefix of the final texts; return the accumulation."""
    final = parse_output(case.text, thinking=case.thinking, tools=case.tools, finished=case.finished)
    parser = StreamingParser(case.thinking, case.tools, incremental_arguments=incremental,
                             tool_call_id=sequential_ids())
    reasoning, content, calls = "", "", {}
    deltas = [parser.feed(chunk) for chunk in chunks]
    deltas.append(parser.finish(case.finished))
    for delta in deltas:
        assert isinstance(delta, ParsedDelta)
        reasoning += delta.reasoning
        content += delta.content
        assert (final.reasoning_content or "").startswith(reasoning)
        assert (final.content or "").startswith(content)
        for d in delta.tool_calls:
            if d.index not in calls:  # id and name exactly once, first
                assert d.id == f"call_{d.index}" and d.name and d.index == len(calls)
                calls[d.index] = [d.name, ""]
            else:
                assert d.id is None and d.name is None
            calls[d.index][1] += d.arguments
    return reasoning, content, calls


def _check_stream(case: Case, chunks: list[str]) -> None:
    final = parse_output(case.text, thinking=case.thinking, tools=case.tools, finished=case.finished)
    expected_calls = [[c.name, c.arguments] for c in final.tool_calls]
    for incremental in (False, True):
        reasoning, content, calls = _stream(case, chunks, incremental)
        assert (reasoning or None, content or None) == (final.reasoning_content, final.content)
        got = [calls[i] for i in sorted(calls)]
        if incremental and case.truncated_call:
            # The cut-off call may have been announced and partly streamed (when it was still open at the end
            # of some chunk); everything before it is exact.
            assert got[:len(expected_calls)] == expected_calls and len(got) <= len(expected_calls) + 1
            assert all(not args.endswith("}") for _, args in got[len(expected_calls):])
        else:
            assert got == expected_calls


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_streaming_split_at_every_offset(case: Case) -> None:
    text = case.text
    for i in range(len(text) + 1):
        _check_stream(case, [text[:i], text[i:]])
    _check_stream(case, list(text))  # one character at a time


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_streaming_random_chunkings(case: Case) -> None:
    rng = random.Random(f"chunks-{case.id}")  # str seeds are stable across runs (hash() is not)
    text = case.text
    for _ in range(25):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
        _check_stream(case, [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])


def test_arguments_text_is_the_official_rendering() -> None:
    # '"key": value' joined by ", ": strings JSON-quoted (non-ASCII kept), JSON values inserted as written.
    text = "</think>" + blk(inv("f", par("s", "ü\n\"x\""), par("n", "[1,2]", "false"), par("b", "true", "false"),
                                par("bad", "{oops", "false"))) + EOS
    (c,) = parse_output(text, thinking=True, tools=True).tool_calls
    assert c.arguments == '{"s": "ü\\n\\"x\\"", "n": [1,2], "b": true, "bad": "{oops"}'
    assert c.to_openai() == {"id": c.id, "type": "function", "function": {"name": "f", "arguments": c.arguments}}


def test_incremental_arguments_grow_and_names_come_first() -> None:
    text = "r</think>" + blk(inv("write", par("body", "x" * 50), par("n", "3", "false"))) + EOS
    parser = StreamingParser(True, True, tool_call_id=sequential_ids("id"))
    pieces = []
    for ch in text:
        pieces.extend(parser.feed(ch).tool_calls)
    pieces.extend(parser.finish().tool_calls)
    assert pieces[0].id == "id0" and pieces[0].name == "write"
    assert len(pieces) > 50  # the string value streamed as it came
    assert "".join(p.arguments for p in pieces) == json.dumps({"body": "x" * 50, "n": 3})
    assert parser.finish_reason == "tool_calls"
    assert [c.to_openai()["function"]["name"] for c in parser.tool_calls] == ["write"]


def test_unfinished_parse_holds_back_ambiguous_text() -> None:
    out = parse_output("r</think>Hello\n", thinking=True, tools=True, finished=None)
    assert out.content == "Hello"
    assert parse_output("r</think>Hello\n", thinking=True, tools=True).content == "Hello\n"
    assert parse_output("r</", thinking=True, tools=False, finished=None).reasoning_content == "r"


def test_default_ids_are_unique_and_finish_reason() -> None:
    text = blk(inv("f"), inv("g")) + EOS
    ids = [c.id for c in parse_output(text, thinking=False, tools=True).tool_calls]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)
    parser = StreamingParser(False, True)
    assert parser.feed("hello\n") == ParsedDelta("", "hello", [])  # the newline may start a tool block
    assert parser.finish("length") == ParsedDelta("", "\n", []) and parser.finish_reason == "length"


FRAGMENTS = ["a", "é", "\n", "\n\n", " ", "<", "</", "</think>", "</thi", EOS, "<｜end", f"<{D}tool_calls>", f"<{D}",
             f"</{D}tool_calls>", f'<{D}invoke name="f">', f"</{D}invoke>", f'<{D}parameter name="k" string="true">',
             f'<{D}parameter name="j" string="false">', f'<{D}parameter name="m">', f"</{D}parameter>", '"', ">",
             "{", "1", "\\"]


@pytest.mark.parametrize("seed", range(6))
def test_fuzz_markup_soup_streams_like_one_shot(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 40)))
        case = Case("fuzz", text, None, None, thinking=rng.random() < 0.5, tools=rng.random() < 0.8,
                    finished=rng.choice(["stop", "length"]), truncated_call=True)
        final = parse_output(text, thinking=case.thinking, tools=case.tools, finished=case.finished)
        for c in final.tool_calls:
            assert isinstance(json.loads(c.arguments), dict)
        for _ in range(4):
            cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 10)))) if len(text) > 1 \
                else []
            _check_stream(case, [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
        _check_stream(case, list(text))
