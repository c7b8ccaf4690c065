"""Blocks of the paged latent cache: allocation with reference counts, and prefix caching by chained block hashes.

A block holds `block_size` consecutive tokens of one sequence. A full block whose content has been *computed* is
registered under hash(previous block's hash, its tokens); a later sequence whose prompt starts with the same tokens
shares it (reference count + 1) instead of recomputing it. Registration waits until the block is computed, so a
sequence never reads a block another sequence has claimed but not yet written. The block holding a sequence's last
token is never shared, so every admitted sequence has at least one token to compute (its logits are needed).
Freed blocks keep their content and hash until reused, so a finished prompt's blocks can still be hit.
"""

from __future__ import annotations

from collections import deque

from .sequence import Sequence


def block_hash(prefix_hash: int, tokens: list[int]) -> int:
    return hash((prefix_hash, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}
        self.free: deque[int] = deque(range(num_blocks))
        self.prefix_hits = 0          # blocks reused, for statistics and tests

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def forget_prefixes(self) -> None:
        """Unregister every cached block (their latents were computed by weights that have since changed)."""
        self.by_hash.clear()
        self.hash_of = [None] * self.num_blocks
        self.tokens_of = [None] * self.num_blocks

    def blocks_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def _take(self, bid: int | None = None) -> int:
        if bid is None:
            bid = self.free.popleft()
            old = self.hash_of[bid]
            if old is not None and self.by_hash.get(old) == bid:   # its content is about to be overwritten
                del self.by_hash[old]
            self.hash_of[bid] = self.tokens_of[bid] = None
        elif self.ref_count[bid] == 0:
            self.free.remove(bid)
        self.ref_count[bid] += 1
        return bid

    def _cached_block(self, seq: Sequence, i: int, prefix: int) -> tuple[int | None, int]:
        """The registered block holding full block i of seq, if any, and the chained hash of that block."""
        tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
        h = block_hash(prefix, tokens)
        bid = self.by_hash.get(h) if self.prefix_caching else None
        if bid is not None and self.tokens_of[bid] != tuple(tokens):   # a hash collision: not the same content
            bid = None
        return bid, h

    def _prefix_hits(self, seq: Sequence) -> list[tuple[int, int]]:
        """(block, chained hash) of each registered block holding seq's leading full blocks, up to the first miss;
        only full blocks strictly before the block of the last token count (it must be computed: its logits)."""
        hits, prefix = [], -1
        for i in range((len(seq) - 1) // self.block_size):
            bid, prefix = self._cached_block(seq, i, prefix)
            if bid is None:
                break
            hits.append((bid, prefix))
        return hits

    def can_allocate(self, seq: Sequence, share: bool) -> bool:
        """Whether `allocate(seq, share)` finds the blocks it takes from the free list: all of seq's but the prefix
        blocks it shares with running sequences (a hit on a freed block takes that block from the free list)."""
        need = self.blocks_needed(len(seq))
        if need <= self.num_free_blocks or not share or not self.prefix_caching:
            return need <= self.num_free_blocks
        return need - sum(1 for bid, _ in self._prefix_hits(seq) if self.ref_count[bid]) <= self.num_free_blocks

    def allocate(self, seq: Sequence, share: bool = True) -> None:
        """Give a waiting sequence blocks for all its tokens, sharing computed prefix blocks where they exist
        (`share=False`: compute every token, e.g. when the prompt's own log-probabilities are wanted)."""
        assert not seq.block_table, "allocate() on a sequence that holds blocks"
        hits = self._prefix_hits(seq) if share and self.prefix_caching else []
        seq.block_hashes = [h for _, h in hits]
        seq.num_cached_tokens = len(hits) * self.block_size
        self.prefix_hits += len(hits)
        seq.block_table = [self._take(bid) for bid, _ in hits]
        seq.block_table += [self._take() for _ in range(self.blocks_needed(len(seq)) - len(hits))]

    def ensure_capacity(self, seq: Sequence, n_tokens: int) -> bool:
        """Blocks for the first n_tokens positions of seq; False (and nothing taken) if there are not enough."""
        need = self.blocks_needed(n_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            return False
        for _ in range(max(0, need)):
            seq.block_table.append(self._take())
        return True

    def trim(self, seq: Sequence, n_tokens: int) -> None:
        """Return seq's blocks past those holding its first n_tokens positions (taken ahead for speculative
        positions that were not accepted). Such a block holds no computed full block, so no prefix registered: it
        goes to the front of the free list, to be reused before blocks whose cached prefixes may still be hit."""
        keep = self.blocks_needed(n_tokens)
        while len(seq.block_table) > keep:
            bid = seq.block_table.pop()
            self.ref_count[bid] -= 1
            assert self.ref_count[bid] == 0 and self.hash_of[bid] is None, "trimmed a shared or registered block"
            self.free.appendleft(bid)

    def mark_computed(self, seq: Sequence) -> None:
        """Register every full block whose tokens are now all in the cache (after a step wrote them)."""
        if not self.prefix_caching:
            return
        # only tokens the host knows: a placeholder of the overlap schedule (dsv3.infer.overlap) is no block's content
        done = min(seq.num_cached_tokens, len(seq) - seq.num_pending) // self.block_size
        prefix = seq.block_hashes[-1] if seq.block_hashes else -1
        for i in range(len(seq.block_hashes), done):
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            prefix = block_hash(prefix, tokens)
            seq.block_hashes.append(prefix)
            bid = seq.block_table[i]
            if self.hash_of[bid] is None:
                self.hash_of[bid], self.tokens_of[bid] = prefix, tuple(tokens)
                self.by_hash.setdefault(prefix, bid)

    def free_sequence(self, seq: Sequence) -> None:
        """Return seq's blocks (shared ones only lose a reference); seq must be recomputed to run again."""
        for bid in reversed(seq.block_table):
            self.ref_count[bid] -= 1
            assert self.ref_count[bid] >= 0
            if self.ref_count[bid] == 0:
                self.free.append(bid)
        seq.block_table, seq.block_hashes, seq.num_cached_tokens = [], [], 0
