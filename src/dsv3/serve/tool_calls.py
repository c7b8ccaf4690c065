"""DeepSeek's tool calls: the model's output -> OpenAI `tool_calls`, as it arrives.

The formats (the release chat templates render past calls in them, and the models write them):

    V3, V3-0324, R1:  <｜tool▁calls▁begin｜>
                        <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
                        (more calls after "\\n") <｜tool▁calls▁end｜>
    V3.1:             <｜tool▁calls▁begin｜>
                        <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜> (chained) <｜tool▁calls▁end｜>

Both are read, call by call (`parse_call`): a body of the form `function<sep>NAME\\n```json ...```` is V3's, any other
`NAME<sep>ARGS` is V3.1's (so a V3.1 tool named "function" still reads). A call counts only if its arguments are a
JSON object and its name is one of the request's tools. The text before the calls is the message's content.

Robustness: the server never fails on what a model writes. The first call that does not read (bad JSON, an unknown
name, text where a call should start, a block cut off by the length limit) ends the parsing: from there on the raw
text, markers and all, is content, exactly as generated. Calls read before it stand. Streaming and non-streaming run
this same parser (non-streaming feeds the whole text at once), so they always agree.

Streaming granularity: a call is sent as one complete delta (id, name, all its arguments) when its end marker
arrives; OpenAI's finer argument fragments would need a partial-JSON reader for no gain to a client that must
wait for the whole object anyway. Content before the calls streams as it comes, minus a tail that could still
become the begin marker.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from .reasoning import held

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
MARKERS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)
OUTPUT_MARKERS = ("<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
                  "<｜tool▁output▁end｜>")     # rendered by the templates, never parsed
_V3_BODY = re.compile(r"function" + re.escape(SEP) + r"([^\n]*)\n```json\n(.*)\n```", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str          # a JSON object, as the model wrote it
    id: str

    def delta(self, index: int) -> dict:
        """The call as OpenAI sends it, in a message (`index` is for streamed deltas)."""
        return {"index": index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def parse_call(body: str, names: frozenset[str]) -> ToolCall | None:
    """One call's text between its begin and end markers, in either format, or None if it does not read."""
    body = body.strip()
    v3 = _V3_BODY.fullmatch(body)
    if v3:
        name, args = v3.groups()
    else:
        name, sep, args = body.partition(SEP)
        if not sep:
            return None
    name, args = name.strip(), args.strip()
    if name not in names:
        return None
    try:
        if not isinstance(json.loads(args), dict):
            return None
    except (ValueError, RecursionError):
        return None
    return ToolCall(name, args, f"call_{uuid.uuid4().hex[:24]}")


class ToolCallParser:
    """A choice's content text in, (content, complete calls) out, as each piece arrives; `finish` releases what was
    held. Modes: "content" (looking for the calls' begin marker), "calls" (inside the block), "raw" (gave up: all
    is content)."""

    def __init__(self, names: frozenset[str]):
        self.names, self.mode, self.buf = names, "content", ""
        self.calls: list[ToolCall] = []
        self.block_calls = 0        # calls read in the block now open (a later block's marker is its own)

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buf += text
        content, calls = "", []
        while self.buf:
            if self.mode == "raw":
                content, self.buf = content + self.buf, ""
            elif self.mode == "content":
                at = self.buf.find(CALLS_BEGIN)
                if at < 0:
                    cut = len(self.buf) - held(self.buf, CALLS_BEGIN)
                    content, self.buf = content + self.buf[:cut], self.buf[cut:]
                    break
                content, self.buf, self.mode = content + self.buf[:at], self.buf[at + len(CALLS_BEGIN):], "calls"
                self.block_calls = 0
            else:
                step = self._call()
                if step is None:
                    break                   # the next call is not complete yet
                calls += step
                self.calls += step
                self.block_calls += len(step)
        return content, calls

    def _call(self) -> list[ToolCall] | None:
        """In the block: read one call (or the block's end); [] when nothing was read, None to wait for more."""
        text = self.buf.lstrip()
        if text.startswith(CALL_BEGIN):
            end = text.find(CALL_END)
            if end < 0:
                return None
            call = parse_call(text[len(CALL_BEGIN):end], self.names)
            if call is None:
                self._give_up()
                return []
            self.buf = text[end + len(CALL_END):]
            return [call]
        if text.startswith(CALLS_END):
            self.buf, self.mode = text[len(CALLS_END):], "content"
            return []
        if not text or CALL_BEGIN.startswith(text) or CALLS_END.startswith(text):
            return None
        self._give_up()
        return []

    def _give_up(self) -> None:
        """From here on, the text as generated; the block's begin marker too when no call of it was read (calls of
        an earlier block do not take it: counting those, a second block's marker was lost)."""
        self.mode = "raw"
        if not self.block_calls:
            self.buf = CALLS_BEGIN + self.buf

    def finish(self) -> str:
        """The held text as content: a tail that did not become a marker, or a block cut off mid-call."""
        if self.mode == "calls" and (self.buf.strip() or not self.block_calls):     # cut off mid-call, or before any
            self._give_up()
        rest, self.buf = ("" if self.mode == "calls" else self.buf), ""
        return rest
