"""Tokenise a corpus once into memory-mappable shards; read documents back as zero-copy views.

Layout of a shard directory (one `meta.json`, then per split `train`/`val` and shard i):
    {split}_{i:04d}.bin       the tokens, raw little-endian uint16 (vocab <= 65536) or uint32
    {split}_{i:04d}.idx.npy   int64 document start offsets into the .bin, plus the final end
    {split}_{i:04d}.code.npy  uint8, 1 where the document is code (FIM applies only to those, TR 4.1)
Documents never straddle shards. The directory is built under a temporary sibling and renamed into place, so
a killed build leaves the previous dataset or none, never a half-written one.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..checkpoint.atomic import atomic_directory
from .corpus import Document, iter_documents, sources_fingerprint
from .tokenizer import Tokenizer

FORMAT = 1
SPLITS = ("train", "val")
_OWN_FILE = re.compile(r"meta\.json|(train|val)_\d{4,}\.(bin|idx\.npy|code\.npy)")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids 0..65535, so vocabularies up to 65536 take half the disk and page cache."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def val_score(text: str, seed: int) -> float:
    """A uniform [0, 1) number from the text: a document goes to validation when it is below val_fraction.

    Hashing the content (not the position) keeps the split stable when sources are added or reordered, and
    sends exact duplicates to the same split, so validation never contains a copy of a training document.
    """
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode())
    return int.from_bytes(h.digest(), "little") / 2**64


class StreamDigest:
    """A short hash of a token stream: every sequence's length, flag and bytes, in order. What a loader position
    means: a loader state records it, and a resume on another stream (an edited corpus, another tokenizer, other
    chat data or prompts) is refused rather than continued silently on other data."""

    def __init__(self):
        self._h = hashlib.blake2b(digest_size=8)

    def add(self, data: bytes, n: int, flag: int = 0) -> None:
        """One sequence: its `n` tokens as `data` (their bytes), `flag` a byte of what kind it is."""
        self._h.update(n.to_bytes(8, "little") + bytes([flag]) + data)

    def add_ids(self, ids, flag: int = 0) -> None:
        self.add(np.asarray(ids, dtype=np.int64).tobytes(), len(ids), flag)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class _SplitWriter:
    def __init__(self, out: Path, split: str, dtype: np.dtype, max_tokens: int):
        self.out, self.split, self.dtype, self.max_tokens = out, split, dtype, max_tokens
        self.shards: list[dict] = []
        self.n_docs = self.n_tokens = self.n_code = 0
        self._file = None
        self._offsets: list[int] = [0]
        self._code: list[int] = []
        # the split's content (every document's tokens, length and code flag, in order): what a loader position
        # means. Not the sources' fingerprint (paths, sizes, mtimes): a corpus copied or moved is the same stream
        self._digest = StreamDigest()

    def add(self, ids: np.ndarray, is_code: bool) -> None:
        if self._file is not None and self._offsets[-1] + len(ids) > self.max_tokens:
            self._close_shard()
        if self._file is None:
            self._name = f"{self.split}_{len(self.shards):04d}"
            self._file = open(self.out / f"{self._name}.bin", "wb")  # noqa: SIM115 (open across add() calls)
        data = ids.astype(self.dtype, copy=False).tobytes()
        self._file.write(data)
        self._digest.add(data, len(ids), int(is_code))
        self._offsets.append(self._offsets[-1] + len(ids))
        self._code.append(int(is_code))
        self.n_docs += 1
        self.n_tokens += len(ids)
        self.n_code += int(is_code)

    def _close_shard(self) -> None:
        self._file.close()
        np.save(self.out / f"{self._name}.idx.npy", np.asarray(self._offsets, dtype=np.int64))
        np.save(self.out / f"{self._name}.code.npy", np.asarray(self._code, dtype=np.uint8))
        self.shards.append({"name": self._name, "n_docs": len(self._code), "n_tokens": self._offsets[-1]})
        self._file, self._offsets, self._code = None, [0], []

    def close(self) -> dict:
        if self._file is not None:
            self._close_shard()
        return {"n_docs": self.n_docs, "n_tokens": self.n_tokens, "n_code_docs": self.n_code, "shards": self.shards,
                "digest": self._digest.hexdigest()}


def _chunks(docs: Iterator[Document], max_docs: int = 512, max_chars: int = 8 << 20) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    chars = 0
    for d in docs:
        chunk.append(d)
        chars += len(d.text)
        if len(chunk) >= max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _progress(enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(desc="tokenising", unit="doc", file=sys.stderr, dynamic_ncols=True)


def build_shards(tokenizer: Tokenizer, sources: list[str], out_dir: str | Path, val_fraction: float = 0.01,
                 seed: int = 0, max_tokens_per_shard: int = 50_000_000, progress: bool = True) -> ShardSet:
    """Tokenise every document of `sources` into train/val shards under `out_dir`; returns the opened set.

    If `out_dir` already holds a complete build of the same sources with the same tokenizer, seed and
    val_fraction, it is returned as is; "the same sources" means the same names holding the same files (paths,
    sizes, modification times: corpus.sources_fingerprint), so an edited corpus is rebuilt. Sources without any
    document are an error naming them. When val_fraction > 0 and there are at least two documents, each split gets
    at least one; a single document is trained on.
    """
    if isinstance(sources, (str, Path)):
        raise TypeError(f"sources must be a list of strings, got the single string {sources!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if max_tokens_per_shard < 1:
        raise ValueError(f"max_tokens_per_shard={max_tokens_per_shard} must be positive")
    out = Path(out_dir)
    key = {"sources": [str(s) for s in sources], "sources_fingerprint": sources_fingerprint([str(s) for s in sources]),
           "tokenizer": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size, "seed": seed,
           "val_fraction": val_fraction, "special_tokens": "text"}     # builds that encoded them as tokens: rebuilt
    if (out / "meta.json").is_file():
        if (done := _same_build(out, key)) is not None:
            return done
        # rebuilding replaces the whole directory: only one holding nothing but a build's own files (some other
        # meta.json beside the user's files is not an earlier build)
        if foreign := sorted(p.name for p in out.iterdir() if not _OWN_FILE.fullmatch(p.name)):
            raise ValueError(f"{out} holds files build_shards did not write ({', '.join(foreign[:5])}); refusing to "
                             f"replace it")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not a shard directory (no meta.json); refusing to replace it")

    dtype = token_dtype(tokenizer.vocab_size)
    try:
        return _build(tokenizer, out, key, dtype, val_fraction, seed, max_tokens_per_shard, progress)
    except OSError:
        # another run sharing data.cache_dir renamed the same build into place first (ours then cannot replace
        # the non-empty directory): the content is the same, so use it rather than fail the run
        if (done := _same_build(out, key)) is None:
            raise
        return done


def _same_build(out: Path, key: dict) -> ShardSet | None:
    """The complete build of `key` at `out`, or None (absent, another build, unreadable or damaged)."""
    try:
        meta = json.loads((out / "meta.json").read_text())
        if meta.get("complete") is True and all(meta.get(k) == v for k, v in key.items()):
            return ShardSet.open(out)
    except (ValueError, OSError):
        pass
    return None


def _build(tokenizer: Tokenizer, out: Path, key: dict, dtype: np.dtype, val_fraction: float, seed: int,
           max_tokens_per_shard: int, progress: bool) -> ShardSet:
    with atomic_directory(out) as tmp:
        writers = {s: _SplitWriter(tmp, s, dtype, max_tokens_per_shard) for s in SPLITS}
        try:
            _tokenise(tokenizer, iter_documents(key["sources"]), writers, val_fraction, seed, progress)
        finally:
            splits = {s: w.close() for s, w in writers.items()}
        if not any(sp["n_docs"] for sp in splits.values()):
            raise ValueError(f"the data sources {key['sources']} hold no documents (every file is empty)")
        meta = {"format": FORMAT, **key, "dtype": dtype.name, "eos_id": tokenizer.eos_id,
                "max_tokens_per_shard": max_tokens_per_shard, "splits": splits, "complete": True}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return ShardSet.open(out)


@contextlib.contextmanager
def _signals_between_chunks() -> Iterator[Callable[[], None]]:
    """SIGINT / SIGTERM recorded while tokenising and raised between chunks (as KeyboardInterrupt, with the signal's
    number: dsv3.cli's "aborted by"): `tokenizers`' encode_batch swallows a Ctrl-C that lands inside it, so a run
    stopped while tokenising its corpus went on to train to the end. Off the main thread: nothing installed."""
    got: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, lambda signum, frame: got.append(signum))

    def check() -> None:
        if got:
            e = KeyboardInterrupt(signal.Signals(got[0]).name)
            e.signum = got[0]
            raise e
    try:
        yield check
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    check()


def _tokenise(tokenizer: Tokenizer, docs: Iterator[Document], writers: dict[str, _SplitWriter],
              val_fraction: float, seed: int, progress: bool) -> None:
    bar = _progress(progress)
    dtype = writers["train"].dtype
    # Each document is written one step late, so the last one can still go to a split that would be empty.
    pending: tuple[str, np.ndarray, bool] | None = None
    try:
        with _signals_between_chunks() as check:
            for chunk in _chunks(docs):
                # documents are text: a special-token string in one ("<｜end▁of▁sentence｜>", "<｜User｜>") is its
                # characters, never the control token (the chat path's user text: data/chat.py's encode_pieces)
                texts = [d.text for d in chunk]
                for doc, ids in zip(chunk, tokenizer.encode_batch(texts, split_special_tokens=True)):
                    if not ids:
                        continue
                    if pending is not None:
                        writers[pending[0]].add(pending[1], pending[2])
                    split = "val" if val_score(doc.text, seed) < val_fraction else "train"
                    pending = (split, np.asarray(ids, dtype=dtype), doc.is_code)
                check()
                if bar is not None:
                    bar.update(len(chunk))
                    bar.set_postfix(tokens=sum(w.n_tokens for w in writers.values()), refresh=False)
    finally:
        if bar is not None:
            bar.close()
    if pending is not None:
        split = pending[0]
        # training comes first: a corpus of one document (one big file) trains on it rather than validating on it
        if writers["train"].n_docs == 0:
            split = "train"
        elif val_fraction > 0 and writers["val"].n_docs == 0:
            split = "val"
        writers[split].add(pending[1], pending[2])


class _Split:
    def __init__(self, root: Path, info: dict, dtype: np.dtype):
        self.n_docs, self.n_tokens = info["n_docs"], info["n_tokens"]
        self.bins: list[np.memmap] = []
        self.idx: list[np.ndarray] = []
        self.code: list[np.ndarray] = []
        self.first_doc = [0]
        for sh in info["shards"]:
            bin_path = root / f"{sh['name']}.bin"
            try:
                idx = np.load(root / f"{sh['name']}.idx.npy", mmap_mode="r")
                code = np.load(root / f"{sh['name']}.code.npy")
                size = bin_path.stat().st_size
            except OSError as e:
                raise ValueError(f"shard set {root} is incomplete: {e}") from None
            if (len(idx) != sh["n_docs"] + 1 or len(code) != sh["n_docs"] or idx[-1] != sh["n_tokens"]
                    or size != sh["n_tokens"] * dtype.itemsize):
                raise ValueError(f"shard {bin_path} does not match meta.json (truncated or edited); rebuild it")
            self.bins.append(np.memmap(bin_path, dtype=dtype, mode="r"))
            self.idx.append(idx)
            self.code.append(code)
            self.first_doc.append(self.first_doc[-1] + sh["n_docs"])
        if self.first_doc[-1] != self.n_docs:
            raise ValueError(f"shard set {root}: shard document counts do not add up to n_docs; rebuild it")

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.n_docs:
            raise IndexError(f"document {i} out of range [0, {self.n_docs})")
        k = bisect.bisect_right(self.first_doc, i) - 1
        return k, i - self.first_doc[k]


class ShardSet:
    """A read-only view of a directory written by `build_shards`."""

    def __init__(self, root: Path, meta: dict):
        self.root, self.meta = root, meta
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self._splits = {s: _Split(root, info, self.dtype) for s, info in meta["splits"].items()}

    @classmethod
    def open(cls, root: str | Path) -> ShardSet:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"shard directory {root} does not exist")
        try:
            meta = json.loads((root / "meta.json").read_text())
        except FileNotFoundError:
            raise ValueError(f"{root} is not a complete shard set (no meta.json); build it with build_shards") \
                from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{root / 'meta.json'} is not valid JSON: {e}") from None
        if meta.get("complete") is not True:
            raise ValueError(f"shard set {root} is incomplete (meta.json lacks complete: true); rebuild it")
        if meta.get("format") != FORMAT:
            raise ValueError(f"shard set {root} has format {meta.get('format')}, this code reads {FORMAT}; rebuild")
        return cls(root, meta)

    def _split(self, split: str) -> _Split:
        if split not in self._splits:
            raise ValueError(f"unknown split {split!r}; {self.root} has {', '.join(self._splits)}")
        return self._splits[split]

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def n_docs(self, split: str) -> int:
        return self._split(split).n_docs

    def identity(self, split: str) -> str:
        """A short hash of the split's token stream, recorded in loader states: a resume on other shards (an edited
        corpus, another tokenizer) is refused rather than silently continued on other data."""
        self._split(split)                  # an unknown split named
        if digest := self.meta["splits"][split].get("digest"):
            return digest
        # a build from before the digests: the build's key (the sources' files, tokenizer, seed, val_fraction)
        key = [self.meta.get(k) for k in ("sources_fingerprint", "tokenizer", "vocab_size", "seed", "val_fraction",
                                          "special_tokens")]
        return "build-" + hashlib.blake2b(json.dumps(key).encode(), digest_size=8).hexdigest()

    def n_tokens(self, split: str) -> int:
        return self._split(split).n_tokens

    def doc(self, split: str, i: int) -> np.ndarray:
        """The tokens of document i: a view into the memory map, not a copy."""
        s = self._split(split)
        k, j = s.locate(i)
        idx = s.idx[k]
        return s.bins[k][idx[j]:idx[j + 1]]

    def is_code(self, split: str, i: int) -> bool:
        s = self._split(split)
        k, j = s.locate(i)
        return bool(s.code[k][j])

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}: {v.n_docs} docs / {v.n_tokens} tokens" for s, v in self._splits.items())
        return f"ShardSet({str(self.root)!r}, {self.dtype.name}, {sizes})"
