"""Byte-level BPE tokenizer with DeepSeek-V3's special tokens, pre-tokenizer and file layout.

`Tokenizer` wraps a `tokenizers.Tokenizer`, so it loads our own files and DeepSeek's released `tokenizer.json`
alike. Specials are found by name, never by position: ours get ids 0..7 (bos=0, eos=1, as in the model
configs), DeepSeek's sit at 0, 1, 2 and 128800+. `save` also writes a `tokenizer_config.json`, so
`transformers.AutoTokenizer.from_pretrained` loads the directory and gives the same ids.

A special-token string inside a text is its control token by default (raw prompts asked for as such); with
`split_special_tokens` it is ordinary text (what people wrote: chat content, see data/chat.py, and the training
documents, data/shards.py). "Special" there
means every added token, flagged special or not: DeepSeek's vocabulary adds `<think>` and the tool-call markers as
tokens that a decode keeps, and a user who writes "</think>" must not close the model's reasoning either (an
assistant turn's own `<think>` stays the token: data/chat.py). Encoding goes through
`tokenizers`' encode_batch, which releases the GIL, so a long text tokenised on a worker thread leaves the other
threads (a server's event loop) running.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFTokenizer

# Order matters: ids are assigned in this order, and the model configs assume bos=0, eos=1.
SPECIAL_TOKENS: dict[str, str] = {
    "bos": "<｜begin▁of▁sentence｜>",
    "eos": "<｜end▁of▁sentence｜>",
    "pad": "<｜▁pad▁｜>",
    "fim_begin": "<｜fim▁begin｜>",
    "fim_hole": "<｜fim▁hole｜>",
    "fim_end": "<｜fim▁end｜>",
    "user": "<｜User｜>",
    "assistant": "<｜Assistant｜>",
}

# DeepSeek-V3's released pre-tokenizer: numbers in groups of at most 3 digits, runs of CJK kept apart, then a
# GPT-4-like word/punctuation/whitespace split that keeps indentation runs whole (good for code).
_SPLITS = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    (r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"""
     r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""),
)

# DeepSeek-V3's layout: the system prompt follows BOS with no role marker; each assistant turn ends with EOS. Rendered
# and encoded by data/chat.py (content as text).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


DOCUMENT_START_KEY = "dsv3_document_start"    # tokenizer_config.json: "eos" for the tokenizers dsv3 writes


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of the special tokens (None where the vocabulary lacks one)."""

    def __init__(self, tok: _HFTokenizer):
        self._tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        # Max id + 1, not the entry count: released vocabularies have holes, and this sizes embeddings and dtypes.
        self.vocab_size: int = max(vocab.values()) + 1
        ids = {name: vocab.get(text) for name, text in SPECIAL_TOKENS.items()}
        if ids["eos"] is None:
            raise ValueError(f"tokenizer has no EOS token {SPECIAL_TOKENS['eos']!r}; documents cannot be packed")
        self.bos_id: int | None = ids["bos"]
        self.eos_id: int = ids["eos"]
        self.pad_id: int | None = ids["pad"]
        self.fim_begin_id: int | None = ids["fim_begin"]
        self.fim_hole_id: int | None = ids["fim_hole"]
        self.fim_end_id: int | None = ids["fim_end"]
        self.user_id: int | None = ids["user"]
        self.assistant_id: int | None = ids["assistant"]

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, given either the file or a directory holding it."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        try:
            tok = _HFTokenizer.from_file(str(file))
        except Exception as e:
            raise ValueError(f"{file} is not a valid tokenizer.json: {e}") from e
        try:
            return cls(tok)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None

    @property
    def fim_ids(self) -> tuple[int, int, int] | None:
        """(fim_begin, fim_hole, fim_end), or None if any is missing."""
        ids = (self.fim_begin_id, self.fim_hole_id, self.fim_end_id)
        return None if None in ids else ids  # type: ignore[return-value]

    @property
    def backend(self) -> _HFTokenizer:
        return self._tok

    def fingerprint(self) -> str:
        """A hash of the full tokenizer definition: shard caches are only valid for the tokenizer that made them."""
        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str, split_special_tokens: bool = False) -> list[int]:
        return self.encode_batch([text], split_special_tokens)[0]

    def encode_batch(self, texts: Sequence[str], split_special_tokens: bool = False) -> list[list[int]]:
        # in steps of 4096 texts: the GIL is held while a step's results become Python objects
        tok, texts = self._text_tok if split_special_tokens else self._tok, list(texts)
        return [e.ids for i in range(0, len(texts), 4096)
                for e in tok.encode_batch(texts[i:i + 4096], add_special_tokens=False)]

    @functools.cached_property
    def _text_tok(self) -> _HFTokenizer:
        """A copy that reads added-token strings as text (a copy: the switch is state, and encoding may run on
        several threads at once). `encode_special_tokens` splits only the tokens flagged special, so the copy flags
        them all."""
        definition = json.loads(self._tok.to_str())
        for t in definition.get("added_tokens", []):
            t["special"] = True
        tok = _HFTokenizer.from_str(json.dumps(definition))
        tok.encode_special_tokens = True
        return tok

    def special_spans(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """The (start, end) character offsets of the added-token strings in each text, found as `encode` finds
        them (tokenizers' added-token matcher: leftmost-longest), in linear time and without the GIL."""
        encodings = self._special_finder.encode_batch(list(texts), add_special_tokens=False)
        return [[span for i, span in zip(e.ids, e.offsets) if i != 0] for e in encodings]

    @functools.cached_property
    def _special_finder(self) -> _HFTokenizer:
        """A tokenizer holding only the special tokens (everything between them is one unknown word): it finds them
        without tokenising the text around them."""
        finder = _HFTokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
        finder.add_special_tokens(list(self._tok.get_added_tokens_decoder().values()))     # flagged special or not
        return finder

    @functools.cached_property
    def added_affixes(self) -> tuple[frozenset[str], frozenset[str], tuple[str, ...], int]:
        """(proper prefixes, proper suffixes, strings, longest length) of the added-token strings (flagged special or
        not, as `special_spans` finds them): what a chat content's edges are checked against (dsv3.data.chat)."""
        strings = tuple(sorted({t.content for t in self._tok.get_added_tokens_decoder().values()}))
        return (frozenset(t[:i] for t in strings for i in range(1, len(t))),
                frozenset(t[i:] for t in strings for i in range(1, len(t))), strings, max(map(len, strings), default=0))

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes one token stands for (at least): a text of n characters has at least
        n / max_token_bytes tokens, a bound that refuses an over-long prompt without tokenising it."""
        vocab = self._tok.get_vocab(with_added_tokens=True)       # token string (one char per byte) -> id
        texts = self._tok.decode_batch([[i] for i in vocab.values()], skip_special_tokens=False)
        # decoded length: the added tokens' and any non-byte-level vocabulary's; a partial character decodes to
        # U+FFFD (3 bytes), never fewer bytes than it stands for
        return max(max(len(t.encode("utf-8", "surrogatepass")) for t in texts), max(map(len, vocab)), 1)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, seqs: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        """As decode, for many sequences, and without holding the GIL (decode holds it: for a long sequence on a
        worker thread, use this)."""
        return self._tok.decode_batch([[int(i) for i in ids] for ids in seqs], skip_special_tokens=skip_special_tokens)

    def save(self, out_dir: str | Path) -> Path:
        """Write tokenizer.json and a transformers-loadable tokenizer_config.json; returns the directory."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out / "tokenizer.json"))
        name = {k: SPECIAL_TOKENS[k] if getattr(self, f"{k}_id") is not None else None for k in ("bos", "eos", "pad")}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name["bos"], "eos_token": name["eos"], "pad_token": name["pad"],
            # As DeepSeek's config: BOS only when the caller asks for special tokens, never EOS. Our encode()
            # adds none, so AutoTokenizer(..., add_special_tokens=False) gives identical ids.
            "add_bos_token": name["bos"] is not None, "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # anything else breaks the exact byte-level round trip
            "model_max_length": 1 << 30,
            "chat_template": CHAT_TEMPLATE,
            # what a document starts after in dsv3's pre-training (doc EOS doc EOS: dsv3.data.packing), whatever
            # add_bos_token says; `dsv3 generate --prefix auto` reads it (transformers ignores the key)
            DOCUMENT_START_KEY: "eos",
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return out


def read_tokenizer_config(tok_dir: str | Path) -> dict:
    """`tok_dir`'s tokenizer_config.json ({} without one: the chat template and BOS convention then default). A file
    that is not a JSON object is a ValueError naming it: json's own message names no file, and a list would fail
    later as an AttributeError."""
    path = Path(tok_dir) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON object ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a JSON object (got {type(cfg).__name__})")
    return cfg


def read_chat_template(tok_dir: str | Path) -> str | None:
    """`tok_dir`'s chat template as transformers reads it: `chat_template.jinja` first (what its save_pretrained
    writes now, leaving tokenizer_config.json without one: ignoring the file would serve the built-in DeepSeek
    template instead of the model's), else tokenizer_config.json's `chat_template`, of named templates the
    "default" one. None: the directory gives none."""
    cfg = read_tokenizer_config(tok_dir)            # read either way: a damaged file is refused, not skipped
    jinja = Path(tok_dir) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = cfg.get("chat_template")
    if isinstance(template, list):                  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(f"{Path(tok_dir) / 'tokenizer_config.json'}: chat_template names {sorted(named)}, "
                             f"none of them 'default' (give one with --chat-template)")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{Path(tok_dir) / 'tokenizer_config.json'}: chat_template is not a string")
    return template


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None,
                    min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer; `vocab_size` counts the specials and the 256 byte tokens.

    With all 256 bytes in the initial alphabet any string encodes and decodes exactly. A small corpus may run
    out of pairs to merge, giving a vocabulary smaller than asked for (never larger).
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens plus "
                         f"{len(SPECIAL_TOKENS)} specials, so at least {256 + len(SPECIAL_TOKENS)}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency} must be >= 1")
    if out_dir is not None:     # before training: the refusal must not come after an hour of it
        _check_out_dir(Path(out_dir))
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in _SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(  # used only when a caller asks for special tokens
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
    out = Tokenizer(tok)
    if out_dir is not None:
        out.save(out_dir)
    return out


def _check_out_dir(out: Path) -> None:
    """Refuse to write a trained tokenizer over one it did not write: `out` may hold only what an earlier training
    wrote there (its two files, the config carrying DOCUMENT_START_KEY). A model directory's tokenizer (a release's
    chat template) or anything else there is the user's."""
    if not out.is_dir():
        if out.exists():
            raise FileExistsError(f"{out} exists and is not a directory")
        return
    names = {p.name for p in out.iterdir()}
    if not names & {"tokenizer.json", "tokenizer_config.json"}:
        return
    others = sorted(names - {"tokenizer.json", "tokenizer_config.json"})
    try:
        ours = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8")).get(DOCUMENT_START_KEY)
    except (OSError, ValueError, AttributeError):
        ours = None
    if others or ours is None:
        raise FileExistsError(f"{out} already holds tokenizer.json / tokenizer_config.json"
                              + (f" beside {', '.join(others[:5])}" if others else "")
                              + " that a tokenizer training did not write; choose another output directory")
