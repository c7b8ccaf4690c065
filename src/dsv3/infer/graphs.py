"""Decode steps replayed from CUDA graphs: one launch per step instead of ~40 per layer.

Eager decode is launch-bound (NOTES-env: 20-40 us of host time per op, ~1,100 ops per `lite` step). A decode
batch (every row one token with context) is padded to a bucket (batch size b in BATCH_BUCKETS up to max_num_seqs,
block-table width w a power of two) and the runner's own eager forward is captured once per bucket into a graph;
all graphs share one memory pool (only one replays at a time). A step then copies its inputs into the bucket's
static buffers (two host->device copies) and replays.

Padding rows are harmless by construction: token 0 at position 0, written to a scratch block that no sequence owns
(the cache has one block more than the block manager hands out), with context length 0, for which the decode
kernel returns zeros (dsv3.kernels.mla_decode). Their MoE routing counts into `tokens_per_expert`, which only
training reads.

Everything in the captured region must be free of host synchronisation and of shapes that depend on values: the
MLA decode kernel picks its KV splits from shapes only, the MoE runs one grouped GEMM over device offsets.

With `capture=False` the same padded static batches run eagerly: the CPU tests use this to check the padding and
bucketing against the unpadded engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

def graphs_supported(model) -> bool:
    """Capture needs a sync-free forward: on CUDA, the grouped expert GEMM (bf16, sm90+); the fp32 fallback loops
    over experts with host-side counts."""
    w = model.embed_tokens.weight
    return w.is_cuda and w.dtype == torch.bfloat16 and torch.cuda.get_device_capability(w.device) >= (9, 0)


BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@dataclass
class _Bucket:
    longs: torch.Tensor              # (3, b): input ids, positions, slots
    ints: torch.Tensor               # (b, 1 + w): context length, block table
    batch: object                    # the static Batch the graph was captured with
    hidden: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    def __init__(self, runner, max_batch: int, max_blocks: int, scratch_block: int, capture: bool = True):
        self.runner, self.scratch, self.capture = runner, scratch_block, capture
        self.batch_sizes = [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]
        self.max_blocks = max_blocks
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def fits(self, rows) -> bool:
        return (len(rows) <= self.batch_sizes[-1] and all(len(r.tokens) == 1 and r.past > 0 for r in rows)
                and max(len(r.block_table) for r in rows) <= self.max_blocks)

    def key(self, rows) -> tuple[int, int]:
        b = next(s for s in self.batch_sizes if s >= len(rows))
        need = max(len(r.block_table) for r in rows)
        return b, min(1 << (need - 1).bit_length(), self.max_blocks)

    def prepare(self, rows):
        """The bucket's static Batch with `rows` written into its buffers (padding after them)."""
        from .runner import Batch     # runner imports this module
        b, w = key = self.key(rows)
        bucket = self.buckets.get(key) or self._new_bucket(b, w)
        bs, n = self.runner.block_size, len(rows)
        scratch_slot = self.scratch * bs
        longs = torch.zeros(3, b, dtype=torch.long)
        longs[2] = scratch_slot
        ints = torch.zeros(b, 1 + w, dtype=torch.int32)
        for i, r in enumerate(rows):
            p = r.past
            longs[0, i], longs[1, i], longs[2, i] = r.tokens[0], p, r.block_table[p // bs] * bs + p % bs
            ints[i, 0] = p + 1
            ints[i, 1:1 + len(r.block_table)] = torch.tensor(r.block_table, dtype=torch.int32)
        bucket.longs.copy_(longs, non_blocking=True)
        bucket.ints.copy_(ints, non_blocking=True)
        static = bucket.batch
        # the engine reads starts/rows/last(); the tensors stay the static (padded) ones
        batch = Batch(list(rows), static.input_ids, static.positions, static.slots, list(range(n)),
                      list(range(n)), [], static.block_tables, static.context_lens, static.decode_rows, [])
        batch.graph_key = key
        return batch

    def run(self, batch) -> torch.Tensor:
        bucket = self.buckets[batch.graph_key]
        n = len(batch.rows)
        if bucket.graph is None:
            if not self.capture:
                return self.runner.forward_eager(bucket.batch)[:n]
            self._capture(bucket)
        bucket.graph.replay()
        return bucket.hidden[:n].clone()      # the next replay overwrites the static output

    def _new_bucket(self, b: int, w: int) -> _Bucket:
        from .runner import Batch, Row
        dev = self.runner.device
        longs = torch.zeros(3, b, dtype=torch.long, device=dev)
        ints = torch.zeros(b, 1 + w, dtype=torch.int32, device=dev)
        longs[2] = self.scratch * self.runner.block_size
        rows = [Row([0], 1, [self.scratch])] * b
        batch = Batch(rows, longs[0], longs[1], longs[2], list(range(b)), list(range(b)), [], ints[:, 1:],
                      ints[:, 0], torch.arange(b, device=dev), [])
        bucket = self.buckets[(b, w)] = _Bucket(longs, ints, batch)
        return bucket

    def _capture(self, bucket: _Bucket) -> None:
        # warm up outside the graph (Triton compilation, cuBLAS workspaces), on a side stream as capture requires;
        # it runs this step's real inputs, so it writes the same latents the replay writes
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.runner.forward_eager(bucket.batch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            bucket.hidden = self.runner.forward_eager(bucket.batch)
        bucket.graph = graph
