"""Engine outputs -> OpenAI response pieces: incremental text, logprobs in both APIs' shapes, usage, the fields
every body and chunk of a response repeats, SSE framing."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from ..data import Tokenizer
from ..infer.engine import RequestOutput


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def now() -> int:
    return int(time.time())


@dataclass(frozen=True)
class Head:
    """What every body (or every chunk) of one response repeats."""
    id: str
    object: str          # "text_completion", "chat.completion", "chat.completion.chunk"
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, object: str, model: str) -> Head:
        return cls(new_id(prefix), object, now(), model)

    def body(self, choices: list, **fields) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, **fields}


class TextStream:
    """The text of one choice, released as it becomes final, decoding each token once: the new tokens are decoded
    together with the few before them (byte-level BPE: a token may end inside a UTF-8 character), and the text of
    that window minus the text of its old part is what they add (vLLM's incremental detokenisation). Text that ends
    in an incomplete character (U+FFFD) waits for the next token. With stop strings the last len(longest stop) - 1
    characters are held back: they might still turn out to start a stop string, which the engine removes from the
    final text."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer, self.sent, self.text = tokenizer, "", ""
        self.ids: list[int] = []             # the output so far (outputs mid-stream carry only their new tokens)
        self.prefix = self.read = 0          # window start; tokens already in self.text
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def _advance(self, ids: list[int]) -> None:
        dec = lambda xs: self.tokenizer.decode(xs, skip_special_tokens=True)  # noqa: E731
        old = dec(ids[self.prefix:self.read])
        new = dec(ids[self.prefix:])
        if len(new) > len(old) and not new.endswith("\ufffd"):
            self.text += new[len(old):]
            self.prefix, self.read = max(self.read - 4, 0), len(ids)

    def delta(self, out: RequestOutput, drop_last: bool = False) -> str:
        if out.finished:
            full = out.text if not drop_last else ""
        else:
            self.ids += out.new_token_ids
            self._advance(self.ids)
            full = self.text[:max(len(self.text) - self.holdback, 0)]
        if len(full) <= len(self.sent):
            return ""
        new, self.sent = full[len(self.sent):], full
        return new


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer: Tokenizer, ids: list[int], entries: list, offset: int) -> dict:
    """The legacy completions `logprobs` object for tokens `ids` whose entries are (logprob, top ids, top logprobs)
    or None (the first prompt token has no logprob); text offsets count from `offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, entry in zip(ids, entries):
        text = token_text(tokenizer, tid)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        lp, top_ids, top_lps = entry
        out["token_logprobs"].append(lp)
        top = {token_text(tokenizer, t): v for t, v in zip(top_ids, top_lps)}
        top.setdefault(text, lp)      # the sampled token is always listed, as OpenAI does
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(tokenizer: Tokenizer, ids: list[int], entries: list) -> dict:
    """The chat completions `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for tid, (lp, top_ids, top_lps) in zip(ids, entries):
        text = token_text(tokenizer, tid)
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": (t := token_text(tokenizer, i)), "logprob": v,
                                          "bytes": list(t.encode())} for i, v in zip(top_ids, top_lps)]})
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
