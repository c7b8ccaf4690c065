"""Chat conversations -> text and token ids, with what people wrote always encoded as text.

A template (sandboxed Jinja, the `chat_template` of tokenizer_config.json) lays out the turns. Its own markers (BOS,
<｜User｜>, <｜Assistant｜>, EOS) are control tokens; message content is not: a user who writes "<｜Assistant｜>" gets
those characters, not a forged assistant turn. So before rendering, every special-token string inside content
(found as the tokenizer finds them) is swapped for a sentinel that no text can hold (random digits, drawn per call);
the template then renders as usual (its own edits of content, a trim or a split, still apply), and the result is
encoded piece by piece: the text between sentinels with special tokens recognised (only the template's own are left
there), each sentinel as its special string split into ordinary tokens. Content without special-token strings thus
encodes exactly like the plain rendered text.

The server's chat completions and /tokenize use this, and post-training data must too (`encode_chat`), so that a
model is trained on the ids it is served.
"""

from __future__ import annotations

import re
import secrets

from .tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS

Piece = tuple[str, bool]        # (text, is user text: its special-token strings are split into ordinary tokens)


class ChatTemplate:
    """A compiled template. `messages` are dicts with "role" and "content" (a string)."""

    def __init__(self, source: str | None = None):
        import jinja2.sandbox          # the serve / post-training dependency, not needed to tokenise documents

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise       # what Hugging Face templates call on a bad conversation
        self.source = source or CHAT_TEMPLATE
        self._template = env.from_string(self.source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as one text (for display: in it, content's special-token strings look like markers)."""
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=SPECIAL_TOKENS["bos"], eos_token=SPECIAL_TOKENS["eos"])

    def pieces(self, tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[Piece]:
        """The rendered conversation as pieces whose texts join to `render`'s; the special-token strings found in
        content come out as pieces of their own, marked as user text."""
        texts = [m.get("content") if isinstance(m.get("content"), str) else "" for m in messages]
        spans = tokenizer.special_spans(texts)
        if not any(spans):
            return [(self.render(messages, add_generation_prompt), False)]
        mark = f"\x00{secrets.randbelow(10**16):016d}:"           # digits and NUL: unchanged by upper() / trim
        found: list[str] = []                                   # sentinel k stands for found[k]
        escaped = []
        for m, text, where in zip(messages, texts, spans):
            out, end = [], 0
            for a, b in where:
                out += [text[end:a], f"{mark}{len(found)}\x00"]
                found.append(text[a:b])
                end = b
            escaped.append(dict(m, content="".join(out) + text[end:]) if where else m)
        parts = re.split(re.escape(mark) + r"(\d+)\x00", self.render(escaped, add_generation_prompt))
        # text, sentinel index, text, ..., text
        return [p for p in ((found[int(part)], True) if k % 2 else (part, False) for k, part in enumerate(parts))
                if p[0]]

    def encode(self, tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return encode_pieces(tokenizer, self.pieces(tokenizer, messages, add_generation_prompt))


def encode_pieces(tokenizer, pieces: list[Piece]) -> list[int]:
    """Template text with special tokens recognised, user text with them split: each distinct piece once, in two
    batched calls."""
    encoded = {}
    for user in (False, True):
        texts = list(dict.fromkeys(t for t, u in pieces if u == user))
        encoded.update(zip(((t, user) for t in texts), tokenizer.encode_batch(texts, split_special_tokens=user)))
    return [i for piece in pieces for i in encoded[piece]]


def encode_chat(tokenizer, messages: list[dict], template: str | None = None,
                add_generation_prompt: bool = False) -> list[int]:
    """A conversation's ids for post-training: the whole conversation (no generation prompt) by default."""
    return ChatTemplate(template).encode(tokenizer, messages, add_generation_prompt)


def _raise(message: str):
    import jinja2
    raise jinja2.TemplateError(message)
