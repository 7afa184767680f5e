"""DeepSeek-V4 model output -> ``reasoning_content``, ``content`` and ``tool_calls``, one-shot or streaming.

The text after the generation header (decoded with special tokens kept) is, in thinking mode,
``reasoning</think>content[\\n\\n<｜DSML｜tool_calls>…</｜DSML｜tool_calls>]<EOS>`` and in chat mode the same
without the reasoning part. The official parser raises on anything else; a server must not, so this one is
lenient the way CHAT_FORMAT.md's consensus says:

* no ``</think>``: everything is reasoning (truncated thinking); no EOS: the answer is what there is;
* a tool block inside an unclosed think block ends the reasoning and is parsed (P5), and the ``"\\n\\n"``
  before a tool block belongs to the markup, in reasoning as in content (P1);
* an invoke only counts once it is closed (``</｜DSML｜invoke>``, or implicitly by the next invoke or the
  block's end): one cut off by EOS or by the end of the text is dropped (P4, SGLang's behaviour);
* ``string="true"`` values are kept byte for byte (P2); ``string="false"`` values are inserted as JSON,
  or as a JSON string when they are not valid JSON; a repeated parameter name keeps its first value;
* text after a tool block is content again (leading whitespace dropped); EOS and anything after it go;
* with ``tools=False`` DSML markup is plain content (no tools were offered, so no call can be reported).

:class:`StreamingParser` is the one implementation; :func:`parse_output` feeds it the whole text. Markers
split across chunks at any character are recognised because only the shortest ambiguous suffix is held
back: nothing is emitted that a later chunk could turn into markup. Tool calls stream OpenAI style: the
first delta of a call carries its id and name, later ones grow ``arguments``; the concatenated arguments
equal :func:`parse_output`'s string. With ``incremental_arguments`` (the default) a call is announced when
its invoke tag is complete, so a call cut off by ``finish_reason=length`` was already partly streamed
(clients treat a truncated response as incomplete anyway); without it, each call is sent whole once closed
and the stream matches :func:`parse_output` exactly in every case.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from dsv4.chat.encoding import DSML, EOS, THINK_END

TOOLS_START = f"<{DSML}tool_calls"
TOOLS_END = f"</{DSML}tool_calls>"
INVOKE_START = f"<{DSML}invoke"
INVOKE_END = f"</{DSML}invoke>"
PARAM_START = f"<{DSML}parameter"
PARAM_END = f"</{DSML}parameter>"
_INVOKE_HEAD = re.compile(r'\s*name="([^"]*)"\s*')
_PARAM_HEAD = re.compile(r'\s*name="([^"]*)"(?:\s+string="(true|false)")?\s*')
_WS = " \t\r\n"

REASONING, CONTENT, BLOCK, INVOKE_HEAD, INVOKE_BODY, PARAM_HEAD, PARAM_VALUE = range(7)
SKIP_PARAM, SKIP_INVOKE, DONE = range(7, 10)
_IN_INVOKE = (INVOKE_HEAD, INVOKE_BODY, PARAM_HEAD, PARAM_VALUE, SKIP_PARAM)


@dataclass
class ToolCall:
    """A complete tool call; ``arguments`` is JSON object text."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """A streamed piece of call ``index``: ``id`` and ``name`` only in its first delta."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass
class ParsedDelta:
    """What one :meth:`StreamingParser.feed` or :meth:`StreamingParser.finish` adds."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


@dataclass
class ParsedOutput:
    """A whole response; empty reasoning or content is ``None`` (OpenAI's ``null``)."""

    reasoning_content: str | None
    content: str | None
    tool_calls: list[ToolCall]


def sequential_ids(prefix: str = "call_") -> Callable[[int], str]:
    """Deterministic tool-call ids (``call_0``, ``call_1``, ...), for tests."""
    return lambda index: f"{prefix}{index}"


def random_id(index: int) -> str:
    """The default tool-call id: unique across requests, like OpenAI's."""
    return f"call_{uuid.uuid4().hex[:24]}"


def _hold(buf: str, markers: list[str]) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of a marker (may still become one)."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(buf)), best, -1):
            if buf.endswith(m[:k]):
                best = k
                break
    return best


def _escape(text: str) -> str:
    """JSON string-body escaping; per character, so escaping pieces equals escaping the whole."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _reject_constant(name: str) -> None:
    raise ValueError(name)


def _is_json(text: str) -> bool:
    try:
        json.loads(text, parse_constant=_reject_constant)  # NaN/Infinity are not JSON
    except ValueError:
        return False
    return True


class _Call:
    __slots__ = ("index", "id", "name", "args", "keys", "done", "announced", "sent")

    def __init__(self, index: int, id: str, name: str) -> None:
        self.index, self.id, self.name = index, id, name
        self.args, self.keys = "{", set()
        self.done = self.announced = False
        self.sent = 0


class StreamingParser:
    """Incremental parser of one response. ``thinking``: the output starts inside ``<think>``; ``tools``:
    tools were offered, so DSML markup is parsed. ``tool_call_id`` maps a call's index to its id."""

    def __init__(self, thinking: bool, tools: bool, *, incremental_arguments: bool = True,
                 tool_call_id: Callable[[int], str] | None = None) -> None:
        self.thinking, self.tools, self.incremental = thinking, tools, incremental_arguments
        self._new_id = tool_call_id or random_id
        self._state = REASONING if thinking else CONTENT
        self._buf = ""
        self._skip_ws = False  # after a tool block: whitespace before more content is dropped
        self._scan = 0  # PARAM_VALUE: where to resume looking for the closing tag
        self._kind: str | None = None  # PARAM_VALUE: "true", "false" or None (no string attribute)
        self._calls: list[_Call] = []
        self._current: _Call | None = None
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._finish_reason: str | None = None

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The complete calls so far."""
        return [ToolCall(c.id, c.name, c.args) for c in self._calls if c.done]

    @property
    def finish_reason(self) -> str | None:
        """The reason given to :meth:`finish`, as ``"tool_calls"`` when a stopped response made calls."""
        if self._finish_reason == "stop" and any(c.done for c in self._calls):
            return "tool_calls"
        return self._finish_reason

    def feed(self, delta_text: str) -> ParsedDelta:
        """Take the next piece of decoded text; return what is now certain."""
        if self._state != DONE:
            self._buf += delta_text
            self._run(final=False)
        return self._take()

    def finish(self, finish_reason: str | None = "stop") -> ParsedDelta:
        """End of output: flush held text (a held partial marker is dropped) and drop an unclosed invoke."""
        self._run(final=True)
        if self._state in _IN_INVOKE:
            self._current = None
        self._state, self._buf = DONE, ""
        self._finish_reason = finish_reason
        return self._take()

    # -- machinery ---------------------------------------------------------------------------------------
    def _take(self) -> ParsedDelta:
        out = ParsedDelta("".join(self._reasoning), "".join(self._content))
        self._reasoning.clear()
        self._content.clear()
        for c in self._calls:
            if not (c.done or (self.incremental and c is self._current)):
                continue
            if not c.announced or c.sent < len(c.args):
                first = not c.announced
                out.tool_calls.append(ToolCallDelta(c.index, c.id if first else None, c.name if first else None,
                                                    c.args[c.sent:]))
                c.announced, c.sent = True, len(c.args)
        return out

    def _run(self, final: bool) -> None:
        steps = {REASONING: self._text, CONTENT: self._text, BLOCK: self._block, INVOKE_HEAD: self._invoke_head,
                 INVOKE_BODY: self._invoke_body, PARAM_HEAD: self._param_head, PARAM_VALUE: self._param_value,
                 SKIP_PARAM: self._skip_param, SKIP_INVOKE: self._skip_invoke}
        while self._state != DONE and steps[self._state](final):
            pass

    def _find(self, markers: list[str]) -> tuple[int, str] | None:
        """The earliest complete marker in the buffer."""
        hits = [(p, m) for m in markers if (p := self._buf.find(m)) >= 0]
        return min(hits) if hits else None

    def _consume(self, pos: int, marker: str) -> None:
        self._buf = self._buf[pos + len(marker):]

    def _keep_tail(self, markers: list[str]) -> None:
        """Inside markup: drop what cannot start a marker (whitespace, stray text), keep the rest."""
        n = _hold(self._buf, markers)
        self._buf = self._buf[len(self._buf) - n:]

    def _text(self, final: bool) -> bool:
        out = self._reasoning if self._state == REASONING else self._content
        if self._skip_ws:
            self._buf = self._buf.lstrip(_WS)
            if not self._buf:
                return False
            self._skip_ws = False
        markers = [EOS] + ([THINK_END] if self._state == REASONING else []) + ([TOOLS_START] if self.tools else [])
        hit = self._find(markers)
        if hit is not None:
            pos, marker = hit
            text = self._buf[:pos]
            if marker == TOOLS_START and text.endswith("\n\n"):
                text = text[:-2]  # the blank line belongs to the tool block
            out.append(text)
            self._consume(pos, marker)
            self._state = DONE if marker == EOS else CONTENT if marker == THINK_END else BLOCK
            return True
        n = _hold(self._buf, markers + (["\n\n" + TOOLS_START] if self.tools else []))
        keep = len(self._buf) - n
        if final and n:
            lt = self._buf.find("<", keep)
            # A held "<｜…" or "</…" is the start of markup cut off by the end: drop it with its blank line.
            if lt < 0 or len(self._buf) - lt < 2:
                keep = len(self._buf)
        out.append(self._buf[:keep])
        self._buf = "" if final else self._buf[keep:]
        return False

    def _block(self, final: bool) -> bool:
        hit = self._find(markers := [INVOKE_START, TOOLS_END, EOS])
        if hit is None:
            self._keep_tail(markers)
            return False
        self._consume(*hit)
        self._end_block_or_invoke(hit[1], INVOKE_HEAD)
        return True

    def _end_block_or_invoke(self, marker: str, on_invoke: int) -> None:
        if marker == INVOKE_START:
            self._state = on_invoke
        elif marker == TOOLS_END:
            self._state, self._skip_ws = CONTENT, True
        elif marker == EOS:
            self._state = DONE
        else:  # INVOKE_END
            self._state = BLOCK

    def _invoke_head(self, final: bool) -> bool:
        end = self._buf.find(">")
        if end < 0:
            return False
        m = _INVOKE_HEAD.fullmatch(self._buf[:end])
        self._buf = self._buf[end + 1:]
        if m is None:
            self._state = SKIP_INVOKE
            return True
        index = len(self._calls)
        self._current = _Call(index, self._new_id(index), m[1])
        self._calls.append(self._current)
        self._state = INVOKE_BODY
        return True

    def _close_call(self) -> None:
        assert self._current is not None
        self._current.args += "}"
        self._current.done = True
        self._current = None

    def _invoke_body(self, final: bool) -> bool:
        hit = self._find(markers := [PARAM_START, INVOKE_END, INVOKE_START, TOOLS_END, EOS])
        if hit is None:
            self._keep_tail(markers)
            return False
        self._consume(*hit)
        if hit[1] == PARAM_START:
            self._state = PARAM_HEAD
        elif hit[1] == EOS:  # ended inside an open invoke: the call is incomplete
            self._current, self._state = None, DONE
        else:  # closed explicitly, or implicitly by the next invoke or the block's end
            self._close_call()
            self._end_block_or_invoke(hit[1], INVOKE_HEAD)
        return True

    def _param_head(self, final: bool) -> bool:
        end = self._buf.find(">")
        if end < 0:
            return False
        m = _PARAM_HEAD.fullmatch(self._buf[:end])
        self._buf = self._buf[end + 1:]
        call = self._current
        assert call is not None
        if m is None or m[1] in call.keys:  # malformed, or a repeated name (the first value wins)
            self._state = SKIP_PARAM
            return True
        self._kind = m[2]
        call.args += (", " if call.keys else "") + json.dumps(m[1], ensure_ascii=False) + ": "
        call.keys.add(m[1])
        if self._kind == "true":
            call.args += '"'
        self._state, self._scan = PARAM_VALUE, 0
        return True

    def _param_value(self, final: bool) -> bool:
        call = self._current
        assert call is not None
        end = self._buf.find(PARAM_END, self._scan)
        if self._kind == "true":  # a raw string: stream it escaped, holding back a partial closing tag
            if end < 0:
                keep = len(self._buf) - _hold(self._buf, [PARAM_END])
                call.args += _escape(self._buf[:keep])
                self._buf = self._buf[keep:]
                return False
            call.args += _escape(self._buf[:end]) + '"'
        else:  # JSON text: only known to be valid once complete
            if end < 0:
                self._scan = max(0, len(self._buf) - len(PARAM_END) + 1)
                return False
            raw = self._buf[:end]
            call.args += raw if _is_json(raw) else json.dumps(raw, ensure_ascii=False)
        self._consume(end, PARAM_END)
        self._state = INVOKE_BODY
        return True

    def _skip_param(self, final: bool) -> bool:
        hit = self._find([PARAM_END])
        if hit is None:
            self._keep_tail([PARAM_END])
            return False
        self._consume(*hit)
        self._state = INVOKE_BODY
        return True

    def _skip_invoke(self, final: bool) -> bool:
        hit = self._find(markers := [INVOKE_END, INVOKE_START, TOOLS_END, EOS])
        if hit is None:
            self._keep_tail(markers)
            return False
        self._consume(*hit)
        self._end_block_or_invoke(hit[1], INVOKE_HEAD)
        return True


def parse_output(text: str, *, thinking: bool, tools: bool, finished: str | None = "stop",
                 tool_call_id: Callable[[int], str] | None = None) -> ParsedOutput:
    """Parse a whole response. ``finished=None`` means the text may still grow: held-back text is kept
    back, as a stream would; any finish reason flushes it."""
    parser = StreamingParser(thinking, tools, incremental_arguments=False, tool_call_id=tool_call_id)
    first = parser.feed(text)
    last = parser.finish(finished) if finished is not None else ParsedDelta()
    reasoning = first.reasoning + last.reasoning
    content = first.content + last.content
    return ParsedOutput(reasoning or None, content or None, parser.tool_calls)
