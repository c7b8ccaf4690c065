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
    is content).

    Incremental: each piece is searched once, with at most a marker's length held from the pieces before it, so a
    stream's parsing is linear in its length (searching the whole held text again per piece was quadratic: a call's
    arguments of thousands of tokens, or blank space between calls). What a call holds until its end marker comes is
    kept as a list of pieces, joined once."""

    def __init__(self, names: frozenset[str]):
        self.names, self.mode = names, "content"
        self.buf = ""               # held unsearched text: at most a marker's length (see _block for "calls")
        self.raw: list[str] = []    # "calls": the text as generated since the block's begin marker or the last call
        self.body: list[str] | None = None     # "calls", inside a call: its text so far (less `buf`, its tail)
        self.calls: list[ToolCall] = []
        self.block_calls = 0        # calls read in the block now open (a later block's marker is its own)

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        content, calls = [], []
        while text:
            if self.mode == "raw":
                content.append(text)
                break
            if self.mode == "content":
                text, self.buf = self.buf + text, ""
                at = text.find(CALLS_BEGIN)
                if at < 0:
                    cut = len(text) - held(text, CALLS_BEGIN)
                    content.append(text[:cut])
                    self.buf = text[cut:]
                    break
                content.append(text[:at])
                text, self.mode, self.raw, self.block_calls = text[at + len(CALLS_BEGIN):], "calls", [], 0
            else:
                self.raw.append(text)
                text = self._block(text, calls)
        self.calls += calls
        return "".join(content), calls

    def _block(self, text: str, calls: list[ToolCall]) -> str:
        """In the block, the next piece (already in `raw`): a call read into `calls`, the block's end, or giving up;
        returns the text after what was read ("" while waiting for more). Between calls `buf` holds the start of a
        marker (blank space before it is skipped); inside a call, the call's last len(CALL_END) - 1 characters, where
        an end marker cut between pieces begins."""
        if self.body is None:
            head, self.buf = (self.buf + text).lstrip(), ""
            if head.startswith(CALLS_END):
                self.mode = "content"
                return head[len(CALLS_END):]
            if not head.startswith(CALL_BEGIN):
                if CALL_BEGIN.startswith(head) or CALLS_END.startswith(head):
                    self.buf = head              # a marker's start, or only blank space so far
                    return ""
                return self._give_up()
            self.body, text = [], head[len(CALL_BEGIN):]
        text, self.buf = self.buf + text, ""
        end = text.find(CALL_END)
        if end < 0:
            cut = max(0, len(text) - len(CALL_END) + 1)
            self.body.append(text[:cut])
            self.buf = text[cut:]
            return ""
        call = parse_call("".join(self.body) + text[:end], self.names)
        self.body = None
        if call is None:
            return self._give_up()
        calls.append(call)
        self.block_calls += 1
        self.raw = []
        return text[end + len(CALL_END):]

    def _give_up(self) -> str:
        """From here on, the text as generated (returned, to go out as content): all since the last call read, the
        block's begin marker too when no call of it was read (calls of an earlier block do not take it: counting
        those, a second block's marker was lost)."""
        text = (CALLS_BEGIN if not self.block_calls else "") + "".join(self.raw)
        self.mode, self.raw, self.body, self.buf = "raw", [], None, ""
        return text

    def finish(self) -> str:
        """The held text as content: a tail that did not become a marker, or a block cut off mid-call."""
        if self.mode == "calls":
            # cut off mid-call or mid-marker, or before any call: as generated; else only blank space is left
            return self._give_up() if self.body is not None or self.buf or not self.block_calls else ""
        rest, self.buf = self.buf, ""
        return rest
