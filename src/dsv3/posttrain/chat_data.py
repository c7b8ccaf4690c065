"""Chat data for SFT: conversations -> token ids and the mask of the tokens that carry loss (spec 7: SFT on curated
chat data).

Rows are `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}` from jsonl or parquet
files. A conversation is encoded exactly as the server encodes it (`dsv3.data.chat`: the same template, content as
text, so a model is trained on the ids it is served) and the loss covers each assistant turn's content and its
closing EOS, nothing else: not the system prompt, the user turns or the `<｜Assistant｜>` marker.

The mask comes from prefixes: the turn of assistant message i spans from the end of the conversation up to i with a
generation prompt (it ends in the `<｜Assistant｜>` marker) to the end of the conversation up to and including i
(it ends in EOS). Both ends are special tokens, where the tokenizer splits, so each prefix's ids are a prefix of
the whole conversation's; that is checked, and a template for which it fails is an error, not a silent mis-mask.

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


@dataclass
class ChatDataReport:
    kept: int = 0
    bad: Counter = field(default_factory=Counter)              # reason -> rows
    examples: list[str] = field(default_factory=list)          # "file:line: reason" of the first few bad rows

    def summary(self) -> str:
        if not self.bad:
            return f"{self.kept} conversations"
        reasons = ", ".join(f"{n} {why}" for why, n in self.bad.most_common())
        return f"{self.kept} conversations kept, {sum(self.bad.values())} dropped ({reasons}); first: " + \
            "; ".join(self.examples)


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
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.encode(tokenizer, messages[:i], add_generation_prompt=True)
        through = template.encode(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if ids[:len(before)] != before or ids[:len(through)] != through or len(through) <= len(before):
            raise ChatDataError(f"the chat template does not encode assistant turn {i} as a prefix of the whole "
                                f"conversation: cannot mask its loss")
        mask[len(before):len(through)] = [True] * (len(through) - len(before))
    return ChatExample(ids, mask)


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
