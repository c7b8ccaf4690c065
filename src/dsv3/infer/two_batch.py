"""Two-micro-batch overlap (TR 3.4: decoding runs two micro-batches so one's attention overlaps the other's
dispatch / combine): `TwoBatchRunner.forward` splits a step's rows into two halves and runs them at the same time.

  1. split the rows in two (a half that would be empty gets a one-token padding row in the scratch block, so every
     rank runs two micro-batches and each EP collective has all its ranks);
  2. the first half runs on the calling thread over the EP group, the second on a worker thread over a duplicate
     group (dsv3.parallel.expert.thread_groups): the two all-to-all sequences never interleave on one group, and
     while one thread waits in an all-to-all (gloo and NCCL waits release the GIL) the other computes attention;
  3. the hidden states are concatenated in row order (padding dropped): what one forward of the whole batch gives.
Per-token math is unchanged (every op is row-wise or per sequence), so outputs are the same.

What overlaps is host-side, as in dsv3.parallel.overlap: no second CUDA stream and no SM split, so no speed-up is
claimed; untested on GPU (two threads on two NCCL communicators is the case NCCL can deadlock in, see overlap.py). Two
threads add their routing counts to the same `tokens_per_expert` buffers; a lost update there could only change the load
statistics, and every rank still computes the same placement from their all-reduced sum.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from ..parallel.expert import thread_groups
from .batch import Batch, make_batch, padding_row
from .config import EngineConfig
from .runner import ModelRunner


class TwoBatchRunner(ModelRunner):
    def __init__(self, model, cache, group: dist.ProcessGroup, second_group: dist.ProcessGroup,
                 config: EngineConfig | None = None):
        super().__init__(model, cache, config)
        self.groups = {group: second_group}
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="dsv3-micro-batch")
        self.steps = 0
        self.max_concurrent = 0                         # micro-batches seen running at once (2: they overlapped)
        self._active = 0
        self._lock = threading.Lock()

    def forward(self, batch: Batch) -> torch.Tensor:
        # 1. two halves, each with at least one row
        rows = batch.rows
        half = (len(rows) + 1) // 2
        first, second = rows[:half], rows[half:] or [padding_row(self.cache)]
        b1, b2 = make_batch(first, self.cache, self.device), make_batch(second, self.cache, self.device)
        # 2. the second on the worker, over the duplicate group; the first here
        threads = torch.get_num_threads()
        future = self.worker.submit(self._second, b2, threads)
        h1 = self._timed(b1)
        h2 = future.result()
        self.steps += 1
        # 3. row order; a padding half contributes nothing
        return torch.cat([h1, h2]) if len(rows) > half else h1

    def _second(self, batch: Batch, threads: int) -> torch.Tensor:
        torch.set_num_threads(threads)
        if self.device.type == "cuda":          # a new thread starts on device 0
            torch.cuda.set_device(self.device)
        with torch.inference_mode(), thread_groups(self.groups):
            return self._timed(batch)

    def _timed(self, batch: Batch) -> torch.Tensor:
        with self._lock:
            self._active += 1
            self.max_concurrent = max(self.max_concurrent, self._active)
        try:
            return self.forward_eager(batch)
        finally:
            with self._lock:
                self._active -= 1
