"""Decode steps replayed from CUDA graphs: one launch per step instead of ~40 per layer.

Eager decode is launch-bound (NOTES-env: 20-40 us of host time per op, ~1,100 ops per `lite` step). A decode
batch (every row one token with context) is padded to a bucket (batch size b in BATCH_BUCKETS up to max_num_seqs,
block-table width w a power of two) and the runner's own eager forward is captured once per bucket into a graph;
all graphs share one memory pool (only one replays at a time). A step then copies its inputs into the bucket's
static buffers (two host->device copies, neither a sync) and replays.

Padding rows are harmless by construction: token 0 at position 0, written to the cache's scratch block, which no
sequence owns (dsv3.infer.cache), with context length 0, for which the decode kernel returns zeros
(dsv3.kernels.mla_decode). Their MoE routing counts into `tokens_per_expert`, which only
training reads.

Everything in the captured region must be free of host synchronisation and of shapes that depend on values: the
MLA decode kernel picks its KV splits from shapes only, the MoE runs one grouped GEMM over device offsets.

With `capture=False` the same padded static batches run eagerly: the CPU tests use this to check the padding and
bucketing against the unpadded engine.

With `pdl` (EngineConfig.pdl, sm_90+) the warm-up and the capture run inside `programmatic_launch()` with inductor's
`triton.enable_pdl`: the captured Triton kernels (ours and the compiled layers') launch with programmatic dependent
launch, each overlapping its launch with the tail of the kernel before it (dsv3.kernels.triton_setup). The compiled
layers are made once per process (runner._compiled): inductor's kernels have PDL when a PDL engine's capture was
the first to compile them; ours follow each engine's switch.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import time
from dataclasses import dataclass

import torch

from ..kernels.triton_setup import programmatic_launch
from ..model.context import AttentionContext
from .batch import Batch, Row
from .cache import PagedLatentCache
from .overlap import staged


def graphs_supported(model) -> bool:
    """Capture needs a sync-free forward: on CUDA, the grouped expert GEMM (bf16, sm90+); the fp32 fallback loops
    over experts with host-side counts."""
    w = model.embed_tokens.weight
    return w.is_cuda and w.dtype == torch.bfloat16 and torch.cuda.get_device_capability(w.device) >= (9, 0)


BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@dataclass
class _Bucket:
    longs: torch.Tensor              # (4, b): input ids, positions, slots, advance (Batch.advance)
    ints: torch.Tensor               # (b, 1 + w): context length, block table
    batch: Batch                     # the static Batch the graph was captured with
    extra: torch.Tensor | None       # (b, D): the body's second input (the MTP module's hidden states), if any
    outputs: tuple | None = None
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    """Graphs of one body: `body(batch) -> tensor(s)` (the main model's forward) or, with `extra_width` D,
    `body(batch, extra (b, D)) -> tensor(s)` (the MTP module). Outputs come back as clones of their first n rows.
    With `group` g, every sequence has g consecutive rows (the speculative step's verify rows, dsv3.infer.spec_step):
    buckets hold b sequences (g * b rows, max_batch sequences at most) and outputs have one row per sequence."""

    def __init__(self, cache: PagedLatentCache, body, max_batch: int, max_blocks: int, capture: bool = True,
                 extra_width: int = 0, pool=None, group: int = 1, pdl: bool = False):
        self.cache, self.body, self.capture, self.extra_width, self.group = cache, body, capture, extra_width, group
        self.pdl = pdl
        self.batch_sizes = [b * group for b in BATCH_BUCKETS if b < max_batch] + [max_batch * group]
        self.max_blocks = max_blocks
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.pool = pool if pool is not None or not capture else torch.cuda.graph_pool_handle()
        self.captures, self.capture_seconds = 0, 0.0     # graphs captured so far, and the time that took

    def widths(self) -> list[int]:
        """Every block-table width `key` can give: the powers of two below max_blocks, and max_blocks."""
        return sorted({min(1 << i, self.max_blocks) for i in range(self.max_blocks.bit_length() + 1)})

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every bucket now (each batch size x each table width) and return how many were new. A lazily
        captured bucket costs its first step a capture (and, with compile_decode, maybe a recompile): a server whose
        batches shrink and grow as requests come and go met new buckets mid-traffic, stalling every stream for
        seconds (bench serve at 64 streams, RESULTS.md, sixteenth session). Nothing with capture off. Under inference
        mode as a step is: called from outside one (the engine's start), compiled layers would otherwise trace the
        backward of ops that have none (dsv3::moe_decode_rows; `bench serve --compile-decode` failed so on the H100)."""
        if not self.capture:
            return 0
        before = self.captures
        for b, w in itertools.product(self.batch_sizes, self.widths()):
            bucket = self.buckets.get((b, w)) or self._new_bucket(b, w)
            if bucket.graph is None:
                self._capture(bucket)
        return self.captures - before

    def fits(self, rows) -> bool:
        return (len(rows) <= self.batch_sizes[-1] and all(len(r.tokens) == 1 and r.past > 0 for r in rows)
                and max(len(r.block_table) for r in rows) <= self.max_blocks)

    def key(self, rows) -> tuple[int, int]:
        b = next(s for s in self.batch_sizes if s >= len(rows))
        need = max(len(r.block_table) for r in rows)
        return b, min(1 << (need - 1).bit_length(), self.max_blocks)

    def prepare(self, rows, input_ids: torch.Tensor | None = None, advance: torch.Tensor | None = None):
        """The bucket's static Batch with `rows` written into its buffers (padding after them); `input_ids` (n,) on
        the device replaces the rows' tokens (chained MTP drafts, still on the device); `advance` (n,) on the device
        moves the rows' positions on (Batch.advance; 0 without it)."""
        b, w = key = self.key(rows)
        bucket = self.buckets.get(key) or self._new_bucket(b, w)
        cache, n = self.cache, len(rows)
        # plain lists, then one tensor per buffer: per-row tensor writes would cost a host op each, every step
        pad = b - n
        ids = [r.tokens[0] for r in rows] + [0] * pad
        pos = [r.past for r in rows] + [0] * pad
        slots = [cache.slot(r.block_table, r.past) for r in rows] + [cache.scratch_slot] * pad
        ints = [[r.past + 1] + r.block_table + [0] * (w - len(r.block_table)) for r in rows] + [[0] * (1 + w)] * pad
        # through pinned memory, without a stream sync: the previous step may still be running (dsv3.infer.overlap);
        # the copies are ordered after its replay, which reads these buffers
        dev = bucket.longs.device
        bucket.longs.copy_(staged([ids, pos, slots, [0] * b], torch.long, dev), non_blocking=True)
        bucket.ints.copy_(staged(ints, torch.int32, dev), non_blocking=True)
        if input_ids is not None:
            bucket.longs[0, :n].copy_(input_ids)
        if advance is not None:
            bucket.longs[3, :n].copy_(advance)
        static = bucket.batch
        # the engine reads rows and starts; the tensors stay the static (padded) ones
        batch = Batch(list(rows), static.input_ids, static.positions, list(range(n)), static.ctx, key, self,
                      static.advance)
        return batch

    def run(self, batch, extra: torch.Tensor | None = None):
        bucket = self.buckets[batch.graph_key]
        n = len(batch.rows) // self.group
        if extra is not None:
            bucket.extra[:n].copy_(extra)
        if bucket.graph is None and self.capture:
            self._capture(bucket)
        if bucket.graph is not None:
            bucket.graph.replay()
            outs = bucket.outputs
        else:
            outs = self._body(bucket)
        # clones: the next replay overwrites the static outputs
        return outs[0][:n].clone() if len(outs) == 1 else tuple(o[:n].clone() for o in outs)

    def _body(self, bucket: _Bucket) -> tuple:
        out = self.body(bucket.batch) if bucket.extra is None else self.body(bucket.batch, bucket.extra)
        return out if isinstance(out, tuple) else (out,)

    def _new_bucket(self, b: int, w: int) -> _Bucket:
        cache = self.cache
        dev = cache.c_kv.device
        longs = torch.zeros(4, b, dtype=torch.long, device=dev)
        ints = torch.zeros(b, 1 + w, dtype=torch.int32, device=dev)
        longs[2] = cache.scratch_slot
        rows = [Row([0], 1, [cache.scratch_block])] * b
        # every row a decode row, in order (decode_rows None): the absorbed form, no gather / scatter of queries
        ctx = AttentionContext(cache, longs[2], (), None, ints[:, 1:], ints[:, 0])
        batch = Batch(rows, longs[0], longs[1], list(range(b)), ctx, advance=longs[3])
        # the MTP module's hidden states: the model's dtype, which the cache has (Engine)
        extra = cache.c_kv.new_zeros(b, self.extra_width) if self.extra_width else None
        bucket = self.buckets[(b, w)] = _Bucket(longs, ints, batch, extra)
        return bucket

    def _capture(self, bucket: _Bucket) -> None:
        t0 = time.perf_counter()
        # warm up outside the graph (Triton compilation, cuBLAS workspaces), on a side stream as capture requires;
        # it runs this step's real inputs, so it writes the same latents the replay writes
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with _launch_mode(self.pdl):
            with torch.cuda.stream(side):
                self._body(bucket)
            torch.cuda.current_stream().wait_stream(side)
            # garbage graphs (a dropped engine's, in reference cycles) must not be destroyed mid-capture: their
            # reset invalidates it, and torch no longer runs gc.collect() on entering torch.cuda.graph
            gc.collect()
            gc.disable()
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    bucket.outputs = self._body(bucket)
            finally:
                gc.enable()
        bucket.graph = graph
        self.captures += 1
        self.capture_seconds += time.perf_counter() - t0


def _launch_mode(pdl: bool) -> contextlib.AbstractContextManager:
    """Programmatic dependent launch for the captured kernels (module docstring): ours through the kernels' switch,
    the compiled layers' through inductor's `triton.enable_pdl` (read when a kernel is generated: the layers compiled
    in this warm-up keep it). A no-op block without `pdl`."""
    if not pdl:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(programmatic_launch())
    import torch._inductor.config as inductor_config
    if hasattr(inductor_config.triton, "enable_pdl"):
        stack.enter_context(inductor_config.patch({"triton.enable_pdl": True}))
    return stack
