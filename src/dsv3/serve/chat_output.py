"""A chat choice's generated text -> the assistant message (non-streaming) or its deltas (streaming): reasoning
(reasoning.py) first, then tool calls in what follows it (tool_calls.py), the rest content.

Both paths run one parser: non-streaming feeds the whole text at once, streaming each piece as it is released, so
the joined deltas always equal the message. `finish_reason` becomes "tool_calls" when a call was read from an output
that stopped by itself (not cut off by the length limit).

The parsers need the markers in the text, and a decode that skips special tokens drops a marker that the vocabulary
flags special (decoding keeps it where it is an ordinary added token, as in DeepSeek's release for <think>). So the
markers a request reads are kept (`marker_ids`): in a stream by TextStream's `keep`, in a finished output by
`marked_text`, which puts them back into the engine's text where they were generated. Every other special token
stays out, as in any response.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data import Tokenizer
from .reasoning import THINK_END, THINK_START, ReasoningSplitter
from .responses import TokenTable
from .tool_calls import MARKERS, ToolCallParser


@dataclass(frozen=True)
class ChatParsing:
    """What a chat request's output is read for (validation.plan_chat decides it)."""
    reasoning: str | None = None            # None: no split; else where the output starts (reasoning.reasoning_start)
    tools: frozenset[str] | None = None     # the callable tools' names; None: no tool-call parsing

    @property
    def active(self) -> bool:
        return self.reasoning is not None or self.tools is not None

    @property
    def markers(self) -> tuple[str, ...]:
        return (((THINK_START, THINK_END) if self.reasoning is not None else ())
                + (MARKERS if self.tools is not None else ()))


def marker_ids(tokenizer: Tokenizer, markers: tuple[str, ...]) -> frozenset[int]:
    """The markers that are tokens a skip-special decode would drop."""
    ids = (tokenizer.backend.token_to_id(m) for m in markers)
    return frozenset(i for i in ids if i is not None and i in TokenTable.of(tokenizer).special)


class ChatOutput:
    """One choice's text in, OpenAI delta fields out (`reasoning_content`, `content`, `tool_calls`)."""

    def __init__(self, parsing: ChatParsing):
        self.reasoning = None if parsing.reasoning is None else ReasoningSplitter(parsing.reasoning)
        self.tools = None if parsing.tools is None else ToolCallParser(parsing.tools)
        self.n_calls = 0

    def feed(self, text: str) -> dict:
        reasoning, content = self.reasoning.feed(text) if self.reasoning else ("", text)
        return self._delta(reasoning, content)

    def finish(self) -> dict:
        """What was held back, once the output is complete."""
        reasoning, content = self.reasoning.finish() if self.reasoning else ("", "")
        delta = self._delta(reasoning, content)
        tail = self.tools.finish() if self.tools else ""
        if tail:
            delta["content"] = delta.get("content", "") + tail
        return delta

    def _delta(self, reasoning: str, content: str) -> dict:
        delta: dict = {"reasoning_content": reasoning} if reasoning else {}
        calls = []
        if self.tools is not None and content:
            content, calls = self.tools.feed(content)
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [c.delta(self.n_calls + i) for i, c in enumerate(calls)]
            self.n_calls += len(calls)
        return delta

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.n_calls and reason == "stop" else reason


def chat_message(parsing: ChatParsing, text: str, reason: str | None) -> tuple[dict, str | None]:
    """The whole output as the assistant message and its finish_reason. Content is None where reasoning or tool
    calls took all of it (OpenAI's null beside tool calls); `reasoning_content` is there whenever the split is on."""
    out = ChatOutput(parsing)
    deltas = [out.feed(text), out.finish()]
    content = "".join(d.get("content", "") for d in deltas)
    calls = [{k: v for k, v in c.items() if k != "index"} for d in deltas for c in d.get("tool_calls", [])]
    message: dict = {"role": "assistant",
                     "content": content or (None if calls or parsing.reasoning is not None else content)}
    if parsing.reasoning is not None:
        message["reasoning_content"] = "".join(d.get("reasoning_content", "") for d in deltas) or None
    if calls:
        message["tool_calls"] = calls
    return message, out.finish_reason(reason)
