"""Chat data for SFT: conversations -> token ids and the mask of the tokens that carry loss (spec 7: SFT on curated
chat data).

Rows are `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}` from jsonl or parquet
files. A conversation is encoded exactly as the server encodes it (`dsv3.data.chat`: the same template, content as
text, so a model is trained on the ids it is served) and the loss covers each assistant turn's content and its
closing EOS, nothing else: not the system prompt, the user turns or the `<｜Assistant｜>` marker.

The mask comes from prefixes. Assistant message i's turn ends where the conversation up to and including i ends
(`through`: EOS, a special token where the tokenizer splits, so its ids are a prefix of the whole conversation's;
checked). It starts where the prompt the server would send for it (`before`: the conversation up to i with the
generation prompt) stops being reproduced by `through`:
- V3's layout (and any whose generation prompt is a prefix of the turn): right after `before`, the
  `<｜Assistant｜>` marker;
- R1's release template: its generation prompt is `<｜Assistant｜><think>\n`, but a rendered assistant turn is
  `<｜Assistant｜>` + the answer (reasoning stripped), so `before` is not a prefix of `through`. What the model
  generates in the training text starts at the first token where the two differ: right after `<｜Assistant｜>`.
  Why there: what the two share is prompt (the server sends it, the model never writes it), and what follows it in
  the training text is the turn's answer and EOS, which the model writes. (The training text thus lacks the
  `<think>\n` that the served prompt ends in: it is R1's template that lays out a turn without it.) The
  comparison skips whitespace-only tokens (a template's indentation: the V3.1 tool template of vLLM lays out the
  generation prompt and the same turn with different runs of spaces, which are not content), and when the
  generation prompt is not reproduced whole, the shared part is cut back to just after its last marker (an added
  token: `<｜Assistant｜>`, `</think>`) or whitespace token: with a tokenizer that has no `<think>` token, R1's
  `<think>` and an answer's `<answer>` both begin with the text token `<`, a shared token that belongs to the
  answer. The loss may not start inside the conversation before turn i (its rendering without the generation
  prompt): a template that renders earlier turns differently when a reply follows is an error, not a silent
  mis-mask.

Reasoning: what is trained is what the template renders. An assistant message's reasoning (`<think>...</think>`
at the start of its content, or a `reasoning_content` field) is trained only where the template writes it into the
turn: V3's layout (dsv3's default) writes content as it is, so `<think>...</think>` is trained (as the `<think>` /
`</think>` tokens where the tokenizer has them); R1's and V3.1's release templates strip everything up to
`</think>` from every assistant turn, the last included, and no DeepSeek template reads `reasoning_content`, so with
them only the answer and EOS are trained. Such turns are counted (`ChatDataReport.reasoning_dropped`, in the
summary the run logs), never dropped silently. To train R1-style reasoning, use a template that renders it (V3's
layout with the reasoning in the content).

Bad rows (not a list of messages, an unknown role, content that is not a non-empty string, no assistant turn, too
long) are never kept silently: `read_chat_rows` counts each reason and `ChatDataReport` says how many and where the
first ones were; `strict=True` makes the first one an error.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..data.chat import ChatTemplate
from ..data.records import RecordError, iter_records

ROLES = ("system", "user", "assistant")


class ChatDataError(ValueError):
    """A bad conversation (strict mode) or an unreadable file; the message names the row."""


@dataclass
class ChatExample:
    ids: list[int]
    loss_mask: list[bool]        # True where the token is predicted with loss (assistant content and its EOS)
    reasoning_dropped: int = 0   # assistant turns whose reasoning the template did not render (not trained)


@dataclass
class ChatDataReport:
    kept: int = 0
    bad: Counter = field(default_factory=Counter)              # reason -> rows
    examples: list[str] = field(default_factory=list)          # "file:line: reason" of the first few bad rows
    reasoning_dropped: int = 0     # kept conversations' assistant turns whose reasoning the template does not render

    def summary(self) -> str:
        note = (f"; the reasoning of {self.reasoning_dropped} assistant turns is not rendered by the chat template, "
                f"so not trained (module docstring)" if self.reasoning_dropped else "")
        if not self.bad:
            return f"{self.kept} conversations" + note
        reasons = ", ".join(f"{n} {why}" for why, n in self.bad.most_common())
        return f"{self.kept} conversations kept, {sum(self.bad.values())} dropped ({reasons}); first: " + \
            "; ".join(self.examples) + note


def conversation_problem(messages) -> str | None:
    """Why a conversation cannot be trained on, or None."""
    if not isinstance(messages, list) or not messages:
        return "messages is not a non-empty list"
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return f"unknown role {m.get('role')!r}" if isinstance(m, dict) else "a message is not an object"
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            return f"empty or non-string content in a {m['role']} message"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn"
    return None


def encode_conversation(tokenizer, messages: list[dict], template: ChatTemplate | None = None) -> ChatExample:
    """ids of the whole conversation and the loss mask of its assistant turns (module docstring)."""
    template = template or ChatTemplate()
    ids = template.encode(tokenizer, messages, add_generation_prompt=False)
    mask = [False] * len(ids)
    dropped = 0
    kinds = _TokenKinds(tokenizer)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.encode(tokenizer, messages[:i], add_generation_prompt=True)
        through = template.encode(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if ids[:len(through)] != through:
            raise ChatDataError(f"the chat template does not encode assistant turn {i} as a prefix of the whole "
                                f"conversation: cannot mask its loss")
        if through[:len(before)] == before:
            start = len(before)             # the generation prompt is reproduced: V3's layout, as always
        else:
            history = template.encode(tokenizer, messages[:i], add_generation_prompt=False)
            start = _turn_start(before, through, kinds)
            if through[:len(history)] != history or start < len(history):
                raise ChatDataError(f"the chat template renders the conversation before assistant turn {i} "
                                    f"differently when the turn follows: cannot mask its loss")
        if len(through) <= start:
            raise ChatDataError(f"the chat template leaves nothing of assistant turn {i} after its prompt: cannot "
                                f"mask its loss")
        mask[start:len(through)] = [True] * (len(through) - start)
        reasoning = _reasoning(m)
        if reasoning and reasoning not in tokenizer.decode(through[start:]):
            dropped += 1
    return ChatExample(ids, mask, dropped)


class _TokenKinds:
    """Which ids are markers (added tokens: the template's control tokens, <think>) and which decode to whitespace
    alone; decoded once per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.markers = frozenset(tokenizer.backend.get_added_tokens_decoder())
        self._space: dict[int, bool] = {}

    def space(self, i: int) -> bool:
        if i not in self._space:
            text = self.tokenizer.decode([i])
            self._space[i] = i not in self.markers and bool(text) and not text.strip()
        return self._space[i]


def _turn_start(before: list[int], through: list[int], kinds: _TokenKinds) -> int:
    """Where the turn's loss starts in `through` when `before` (its prompt with the generation prompt) is not a
    prefix of it: right after the last token of `through` that the two share, compared token by token with
    whitespace-only tokens skipped on either side; if the generation prompt is not reproduced whole (R1's
    `<think>\n`), cut back to just after the shared part's last marker or whitespace token (module docstring)."""
    b = t = end = 0
    while b < len(before) and t < len(through):
        if before[b] == through[t]:
            b, t = b + 1, t + 1
            end = t
        elif kinds.space(before[b]) or kinds.space(through[t]):     # indentation laid out differently
            b += kinds.space(before[b])
            t += kinds.space(through[t])
        else:
            break
    if all(kinds.space(x) for x in before[b:]):
        return end
    while end and through[end - 1] not in kinds.markers and not kinds.space(through[end - 1]):
        end -= 1
    return end


def _reasoning(message: dict) -> str:
    """An assistant message's reasoning (its `reasoning_content`, or what its content has before `</think>`),
    stripped; "" if none."""
    r = message.get("reasoning_content")
    if isinstance(r, str) and r.strip():
        return r.strip()
    content = message["content"]
    if "</think>" not in content:
        return ""
    r = content.split("</think>")[0].strip()
    return r.removeprefix("<think>").strip()


def read_chat_rows(paths: Iterable[str | Path], tokenizer, max_len: int, template: ChatTemplate | None = None,
                   strict: bool = False) -> tuple[list[ChatExample], ChatDataReport]:
    """Encode every good conversation of the files (at most max_len tokens each); count and report the rest."""
    template = template or ChatTemplate()
    out, report = [], ChatDataReport()
    for p in map(Path, paths):
        try:
            rows = list(iter_records(p, "chat data ({'messages': [...]} rows)"))
        except RecordError as e:
            raise ChatDataError(str(e)) from None
        for where, row in rows:
            why = str(row) if isinstance(row, RecordError) else (
                "row has no 'messages'" if not isinstance(row, dict) or "messages" not in row
                else conversation_problem(row["messages"]))
            example = None
            if why is None:
                example, why = _encode_row(where, tokenizer, row["messages"], template)
            if example is not None and len(example.ids) > max_len:
                why = f"longer than {max_len} tokens"
            if why is not None:
                if strict:
                    raise ChatDataError(f"{where}: {why}")
                report.bad[why.split(" (")[0]] += 1
                if len(report.examples) < 3:
                    report.examples.append(f"{where}: {why}")
                continue
            out.append(example)
            report.kept += 1
            report.reasoning_dropped += example.reasoning_dropped
    return out, report


def _encode_row(where: str, tokenizer, messages: list[dict], template: ChatTemplate):
    """(example, None), or (None, why) for a row the template refuses: its raise_exception (HF templates check
    that roles alternate, that a system turn comes first) or a field it reads that the row lacks is that row's
    problem, counted like the others. A turn the template cannot mask is the template's problem, an error, said
    with the row it was found on."""
    import jinja2
    try:
        return encode_conversation(tokenizer, messages, template), None
    except jinja2.TemplateError as e:
        return None, f"the chat template refused it ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    except ChatDataError as e:
        raise ChatDataError(f"{where}: {e}") from None


def batch_examples(examples: list[ChatExample], pad_id: int):
    """(ids (B, T) long, targets (B, T) long with -100 where no loss) for next-token training: one conversation a
    row, padded to the longest, so no token attends across conversations. targets[t] = ids[t + 1] where the token
    at t + 1 carries loss."""
    import torch
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.ids)
        ids[b, :n] = torch.tensor(e.ids)
        keep = torch.tensor(e.loss_mask[1:], dtype=torch.bool)
        targets[b, :n - 1] = torch.where(keep, torch.tensor(e.ids[1:]), torch.tensor(-100))
    return ids, targets
