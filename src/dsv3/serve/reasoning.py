"""R1-style reasoning: what a model writes inside <think>...</think> returned as `reasoning_content`, apart from its
answer (`content`), as DeepSeek's API and vLLM's deepseek_r1 parser do.

When: `dsv3 serve --reasoning-parser auto` (the default) splits for a chat template that mentions </think> (DeepSeek-
R1's strips the thinking of earlier turns with it, V3.1's opens or closes the block in the generation prompt; V3's,
V3-0324's and dsv3's own template never mention it), `deepseek_r1` always, `none` never. The completions API is raw
text and is never split.

Where the output starts is read from the end of the rendered prompt (`reasoning_start`), not assumed:
- "thinking": R1's later templates end the generation prompt with "<think>\\n" and V3.1's thinking mode with
  "<think>": the model writes only the closing tag. All is reasoning until </think>; an output without it (the length
  limit fell inside the thinking) is all reasoning and its content None, as vLLM's parser has it.
- "answering": V3.1's non-thinking mode ends the prompt with "</think>": all is content.
- "undecided": no tag ends the prompt (R1's first template left the opening tag to the model; V3.1 and R1 add no
  generation prompt after tool outputs): the output decides. One that opens with <think> (after blank space) is
  reasoning until </think>, any other is content. (vLLM's deepseek_r1 parser reads every output as reasoning until
  </think>, which makes a V3.1 answer after tool outputs all reasoning.)

Streaming: text arrives in pieces that may cut a tag anywhere (a tag is one token in DeepSeek's vocabulary but
several in others, and detokenising releases text in windows), so the splitter holds back a tail that could still
become a tag, and releases it once it cannot.
"""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"
PARSERS = ("auto", "deepseek_r1", "none")


def reasoning_enabled(parser: str, template_source: str) -> bool:
    """`--reasoning-parser`: auto is on for a template that knows the thinking block."""
    if parser not in PARSERS:
        raise ValueError(f"reasoning parser {parser!r} is not one of {', '.join(PARSERS)}")
    return parser == "deepseek_r1" or (parser == "auto" and THINK_END in template_source)


def reasoning_start(prompt_tail: str | None) -> str:
    """"thinking", "answering" or "undecided", from the end of the template's own text (None where the prompt ends
    in user text: a user message ending in "<think>" decides nothing)."""
    tail = (prompt_tail or "").rstrip()
    return "thinking" if tail.endswith(THINK_START) else "answering" if tail.endswith(THINK_END) else "undecided"


def held(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is the start of `tag` (and not all of it): what must wait for
    more text before it can be told apart from the tag."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplitter:
    """One choice's text in, (reasoning, content) out, as each piece arrives; `finish` releases what was held. Each
    piece is searched once: what is held between pieces is a tag's length at most, and the blank space an undecided
    output opens with is kept as pieces (searched again with each piece, a long run of it was quadratic)."""

    def __init__(self, start: str):
        self.thinking = start != "answering"
        self.at_start = start != "answering"       # an opening tag may still come first
        self.decides = start == "undecided"        # ... and must, to make the output reasoning
        self.buf = ""
        self.blank: list[str] = []                 # undecided, at the start: the blank space before anything else

    def feed(self, text: str) -> tuple[str, str]:
        if self.at_start:
            if self.decides and not self.buf:
                head = text.lstrip()
                self.blank.append(text[:len(text) - len(head)])
                text = head
            head = self.buf + text
            if len(head) < len(THINK_START) and THINK_START.startswith(head):
                self.buf = head
                return "", ""          # may still be the opening tag
            if head.startswith(THINK_START):
                head = head[len(THINK_START):]
            elif self.decides:
                self.thinking = False
                head = "".join(self.blank) + head
            self.buf, self.blank, self.at_start, text = "", [], False, head
        self.buf += text
        reasoning = ""
        if self.thinking:
            at = self.buf.find(THINK_END)
            if at < 0:
                cut = len(self.buf) - held(self.buf, THINK_END)
                reasoning, self.buf = self.buf[:cut], self.buf[cut:]
                return reasoning, ""
            reasoning, self.buf, self.thinking = self.buf[:at], self.buf[at + len(THINK_END):], False
        content, self.buf = self.buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The held tail: it did not become a tag."""
        thinking = self.thinking and not (self.at_start and self.decides)     # an undecided output that ended
        rest = "".join(self.blank) + self.buf                                   # before deciding is content
        self.buf, self.blank, self.at_start = "", [], False
        return (rest, "") if thinking else ("", rest)
