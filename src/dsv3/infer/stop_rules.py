"""When a generated sequence stops, checked as each token is appended (`StopRules`, one per engine):

- "stop": EOS (unless ignore_eos), one of its stop_token_ids, or one of its stop strings in the output's text
  (the text leaves the stop out: OpenAI's `stop`, vLLM's default; token_ids keep a stop token);
- "length": max_tokens, or the context (the engine's max_model_len);
- min_tokens (vLLM's semantics): none of that ends an output shorter than min_tokens; before then the stop tokens
  are masked out of sampling (`suppress`), and a stop string counts only if it starts after those tokens' text.

Stop strings are looked for in the output's tail, decoding only the tail (`stop_may_end_here`). The engine decoded
a sequence's whole output after every token to look for its stop strings: quadratic in the output (a 32K-token
output: 23 ms a token on one CPU core at the end, minutes of engine time in all, taken from every other sequence's
steps; any client can ask for it with one `stop`). With a byte-level tokenizer (DeepSeek-V3's) the text is the lossy
UTF-8 of the tokens' bytes, so appending a token changes only the text's last character (an incomplete character's
U+FFFD) and adds at most as many characters as the token has bytes: a new occurrence lies in the last `longest stop
+ token's bytes` characters. A window of the last tokens decodes to the same characters as the whole output once
past its first 3 (continuation bytes of a character begun before the window); it is widened until it covers that
span. Exact: it finds a new occurrence if and only if the whole decode does (the whole output is then decoded, as
before, for its final text). Other decoders: the whole output, as before.
"""

from __future__ import annotations

import torch
from tokenizers import decoders

from .overlap import to_device
from .sequence import Sequence


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


class StopRules:
    """The stop conditions of one engine: its EOS ids, tokenizer (None: token ids only, no text) and context."""

    def __init__(self, tokenizer, eos_ids: frozenset[int], max_model_len: int):
        self.tokenizer, self.eos_ids, self.max_model_len = tokenizer, eos_ids, max_model_len
        # the special tokens a decode skips, for the tail search (byte-level tokenizers only; else None)
        self.skipped = ({i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
                        if tokenizer is not None and is_byte_level(tokenizer) else None)

    def reason(self, seq: Sequence) -> str | None:
        """The finish reason that the token just appended to `seq` gives, or None. The text is decoded only when
        something needs it: a stop string that may have appeared (only the output's tail is decoded to tell) or the
        finished output; `seq.text` is set then."""
        token, p = seq.token_ids[-1], seq.params
        reason = None
        early = seq.num_output_tokens <= p.min_tokens     # this token is one of the first min_tokens: no stop yet
        if ((token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids) and not early:
            reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            reason = "length"
        if early and not reason:
            may_stop = False               # no stop string ends the output before min_tokens
        elif self.tokenizer is not None and p.stop and not reason and self.skipped is not None:
            may_stop = stop_may_end_here(self.tokenizer, seq.token_ids, p.stop, self.skipped, seq.num_prompt_tokens)
        else:
            may_stop = bool(p.stop)
        if self.tokenizer is not None and (may_stop or reason):
            # a stop token's text is left out of the text, as a stop string's is: the token ids keep it
            ids = seq.output_ids[:-1] if reason == "stop" else seq.output_ids
            seq.text = self.tokenizer.decode(ids, skip_special_tokens=True)
            start = self.stop_from(seq)
            at = min((i for i in (seq.text.find(stop, start) for stop in p.stop) if i >= 0), default=-1)
            if at >= 0:
                seq.text, reason = seq.text[:at], "stop"
        return reason

    def stop_from(self, seq: Sequence) -> int:
        """Where in the output's text a stop string may start: past the text of its first min_tokens tokens (a
        stop string starting there does not end it; one in the text after them cuts there, so the text keeps
        those tokens whole). Decoded once."""
        if not seq.params.min_tokens:
            return 0
        if seq.num_output_tokens < seq.params.min_tokens:      # ended short of them (the context): none may start
            return 1 << 62
        if seq.stop_from is None:
            head = self.tokenizer.decode(seq.output_ids[:seq.params.min_tokens], skip_special_tokens=True)
            seq.stop_from = len(head.rstrip("\ufffd"))     # (a character the next token completes)
        return seq.stop_from

    def suppress(self, done: list[Sequence], scores: torch.Tensor) -> torch.Tensor:
        """min_tokens: the rows of sequences whose output is still shorter cannot sample a token that would end it
        (EOS where not ignored, stop_token_ids): -inf there (vLLM's MinTokensLogitsProcessor), in a copy (the
        logprobs read the model's own logits). The token sampled now is output token num_output_tokens + 1 (pending
        ones counted). A step with no such row returns `scores` as it is, with no work."""
        rows, cols = [], []
        for i, seq in enumerate(done):
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
                rows += [i] * len(stops)
                cols += stops
        if not rows:
            return scores
        index = to_device([rows, cols], torch.long, scores.device)
        return scores.index_put((index[0], index[1]), torch.tensor(float("-inf"), dtype=scores.dtype,
                                                                   device=scores.device))
