"""Document packing with optional Fill-in-the-Middle, resumable to the token (TR 4.1).

The training stream is every document of the split, in a seeded random order per epoch, each followed by EOS,
with no padding and no attention masking between documents (TR 4.1: "document packing ... we do not
incorporate cross-sample attention masking"). Windows of seq_len + 1 tokens are cut from the stream with
stride seq_len: a window's first token is the previous window's last, so every token of the stream is a
target exactly once.

A code document is rewritten, with probability fim_rate, into PSM form before it enters the stream (TR 4.1,
rate 0.1 there):  <fim_begin> prefix <fim_hole> suffix <fim_end> middle <eos>.

Every random choice is a pure function of (seed, epoch, document), so the loader's whole state is four ints
and a resumed run reproduces the original batches exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from .shards import ShardSet

_PERM_TAG, _FIM_TAG = 0x5045524D, 0x46494D  # keep the permutation and FIM random streams apart
STATE_VERSION = 1


class PackedLoader:
    """An endless stream of (batch, seq_len + 1) windows over one split; `state_dict` pins its position.

    `eos_id` ends every document; `fim_ids` = (fim_begin, fim_hole, fim_end) are needed when fim_rate > 0.
    `shuffle=False` reads the documents in file order every epoch (used for the fixed validation set).
    """

    def __init__(self, shards: ShardSet, split: str, seq_len: int, *, eos_id: int, seed: int = 0,
                 fim_rate: float = 0.0, fim_ids: tuple[int, int, int] | None = None, shuffle: bool = True):
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        if not 0.0 <= fim_rate <= 1.0:
            raise ValueError(f"fim_rate={fim_rate} must be in [0, 1]")
        if fim_rate > 0 and fim_ids is None:
            raise ValueError(f"fim_rate={fim_rate} needs fim_ids=(fim_begin, fim_hole, fim_end)")
        if fim_ids is not None and len(fim_ids) != 3:
            raise ValueError(f"fim_ids={fim_ids} must be three ids: (fim_begin, fim_hole, fim_end)")
        bad = [i for i in (eos_id, *(fim_ids or ())) if not 0 <= i < shards.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad} are outside the shards' vocabulary [0, {shards.vocab_size})")
        self.n_docs = shards.n_docs(split)
        if self.n_docs == 0:
            raise ValueError(f"split {split!r} of {shards.root} has no documents")
        self.shards, self.split, self.seq_len = shards, split, seq_len
        self.eos = np.array([eos_id], dtype=np.int64)
        self.seed, self.fim_rate, self.shuffle = seed, fim_rate, shuffle
        self.fim_ids = None if fim_ids is None else tuple(int(i) for i in fim_ids)
        self.epoch = self.pos = self.offset = 0   # next token: `offset` into the emitted form of doc order[pos]
        self.last: int | None = None              # previous window's last token, the next window's first
        self._order: tuple[int, np.ndarray] | None = None
        self._current: tuple[int, int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """The document order of an epoch: a permutation seeded by (seed, epoch), or file order."""
        if self._order is None or self._order[0] != epoch:
            perm = (np.random.default_rng([_PERM_TAG, self.seed, epoch]).permutation(self.n_docs) if self.shuffle
                    else np.arange(self.n_docs))
            self._order = (epoch, perm)
        return self._order[1]

    def emitted(self, epoch: int, doc: int) -> np.ndarray:
        """Document `doc` as it enters the stream in `epoch`: its tokens (maybe FIM-rearranged), then EOS."""
        tokens = self.shards.doc(self.split, doc)
        if self.fim_rate > 0 and self.shards.is_code(self.split, doc):
            rng = np.random.default_rng([_FIM_TAG, self.seed, epoch, doc])
            if rng.random() < self.fim_rate:
                i, j = np.sort(rng.integers(0, len(tokens) + 1, size=2))
                begin, hole, end = (np.array([t], dtype=np.int64) for t in self.fim_ids)
                return np.concatenate([begin, tokens[:i], hole, tokens[j:], end, tokens[i:j], self.eos])
        return np.concatenate([tokens.astype(np.int64), self.eos])

    def _take(self, out: np.ndarray) -> None:
        filled = 0
        while filled < len(out):
            if self._current is None or self._current[:2] != (self.epoch, self.pos):
                doc = int(self.order(self.epoch)[self.pos])
                self._current = (self.epoch, self.pos, self.emitted(self.epoch, doc))
            seq = self._current[2]
            k = min(len(out) - filled, len(seq) - self.offset)
            out[filled:filled + k] = seq[self.offset:self.offset + k]
            filled += k
            self.offset += k
            if self.offset == len(seq):
                self.offset, self.pos = 0, self.pos + 1
                if self.pos == self.n_docs:
                    self.epoch, self.pos = self.epoch + 1, 0

    def next_window(self) -> np.ndarray:
        """The next seq_len + 1 tokens (int64): inputs are w[:-1], targets w[1:]."""
        w = np.empty(self.seq_len + 1, dtype=np.int64)
        if self.last is None:
            self._take(w)
        else:
            w[0] = self.last
            self._take(w[1:])
        self.last = int(w[-1])
        return w

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """A (batch_size, seq_len + 1) LongTensor of consecutive windows; epochs roll over forever."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        return torch.from_numpy(np.stack([self.next_window() for _ in range(batch_size)]))

    def state_dict(self) -> dict:
        """JSON-serialisable position in the stream; the order and FIM choices are recomputed from the seed."""
        return {"version": STATE_VERSION, "split": self.split, "shards": self.shards.identity(self.split),
                "n_docs": self.n_docs, "seed": self.seed,
                "fim_rate": self.fim_rate, "shuffle": self.shuffle, "epoch": self.epoch, "pos": self.pos,
                "offset": self.offset, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        # the position means a place in one token stream: on shards rebuilt since (an edited corpus, another
        # tokenizer) it is a place in other data, even where it still fits. States from before the identity: as before
        if "shards" in state and state["shards"] != (mine := self.shards.identity(self.split)):
            raise ValueError(f"loader state was saved on other {self.split!r} shards ({state['shards']}, now {mine} "
                             f"in {self.shards.root}): the corpus (or tokenizer) changed since, so resuming would "
                             f"continue on other data; restore the corpus as it was, or start a new run from the "
                             f"checkpoint's weights (train.init_from=CHECKPOINT)")
        # seq_len may change between runs (the position is in tokens); anything that changes the stream may not.
        for k in ("version", "split", "n_docs", "seed", "fim_rate", "shuffle"):
            mine = STATE_VERSION if k == "version" else getattr(self, k)
            if state.get(k) != mine:
                raise ValueError(f"loader state has {k}={state.get(k)!r} but this loader has {k}={mine!r}; "
                                 f"resuming would not continue the same token stream")
        epoch, pos, offset = (int(state[k]) for k in ("epoch", "pos", "offset"))
        if epoch < 0 or not 0 <= pos < self.n_docs or offset < 0:
            raise ValueError(f"loader state position epoch={epoch} pos={pos} offset={offset} is out of range")
        # shards rebuilt since the state was saved (an edited corpus: as many documents, one shorter) would fail the
        # next batch with numpy's broadcast error; said here, naming the cause
        doc = int(self.order(epoch)[pos])
        if offset >= (n := len(self.emitted(epoch, doc))):
            raise ValueError(f"loader state offset={offset} is past the end of document {doc} ({n} tokens with its "
                             f"EOS): the shards are not the ones the state was saved with")
        self.epoch, self.pos, self.offset = epoch, pos, offset
        self.last = None if state["last"] is None else int(state["last"])
        self._current = None


def val_batches(shards: ShardSet, seq_len: int, n_batches: int, batch_size: int, eos_id: int) -> list[torch.Tensor]:
    """A fixed validation set: the first n_batches * batch_size windows of the "val" split in file order, no FIM.

    The same shards always give the same windows, so validation losses are comparable across runs. A split
    shorter than the n_batches * batch_size * seq_len + 1 tokens needed wraps around to its beginning, so
    some tokens are then counted twice.
    """
    if n_batches < 1:
        raise ValueError(f"n_batches={n_batches} must be >= 1")
    loader = PackedLoader(shards, "val", seq_len, eos_id=eos_id, shuffle=False)
    return [loader.next_batch(batch_size) for _ in range(n_batches)]
