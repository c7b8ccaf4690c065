"""Whether a stop string can have appeared with a sequence's newest token, decoding only the output's tail.

The engine decoded a sequence's whole output after every token to look for its stop strings: quadratic in the output
(a 32K-token output: 23 ms a token on one CPU core at the end, minutes of engine time in all, taken from every other
sequence's steps; any client can ask for it with one `stop`). With a byte-level tokenizer (DeepSeek-V3's) the text is
the lossy UTF-8 of the tokens' bytes, so appending a token changes only the text's last character (an incomplete
character's U+FFFD) and adds at most as many characters as the token has bytes: a new occurrence lies in the last
`longest stop + token's bytes` characters. A window of the last tokens decodes to the same characters as the whole
output once past its first 3 (continuation bytes of a character begun before the window); it is widened until it
covers that span. Exact: it finds a new occurrence if and only if the whole decode does (the engine then decodes
the whole output, as before, for its final text). Other decoders: the whole output, as before.
"""

from __future__ import annotations

from tokenizers import decoders


def is_byte_level(tokenizer) -> bool:
    return isinstance(getattr(tokenizer.backend, "decoder", None), decoders.ByteLevel)


def stop_may_end_here(tokenizer, ids: list[int], stops: list[str], special: set[int], start: int = 0) -> bool:
    """True if the decoded output ids[start:] (special tokens `special` skipped) contains a stop string that the
    decode of ids[start:-1] did not. `start`, not a slice of the output: copying the whole output every token was
    quadratic in it again (a sequence's token_ids are its prompt, then its output)."""
    if len(ids) <= start or ids[-1] in special:
        return False                        # a skipped token adds no text
    piece = tokenizer.backend.id_to_token(ids[-1]) or ""       # one character per byte (or an added token's text)
    need = max(map(len, stops)) + len(piece)
    width = need + 4
    while True:
        text = tokenizer.decode(ids[max(start, len(ids) - width):], skip_special_tokens=True)
        if width >= len(ids) - start:
            return any(s in text for s in stops)
        if len(text) >= need + 3:
            agreed = text[3:]
            return any(s in agreed for s in stops)
        width *= 2
