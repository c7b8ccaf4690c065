"""Engine outputs -> OpenAI response pieces: incremental text, logprobs in both APIs' shapes, usage, the fields
every body and chunk of a response repeats, SSE framing."""

from __future__ import annotations

import codecs
import json
import time
import uuid
import weakref
from dataclasses import dataclass

from ..data import Tokenizer
from ..infer.engine import RequestOutput
from ..infer.stop_rules import is_byte_level


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
    final text. Special tokens are left out, but for those in `keep` (the markers a chat parser reads): the engine
    finds stop strings in its text without them, so a kept marker is no part of the characters held back.

    The work per step does not grow with the output: `text` keeps only the tail that the holdback can still look at
    (its first character is the output's `base`-th), and what was sent is a count (copying the whole text and what
    was sent of it at every step was quadratic in the output's length, on the event loop)."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], keep: frozenset[int] = frozenset()):
        self.tokenizer, self.text, self.keep = tokenizer, "", keep
        self.base = self.n_sent = 0          # characters of the output before self.text; sent to the client
        self.ids: list[int] = []             # the output so far (outputs mid-stream carry only their new tokens)
        self.prefix = self.read = 0          # window start; tokens already in self.text
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.markers = [TokenTable.of(tokenizer).texts[i] for i in keep] if stop else []
        # how far before the sent text _final may still look: past it, its answer is sent text anyway
        self.lookback = self.holdback + max(map(len, self.markers), default=0)

    def _decode(self, ids: list[int]) -> str:
        if not self.keep:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        special = TokenTable.of(self.tokenizer).special
        return self.tokenizer.decode([i for i in ids if i in self.keep or i not in special])

    def _advance(self, ids: list[int]) -> None:
        dec = self._decode
        old = dec(ids[self.prefix:self.read])
        new = dec(ids[self.prefix:])
        if len(new) > len(old) and not new.endswith("\ufffd"):
            self._commit(new[len(old):], len(ids))
            return
        # Text that keeps ending in U+FFFD is bytes that are not UTF-8 (a random model's, or what a hostile prompt
        # asks for): waiting for it to complete, nothing was released until the end, and the window decoded every
        # step grew with the output (4000 such tokens: 1.7 s of decoding on the event loop for one stream). A
        # character is at most 4 bytes, so the text of all but the last 3 tokens is final where the whole window's
        # text continues it with something more: release that.
        for cut in range(len(ids) - 3, self.read, -1):
            mid = dec(ids[self.prefix:cut])
            if len(mid) <= len(old):
                return
            if len(new) > len(mid) and new.startswith(mid):
                self._commit(mid[len(old):], cut)
                return

    def _commit(self, text: str, read: int) -> None:
        """`text` is final: it is what ids[self.read:read] add."""
        self.text += text
        self.prefix, self.read = max(self.read - 4, 0), read

    def _final(self) -> int:
        """The length of self.text that no stop string can still cut: all but its last `holdback` characters that
        are not kept markers (a marker before them stays in the text wherever a stop string starts after it)."""
        # from marker to marker, not character by character: a walk of `holdback` Python steps per output, on the
        # event loop, cost what the longest stop string's length did (1024 characters: ~1000 steps a token)
        end, n = len(self.text), self.holdback
        while n > 0 and end > 0:
            best = None         # the marker ending nearest `end` within n characters of it: (its end, -index, length)
            for k, m in enumerate(self.markers):
                at = self.text.rfind(m, max(0, end - n + 1 - len(m)), end)
                if at >= 0 and (best is None or (at + len(m), -k) > best[:2]):
                    best = (at + len(m), -k, len(m))
            if best is None:
                return max(0, end - n)
            n -= end - best[0]
            end = best[0] - best[2]
        return end

    def delta(self, out: RequestOutput, drop_last: bool = False) -> str:
        if out.finished:
            full = "" if drop_last else marked_text(self.tokenizer, out, self.keep)
            new = full[self.n_sent:]
            self.n_sent = max(self.n_sent, len(full))
            return new
        self.ids += out.new_token_ids
        self._advance(self.ids)
        end = self.base + self._final()
        if end <= self.n_sent:
            return ""
        new, self.n_sent = self.text[self.n_sent - self.base:end - self.base], end
        # the text _final can no longer need goes, once it is the larger part (each character copied O(1) times)
        cut = self.n_sent - self.lookback - self.base
        if cut > len(self.text) // 2:
            self.text, self.base = self.text[cut:], self.base + cut
        return new


def marked_text(tokenizer: Tokenizer, out: RequestOutput, keep: frozenset[int]) -> str:
    """The finished output's text with the kept markers put back where they were generated: at the length of the
    text before them (the engine's text has already lost any tail a stop string cut off; a marker past its end goes
    too, and so does a last token that stopped the output, as the engine leaves its text out)."""
    ids, text = out.token_ids, out.text
    if not keep:
        return text
    at = [k for k, t in enumerate(ids) if t in keep and not (k == len(ids) - 1 and out.finish_reason == "stop")]
    if not at:
        return text
    ends = text_lengths(tokenizer, ids, at)
    parts, start = [], 0
    for k, end in zip(at, ends):
        if end > len(text):
            break
        parts += [text[start:end], TokenTable.of(tokenizer).texts[ids[k]]]
        start = end
    return "".join(parts) + text[start:]


def text_lengths(tokenizer: Tokenizer, ids: list[int], at: list[int]) -> list[int]:
    """len(decode(ids[:k], skip_special_tokens=True)) for each k of `at` (ascending). A decode per k was quadratic:
    an output of 8000 tokens, every one a marker (a logit_bias asks for that), took 2 s. A byte-level tokenizer's
    text is the lossy UTF-8 of its tokens' bytes, so one pass of an incremental decoder over them counts the same
    characters: those completed so far, plus the U+FFFD a decode ends with while bytes are pending (one for the start
    of a character; two for ED A6, which the incremental decoder holds until it sees the next byte)."""
    if not is_byte_level(tokenizer):
        return [len(s) for s in tokenizer.decode_batch([ids[:k] for k in at], skip_special_tokens=True)]
    table, decoder = TokenTable.of(tokenizer), codecs.getincrementaldecoder("utf-8")("replace")
    out, n, done = [], 0, 0
    for k in at:
        for tid in ids[done:k]:
            if tid not in table.special:
                n += len(decoder.decode(table.bytes[tid]))
        done = k
        out.append(n + len(decoder.getstate()[0].decode("utf-8", "replace")))       # the bytes still pending
    return out


def json_body(body: dict) -> bytes:
    """`body` as JSON, its `choices` one at a time: a response of n x thousands of logprob entries is megabytes, and
    one json.dumps call would hold the GIL (and so the event loop) for all of it."""
    def dumps(key: str, value) -> str:
        if key == "choices":
            return "[" + ", ".join(json.dumps(c, ensure_ascii=False) for c in value) + "]"
        return json.dumps(value, ensure_ascii=False)
    return ("{" + ", ".join(f"{json.dumps(k)}: {dumps(k, v)}" for k, v in body.items()) + "}").encode()


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's bytes_to_unicode, which tokenizers' ByteLevel uses): char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(rest)}


class _ByToken(list):
    """A list by token id whose ids past the tokenizer's last read as `empty`: a model's padded embedding rows
    (DeepSeek-V3's 129,280 hold fewer tokens) are no token, but an untrained model can still sample one, and its
    logprob entry must not be an IndexError (a 500, a stream dying mid-way)."""

    def __init__(self, items, empty):
        super().__init__(items)
        self.empty = empty

    def __getitem__(self, i):
        if isinstance(i, int) and i >= len(self):
            return self.empty
        return super().__getitem__(i)


class TokenTable:
    """Every token id's text (decode([id]), as a lone token reads: one that ends inside a UTF-8 character gives
    U+FFFD) and raw bytes, computed once per tokenizer. The bytes are what OpenAI's logprob `bytes` field carries:
    the token's own bytes, so that a client joins a character split over tokens (the text's U+FFFD cannot). Looking
    entries up here instead of decoding each (~2 us) keeps a response of 100k logprob entries to milliseconds."""

    _tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, tokenizer: Tokenizer):
        backend, n = tokenizer.backend, tokenizer.vocab_size
        self.texts = tokenizer.decode_batch([[i] for i in range(n)])
        added = backend.get_added_tokens_decoder()
        self.special = {i for i, t in added.items() if t.special}      # what skip_special_tokens leaves out
        byte_of = _byte_decoder()
        self.bytes: list[bytes] = []
        for i, text in enumerate(self.texts):
            piece = None if i in added else backend.id_to_token(i)
            raw = None if piece is None else [byte_of.get(ch) for ch in piece]
            self.bytes.append(bytes(raw) if raw and None not in raw else text.encode())
        self.texts, self.bytes = _ByToken(self.texts, ""), _ByToken(self.bytes, b"")

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> TokenTable:
        table = cls._tables.get(tokenizer)
        if table is None:
            table = cls._tables[tokenizer] = cls(tokenizer)
        return table


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return TokenTable.of(tokenizer).texts[token_id]


class TextOffsets:
    """The completions API's `text_offset`: where each token's text starts in the choice's text, counted in
    characters completed by the bytes before it (a character split over tokens starts at its first token; summing
    each token's decoded length counted one U+FFFD per piece and drifted past every such character). Generated
    special tokens take no room: the generated text leaves them out (an echoed prompt keeps them). One per choice,
    carried across a stream's chunks, so offsets count from the start of the choice's text in every chunk."""

    def __init__(self, tokenizer: Tokenizer):
        self.table, self.n = TokenTable.of(tokenizer), 0
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def __call__(self, ids: list[int], generated: bool) -> list[int]:
        out = []
        for tid in ids:
            if generated and tid in self.table.special:
                out.append(self.n)
                continue
            pending = self.decoder.getstate()[0]       # the start of a character the tokens before began
            text = self.decoder.decode(self.table.bytes[tid])
            # those bytes turn out not to start a character: their U+FFFD comes before this token's text
            lead = len(pending.decode("utf-8", "replace")) if pending and text.startswith("\ufffd") else 0
            out.append(self.n + lead)
            self.n += len(text)
        return out


def completion_logprobs(tokenizer: Tokenizer, ids: list[int], entries: list, offsets: list[int]) -> dict:
    """The legacy completions `logprobs` object for tokens `ids` whose entries are (logprob, top ids, top logprobs)
    or None (the first prompt token has no logprob), at text offsets `offsets` (TextOffsets)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": list(offsets)}
    texts = TokenTable.of(tokenizer).texts
    for tid, entry in zip(ids, entries):
        text = texts[tid]
        out["tokens"].append(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        lp, top_ids, top_lps = entry
        out["token_logprobs"].append(lp)
        top = {texts[t]: v for t, v in zip(top_ids, top_lps)}
        top.setdefault(text, lp)      # the sampled token is always listed, as OpenAI does
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(tokenizer: Tokenizer, ids: list[int], entries: list) -> dict:
    """The chat completions `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    table, content = TokenTable.of(tokenizer), []
    for tid, (lp, top_ids, top_lps) in zip(ids, entries):
        content.append({"token": table.texts[tid], "logprob": lp, "bytes": list(table.bytes[tid]),
                        "top_logprobs": [{"token": table.texts[i], "logprob": v, "bytes": list(table.bytes[i])}
                                         for i, v in zip(top_ids, top_lps)]})
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
