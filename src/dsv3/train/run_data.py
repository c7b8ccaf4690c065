"""The Trainer's data side: what a run trains and validates on, and the run directory's first files.

Pre-training reads the `data` section's corpus: the tokenizer and token shards (dsv3.train.dataset, cached by the
sources' content; rank 0 builds them while the other ranks wait at a barrier, then read its cache), a seeded
PackedLoader over the training split (documents packed, PSM FIM) and fixed validation batches. A batch source
(SFT, GRPO: dsv3.posttrain) replaces both: its `tokenizer`, `next_batch(rows)`, `val` and its state_dict.

Rank 0, once the data is ready and before any other rank reads it, sets up the run directory: --overwrite deletes an
earlier run's outputs and leftovers of killed saves are removed (dsv3.train.run_dir, dsv3.train.checkpoint), then
config.json (every start: a resume may override keys), the tokenizer and the unigram baselines are written.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..checkpoint.atomic import write_whole
from ..data import PackedLoader, ShardSet
from ..data.packing import val_batches
from .checkpoint import remove_unfinished_saves
from .config import RunConfig
from .data_parallel import Layout
from .dataset import prepare_dataset
from .run_dir import clear_run


def unigram_entropy(shards: ShardSet, vocab_size: int) -> dict[str, float]:
    """Entropy (nats/token) of the training split's unigram distribution, and the cross-entropy of that distribution
    (add-one smoothed) on the validation split: the loss of a model that ignores context."""
    def counts(split: str) -> np.ndarray:
        c = np.zeros(vocab_size, dtype=np.int64)
        for i in range(shards.n_docs(split)):
            c += np.bincount(shards.doc(split, i), minlength=vocab_size)[:vocab_size]
        return c
    train, val = counts("train"), counts("val")
    p = train / train.sum()
    q = (train + 1) / (train.sum() + vocab_size)
    nz = p > 0
    return {"unigram entropy": float(-(p[nz] * np.log(p[nz])).sum()),
            "unigram val cross-entropy": float(-(val * np.log(q)).sum() / max(val.sum(), 1))}


@dataclass
class RunData:
    tokenizer: object                # dsv3.data.Tokenizer (or the batch source's)
    shards: ShardSet | None          # None with a batch source
    loader: object                   # PackedLoader, or the batch source itself
    val: list                        # validation batches (empty with log.val_batches = 0)
    notes: list[str] = field(default_factory=list)    # rank 0's lines for the run's log


def prepare_run_data(cfg: RunConfig, layout: Layout, source=None, resume: bool = False, overwrite: bool = False,
                     progress: bool = False) -> RunData:
    """The run's tokenizer, loader and validation batches (module docstring); rank 0 also sets up the run directory
    (a collective: every rank calls it)."""
    if not layout.is_main:      # rank 0 builds the tokenizer and shards; the others then read its cache
        layout.barrier()
    if source is None:
        tokenizer, shards, data_dir = prepare_dataset(cfg.data, cfg.data.vocab_size or cfg.model.vocab_size,
                                                      progress=progress and layout.is_main)
        if cfg.log.val_batches and shards.n_docs("val") == 0:    # before anything is written to the run directory
            raise ValueError(f"log.val_batches={cfg.log.val_batches} needs validation documents, but "
                             f"data.val_fraction={cfg.data.val_fraction} sent none of the sources' "
                             f"{shards.n_docs('train')} documents to validation (a document is never split); "
                             f"set log.val_batches=0, raise data.val_fraction or add documents")
    else:
        tokenizer, shards, data_dir = source.tokenizer, None, None
    notes = set_up_run_dir(cfg, tokenizer, shards, data_dir, resume, overwrite) if layout.is_main else []
    if layout.is_main:
        layout.barrier()
    if source is not None:
        return RunData(tokenizer, None, source, source.val if cfg.log.val_batches else [], notes)
    loader = PackedLoader(shards, "train", cfg.data.seq_len, seed=cfg.data.seed, fim_rate=cfg.data.fim_rate,
                          eos_id=tokenizer.eos_id, fim_ids=tokenizer.fim_ids)
    val = val_batches(shards, cfg.data.seq_len, cfg.log.val_batches, cfg.train.micro_batch_size,
                      tokenizer.eos_id) if cfg.log.val_batches else []
    return RunData(tokenizer, shards, loader, val, notes)


def write_run_config(cfg: RunConfig) -> None:
    """The run's config.json, which every later --resume reads: whole or not at all (a full disk mid-write would
    leave it empty, and the printed resume command failing). A resume writes its own (its overrides) only once its
    checkpoint has loaded: a resume refused there (an edited corpus) must not leave its overrides for the next."""
    write_whole(Path(cfg.run_dir) / "config.json", json.dumps(cfg.to_dict(), indent=1))


def set_up_run_dir(cfg: RunConfig, tokenizer, shards: ShardSet | None, data_dir: Path | None, resume: bool,
                   overwrite: bool) -> list[str]:
    """Rank 0, once the data is ready: delete an earlier run's outputs (overwrite) and what killed saves left,
    then write config.json (a fresh start; a resume's, which may override keys, once its checkpoint has loaded:
    `write_run_config`), the tokenizer and the baselines (for a fresh start, or where a resumed run lacks them).
    Returns lines for the run's log."""
    run_dir, notes = Path(cfg.run_dir), []
    if overwrite and (gone := clear_run(run_dir)):
        notes.append(f"--overwrite: deleted the earlier run's {', '.join(gone)}")
    if left := remove_unfinished_saves(run_dir):
        notes.append(f"removed {len(left)} unfinished checkpoint saves ({', '.join(left)})")
    run_dir.mkdir(parents=True, exist_ok=True)
    fresh = not resume
    if fresh:
        write_run_config(cfg)
    if fresh or not (run_dir / "tokenizer" / "tokenizer.json").exists():
        tokenizer.save(run_dir / "tokenizer")
    baselines = run_dir / "baselines.json"
    if shards is not None and (fresh or not baselines.exists()):
        cached = data_dir / "baselines.json"
        if not cached.exists():     # whole or not at all: a kill mid-write must not leave a cache later copied
            write_whole(cached, json.dumps(unigram_entropy(shards, tokenizer.vocab_size)))
        shutil.copy(cached, baselines)
    return notes
