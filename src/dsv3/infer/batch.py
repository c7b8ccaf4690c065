"""A step's batch: ragged rows of tokens flattened into one row of N tokens, and the attention context that tells
the model's MLA where their latents go and which form each row attends in (dsv3.model.context).

A row is a run of consecutive positions of one sequence (a prefill chunk, a decode token, or a token + its
speculative drafts): one token with context is a decode row (the absorbed form on the paged cache, spec 1.4), any
other row attends in the naive form (spec 1.3): over its gathered context, or, a fresh row (no cached context),
batched with the fresh rows of similar length (`fresh_groups`). Every host -> device copy of a step
happens in `make_batch`, once per step, not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.context import AttentionContext, PrefillGroup, PrefillRow
from .cache import PagedLatentCache
from .overlap import to_device


@dataclass
class Row:
    tokens: list[int]        # input tokens of this row, at positions past .. past + len - 1
    past: int                # positions already in the cache before this row
    block_table: list[int]


def padding_row(cache: PagedLatentCache) -> Row:
    """A one-token row that only touches the scratch block (an idle rank's step, an empty micro-batch)."""
    return Row([0], 0, [cache.scratch_block])


@dataclass
class Batch:
    rows: list[Row]
    input_ids: torch.Tensor        # (N,)
    positions: torch.Tensor        # (N,)
    starts: list[int]              # where each row starts in the flat token row
    ctx: AttentionContext          # slots, naive / absorbed rows, block tables (layer 0; `ctx.at(i)` for layer i)
    graph_key: tuple[int, int] | None = None   # set when the batch runs from a captured decode graph ...
    graphs: object = None                      # ... of this DecodeGraphs
    # (N,) int64 on the device, or None: how far each row's position lies past `positions` (a speculative step
    # launched before the host knows the last step's accepted counts, dsv3.infer.spec_step; 0 otherwise)
    advance: torch.Tensor | None = None


def make_batch(rows: list[Row], cache: PagedLatentCache, device: torch.device) -> Batch:
    """The device tensors of `rows` (any mix of prefill chunks and decode tokens)."""
    ids, pos, slots, starts, decode, prefill = [], [], [], [], [], []
    for i, row in enumerate(rows):
        n = len(row.tokens)
        starts.append(len(ids))
        ids += row.tokens
        pos += range(row.past, row.past + n)
        slots += cache.slots(row.block_table, row.past, n)
        (decode if n == 1 and row.past > 0 else prefill).append(i)
    width = max((len(rows[i].block_table) for i in decode), default=1)
    table = [rows[i].block_table + [0] * (width - len(rows[i].block_table)) for i in decode]
    t = lambda x, dtype=torch.long: to_device(x, dtype, device)  # noqa: E731   (no stream sync: dsv3.infer.overlap)
    groups = fresh_groups([(starts[i], len(rows[i].tokens)) for i in prefill if rows[i].past == 0], t)
    naive = tuple(PrefillRow(starts[i], len(rows[i].tokens), rows[i].past, t(rows[i].block_table)) for i in prefill
                  if rows[i].past > 0)
    # a batch of decode rows only is every token in order: no gather / scatter of the queries
    decode_rows = None if not prefill else t([starts[i] for i in decode])
    ctx = AttentionContext(cache, t(slots), naive, decode_rows, t(table, torch.int32).view(len(decode), width),
                           t([rows[i].past + 1 for i in decode], torch.int32), groups=groups)
    return Batch(rows, t(ids), t(pos), starts, ctx)


def fresh_groups(spans: list[tuple[int, int]], to_dev) -> tuple[PrefillGroup, ...]:
    """Fresh rows (start, length) in groups of lengths within 2x of the group's longest, each padded to it: at most
    half a group's places are padding. A group whose rows are consecutive in the flat batch and of one length needs
    no index (a view). `to_dev`: the step's host -> device copy."""
    order = sorted(spans, key=lambda r: -r[1])
    groups = []
    while order:
        length = order[0][1]
        members = sorted(r for r in order if 2 * r[1] > length)        # flat order: a run of equal rows is a view
        order = [r for r in order if 2 * r[1] <= length]
        start, n = members[0][0], len(members)
        if all(m == (start + i * length, length) for i, m in enumerate(members)):
            groups.append(PrefillGroup(n, length, start, None, None, None))
            continue
        index = [s + min(j, m - 1) for s, m in members for j in range(length)]
        keep = [i * length + j for i, (_, m) in enumerate(members) for j in range(m)]
        dst = [s + j for s, m in members for j in range(m)]
        groups.append(PrefillGroup(n, length, start, to_dev(index).view(n, length), to_dev(keep), to_dev(dst)))
    return tuple(groups)
