"""The attention context: how MLA attends when its latents live in a paged cache (an inference engine's) instead
of the contiguous `LatentCache` of the reference generate().

One forward runs a ragged batch flattened into one row of N tokens (several sequences' prefill chunks and decode
tokens side by side). The context says, for that forward:
- which cache: `cache`, anything with the `PagedLatents` methods (dsv3.infer.cache.PagedLatentCache), and `layer`,
  the index of the calling layer's latents in it;
- which slots: `slots` (N,), where each token's normalised c_kv and rotated k_pe are written (spec 9.3);
- which form each token attends in (spec 1.3 / 1.4, same function, different cost):
  * `groups` of fresh rows (a prompt's first chunk: no cached context): the naive form over the rows' own latents,
    several rows of similar length in one causal attention (right-padded to the group's longest row);
  * `prefill` rows (a chunk after cached tokens): the naive form over the row's cached context + the row, causal,
    after gathering that context through its block table;
  * `decode_rows` (one token with context): the absorbed form straight on the paged cache, through its block table
    up to `context_lens` tokens (the cache's `decode`: FlashMLA semantics). None: every token is a decode row, in
    order (a pure decode step: no gather or scatter of the queries).
The model only reads the context; the cache type and the paged kernels stay outside the model (plain PyTorch here).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch


class PagedLatents(Protocol):
    """A paged latent cache as MLA uses it; `layer` selects one layer's latents."""

    def write(self, layer: int, slots: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store tokens' latents (N, C) / (N, R) at flat slots (N,)."""

    def gather(self, layer: int, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` latents of one sequence, contiguous: (length, C), (length, R)."""

    def decode(self, layer: int, q_abs: torch.Tensor, q_pe: torch.Tensor, block_tables: torch.Tensor,
               context_lens: torch.Tensor, scale: float,
               append: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Absorbed attention of one query token per sequence over its cached latents: (n, H, C) latent outputs.
        `append` (slots (n,), c_kv (n, C), k_pe (n, R)): the queries' own latents, stored as `write` would before
        attending (one launch for both where the cache can)."""


@dataclass(frozen=True)
class PrefillRow:
    """Tokens [start, start + length) of the flat batch: one sequence's positions past .. past + length - 1."""
    start: int
    length: int
    past: int
    block_table: torch.Tensor      # (blocks,) long, on the cache's device


@dataclass(frozen=True)
class PrefillGroup:
    """`rows` fresh rows attended as one (rows, length) batch, each right-padded to `length`, the longest. Causal
    attention needs no padding mask: a real query at place i < n sees keys 0..i, all real; padded places repeat the
    row's last token and their outputs are dropped. Why: a per-row loop is ~15 launches per row and layer, host-bound
    at batch prefill (64 x 128-token prompts: ~1 s of TTFT on an H100, RESULTS.md nineteenth session)."""
    rows: int
    length: int
    start: int                     # with index None: the rows are the flat tokens start .. start + rows * length
    index: torch.Tensor | None     # (rows, length) long: the flat token of every place
    keep: torch.Tensor | None      # (n,) long: the real places in the flattened (rows * length) layout ...
    dst: torch.Tensor | None       # (n,) long: ... and their flat tokens


@dataclass(frozen=True)
class AttentionContext:
    cache: PagedLatents
    slots: torch.Tensor                    # (N,) long: the flat cache slot of every token's latents
    prefill: tuple[PrefillRow, ...]        # rows after cached tokens, attended in the naive form one by one
    decode_rows: torch.Tensor | None       # (n,) long: tokens attended in the absorbed form; None: all N, in order
    block_tables: torch.Tensor             # (n, max_blocks) int32: the decode rows' block tables
    context_lens: torch.Tensor             # (n,) int32: their tokens in the cache, this step's included
    layer: int = 0
    groups: tuple[PrefillGroup, ...] = ()  # fresh rows, attended in the naive form a group at a time

    def at(self, layer: int) -> AttentionContext:
        """The same step for another layer's latents."""
        return replace(self, layer=layer)
