"""The data a run trains on: a tokenizer (given, or trained on the sources) and the token shards, both cached under
`data.cache_dir` in a directory named by a hash of what determines them, so runs on the same sources and vocabulary
share one tokenisation, and a changed source list or corpus (a file added, removed or edited: the sources' content
fingerprint) never reuses a stale one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..checkpoint import atomic_directory
from ..config import ConfigError
from ..data.corpus import reads_under, source_files, sources_fingerprint
from ..data import ShardSet, Tokenizer, build_shards, iter_documents, train_tokenizer
from .config import DataConfig


def dataset_key(cfg: DataConfig, vocab_size: int) -> str:
    tok = Path(cfg.tokenizer).resolve() if cfg.tokenizer else None
    tok_id = hashlib.sha256(tok.read_bytes() if tok and tok.is_file() else
                            (tok / "tokenizer.json").read_bytes()).hexdigest() if tok else f"bpe{vocab_size}"
    # the files the sources hold now (for "stdlib": this interpreter's standard library), not just their names
    blob = json.dumps([sources_fingerprint(list(cfg.sources)), tok_id, cfg.seed, cfg.val_fraction])
    name = "-".join(s if s == "stdlib" else Path(s).stem for s in cfg.sources)[:40] or "data"
    return f"{name}-v{vocab_size}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def check_corpus(cfg: DataConfig, run_dir: str) -> None:
    """Before anything is written: every source names files (a mistyped path or a glob matching nothing raised only
    once the run had claimed its directory, leaving it behind), and none reads the run's own directory or the token
    cache (data.sources = ["."] around both): their files (config.json, metrics.jsonl, tokenizer.json) would be
    trained on, and as they change the corpus would, so a --resume finds other data and is refused, or stops on
    metrics.jsonl as a malformed JSONL source."""
    check_tokenizer(cfg)
    for source in cfg.sources:
        if source != "stdlib":
            source_files(source)
    for key, where in (("run_dir", run_dir), ("data.cache_dir", cfg.cache_dir)):
        for source in cfg.sources:
            if reads_under(source, where):
                raise ConfigError(f"invalid run config: data.sources entry {source!r} holds {key}={where!r}, whose "
                                  f"files the run writes and would then train on; move {key} out of it, or list the "
                                  f"corpus's own files or directories instead")


def check_tokenizer(cfg: DataConfig) -> None:
    """data.tokenizer, when given, names a tokenizer.json or a directory holding one."""
    tok = Path(cfg.tokenizer)
    if cfg.tokenizer and not (tok.is_file() or (tok / "tokenizer.json").is_file()):
        raise FileNotFoundError(f"data.tokenizer={cfg.tokenizer!r} is neither a tokenizer.json nor a directory "
                                f"holding one")


def prepare_dataset(cfg: DataConfig, vocab_size: int, progress: bool = True) -> tuple[Tokenizer, ShardSet, Path]:
    """Tokenizer and shards for `cfg`, built on first use. The tokenizer's vocabulary must fit the model's."""
    check_tokenizer(cfg)
    root = Path(cfg.cache_dir) / dataset_key(cfg, vocab_size)
    tok_dir = root / "tokenizer"
    if cfg.tokenizer:
        tokenizer = Tokenizer.load(cfg.tokenizer)
    elif (tok_dir / "tokenizer.json").exists():
        tokenizer = Tokenizer.load(tok_dir)
    else:
        texts = (doc.text for doc in iter_documents(list(cfg.sources)))
        tokenizer = train_tokenizer(texts, vocab_size)
        try:
            with atomic_directory(tok_dir) as tmp:
                tokenizer.save(tmp)
        except OSError:
            # another run sharing data.cache_dir saved its tokenizer first (ours cannot replace the non-empty
            # directory): train on that one, the tokenizer every later run of these sources loads
            if not (tok_dir / "tokenizer.json").is_file():
                raise
            tokenizer = Tokenizer.load(tok_dir)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the {vocab_size} allowed "
                         f"(data.vocab_size, or model.vocab_size)")
    shards = build_shards(tokenizer, list(cfg.sources), root / "shards", val_fraction=cfg.val_fraction,
                          seed=cfg.seed, progress=progress)
    return tokenizer, shards, root
