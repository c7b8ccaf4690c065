"""DualPipe's forward/backward overlap (spec 5) for torch's `ScheduleDualPipeV`: `enable_overlap(schedule, ...)`.

DualPipeV emits OVERLAP_F_B actions: the forward of one micro-batch on one local chunk and the full backward of
another micro-batch on the other local chunk. They share no data (different chunks, so different parameters, and
different micro-batches), so they can run at the same time: while one waits in an expert all-to-all (or a pipeline
receive), the other computes. torch runs the two one after the other unless a handler is registered
(`schedule.register_custom_function(OVERLAP_F_B, fn)`); `OverlapFB` is that handler:
  * the backward runs on a second thread (one persistent worker), the forward on the calling thread; gloo and NCCL
    waits and torch's CPU kernels release the GIL, so the two really proceed together (the tests prove it with a
    rendezvous that only two concurrent sub-actions can pass);
  * the two must not issue collectives on the same process group: their expert all-to-alls would pair up in
    different orders on different ranks (deadlock, or rows of one layer mixed with another's). The worker maps every
    EP group to a duplicate over the same ranks (`ep_groups`, e.g. `ParallelMesh.ep_group_bwd`); the mapping is read
    when a collective is issued (`dsv3.parallel.expert.thread_group`), so the backward all-to-alls and the forward
    all-to-alls of a recomputed region (`apply_recompute`) follow the thread that runs them, not the one that built
    the graph. Each group still sees one sequence of collectives, the same on every rank of it: the calling thread's
    (all non-overlapped actions and every overlapped forward) and the worker's (every overlapped backward);
  * all schedule bookkeeping stays on the calling thread: receive handles are popped, the last stage's loss is
    looked up and the backward counter (`last_backward`, for DDP/FSDP gradient sync) is advanced before the worker
    starts; the backward's hand-off to the previous chunk on the same rank (`set_local_bwd_input`) happens after it
    joined. What each sub-action computes is exactly what torch's `_PipelineScheduleRuntime._perform_action` does for
    FORWARD and FULL_BACKWARD (stage calls, loss on the last stage, V-schedule local hand-offs), so the results are
    bit-identical to the sequential runtime.

What it does NOT do:
  * No speed-up is measured or claimed here. On a CPU with 2 cores the two threads share the cores; the tests check
    correctness and real concurrency only. On GPU nothing moves compute to a second CUDA stream: autograd runs a
    backward kernel on the stream of its forward, and the caching allocator would need record_stream for every tensor
    freed across streams. What overlaps there is host-side (one thread blocked on a split-size sync or a collective
    while the other launches kernels) and NCCL kernels against compute kernels. Untested on GPU (the worker does set
    its CUDA device; two threads issuing on two NCCL communicators in different orders on different ranks is the
    case NCCL can deadlock in when their kernels cannot be resident together). DeepSeek's real overlap also splits SMs
    between communication and compute; not here.
  * The worker takes over no per-thread state but grad mode, the intra-op thread count, the EP groups and the CUDA
    device (e.g. no autocast: a backward does not need it, and checkpointed regions restore their own). Recomputation
    with `preserve_rng_state` forks the global CPU RNG on the worker while the forward runs: harmless for this model (no
    dropout), a race for a model that draws random numbers in its forward.
  * It relies on private pieces of torch.distributed.pipelining (checked once by `enable_overlap`; where any is
    missing it warns and registers nothing, and torch runs the pairs sequentially, as before).
"""

import functools
import inspect
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import schedules as _sched

from . import expert
from .expert import ExpertParallelExperts

# The private torch pieces the handler uses (torch 2.13; the same names as earlier versions' _PipelineScheduleRuntime).
_MODULE_NAMES = ("OVERLAP_F_B", "FORWARD", "FULL_BACKWARD", "_wait_batch_p2p")
_SCHEDULE_NAMES = ("register_custom_function", "_stages", "fwd_recv_ops", "bwd_recv_ops", "backward_counter",
                   "_maybe_compute_loss", "_maybe_get_loss", "_n_microbatches", "_step_microbatches")
_STAGE_NAMES = ("forward_one_chunk", "backward_one_chunk", "set_local_fwd_input", "set_local_bwd_input",
                "get_local_bwd_output", "is_first", "is_last", "stage_index", "submod")


def missing_torch_pieces(schedule) -> list[str]:
    """The private names the overlap needs that this torch / this schedule lacks (empty: it can run)."""
    missing = [f"schedules.{n}" for n in _MODULE_NAMES if not hasattr(_sched, n)]
    missing += [f"schedule.{n}" for n in _SCHEDULE_NAMES if not hasattr(schedule, n)]
    for stage in getattr(schedule, "_stages", ()):
        missing += [f"stage.{n}" for n in _STAGE_NAMES if not hasattr(stage, n)]
    return sorted(set(missing))


class OverlapFB:
    """The OVERLAP_F_B handler: `handler(action, ctx)` runs the action's forward sub-action on the calling thread and
    its backward sub-action on a worker thread, concurrently (see the module docstring). `n_overlapped` counts the
    pairs it ran that way; any other pair (not a FORWARD and a FULL_BACKWARD of two different stages) runs one after
    the other."""

    def __init__(self, schedule, ep_groups: dict | None = None):
        self.schedule = schedule
        self.ep_groups = dict(ep_groups or {})
        self.stages = {s.stage_index: s for s in schedule._stages}
        self.n_overlapped = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsv3-overlap-backward")
        self._cuda = any(torch.device(s.device).type == "cuda" for s in schedule._stages)
        # step() hands return_outputs and loss_kwargs to _step_microbatches, not to custom functions: record them
        self._return_outputs, self._loss_kwargs = True, None
        self._loss_takes_kwargs = "loss_kwargs" in inspect.signature(schedule._maybe_compute_loss).parameters
        run = schedule._step_microbatches
        sig = inspect.signature(run)

        @functools.wraps(run)
        def step_microbatches(*args, **kwargs):
            try:
                bound = sig.bind(*args, **kwargs)
                bound.apply_defaults()
                self._return_outputs = bound.arguments.get("return_outputs", True)
                self._loss_kwargs = bound.arguments.get("loss_kwargs")
            except TypeError:
                self._return_outputs, self._loss_kwargs = True, None
            return run(*args, **kwargs)

        schedule._step_microbatches = step_microbatches

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # ---- the two sub-actions, as _PipelineScheduleRuntime._perform_action runs them ------------------------------
    def _assert_unsharded(self, stage) -> None:
        """Wait for an FSDP stage's pending unshard (torch does this before computing on a stage); nothing without
        FSDP. Versions differ in whether it takes the stage or its index."""
        check = getattr(self.schedule, "_assert_unsharded", None)
        if check is None or not isinstance(stage.submod, FSDPModule):
            return
        takes_index = next(iter(inspect.signature(check).parameters), "") == "stage_idx"
        check(stage.stage_index if takes_index else stage)

    def _forward(self, action, ctx) -> None:
        sched, idx, mb = self.schedule, action.stage_index, action.microbatch_index
        stage = self.stages[idx]
        self._assert_unsharded(stage)
        if not stage.is_first and idx - 1 not in self.stages:     # else the input came from the local stage idx-1
            if (idx, mb) not in sched.fwd_recv_ops:
                raise AssertionError(f"Computing {action=} before receiving input")
            _sched._wait_batch_p2p(sched.fwd_recv_ops.pop((idx, mb)))
        output = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb],
                                         save_forward_output=self._return_outputs)
        if self._loss_takes_kwargs:
            sched._maybe_compute_loss(stage, output, ctx.target_mbs, mb, self._loss_kwargs)
        else:
            sched._maybe_compute_loss(stage, output, ctx.target_mbs, mb)
        if idx + 1 in self.stages:                                 # V-schedule: hand over without send/recv
            self.stages[idx + 1].set_local_fwd_input(output, mb)

    def _backward_prepare(self, action) -> tuple:
        """The backward's bookkeeping, on the calling thread: (receive handles to wait on, loss, last_backward)."""
        sched, idx, mb = self.schedule, action.stage_index, action.microbatch_index
        stage = self.stages[idx]
        self._assert_unsharded(stage)
        works = []
        if not stage.is_last and idx + 1 not in self.stages:
            if (idx, mb) not in sched.bwd_recv_ops:
                raise AssertionError(f"Attempted to run compute {action=} before receiving input")
            works = sched.bwd_recv_ops.pop((idx, mb))
        loss = sched._maybe_get_loss(stage, mb)
        sched.backward_counter[idx] += 1
        return works, loss, sched.backward_counter[idx] == sched._n_microbatches

    def _backward_run(self, action, works, loss, last_backward) -> None:
        _sched._wait_batch_p2p(works)
        self.stages[action.stage_index].backward_one_chunk(action.microbatch_index, loss=loss, full_backward=True,
                                                           last_backward=last_backward)

    def _backward_finish(self, action) -> None:
        idx, mb = action.stage_index, action.microbatch_index
        if idx - 1 in self.stages:
            self.stages[idx - 1].set_local_bwd_input(self.stages[idx].get_local_bwd_output(mb), mb)

    def _backward(self, action) -> None:
        self._backward_run(action, *self._backward_prepare(action))
        self._backward_finish(action)

    # ---- the handler ----------------------------------------------------------------------------------------------
    def _caller_state(self) -> tuple:
        """The calling thread's per-thread state the backward needs: grad mode, the intra-op thread count (OpenMP's
        is per thread: a new thread gets the core count, and other BLAS summation orders) and the CUDA device."""
        return torch.is_grad_enabled(), torch.get_num_threads(), torch.cuda.current_device() if self._cuda else None

    def _in_worker(self, action, prepared, state: tuple) -> None:
        grad_enabled, num_threads, cuda_device = state
        torch.set_num_threads(num_threads)
        if cuda_device is not None:
            torch.cuda.set_device(cuda_device)
        expert._thread.groups = self.ep_groups          # this thread's EP collectives go to the duplicate groups
        try:
            with torch.set_grad_enabled(grad_enabled):
                self._backward_run(action, *prepared)
        finally:
            expert._thread.groups = None

    def __call__(self, action, ctx) -> None:
        subs = action.sub_actions or ()
        kinds = tuple(a.computation_type for a in subs)
        if kinds != (_sched.FORWARD, _sched.FULL_BACKWARD) or subs[0].stage_index == subs[1].stage_index:
            for a in subs:                                 # not a pair this handler knows: the default order
                if a.computation_type == _sched.FORWARD:
                    self._forward(a, ctx)
                elif a.computation_type == _sched.FULL_BACKWARD:
                    self._backward(a)
                else:
                    raise NotImplementedError(f"overlap handler: unsupported sub-action {a}")
            return
        fwd, bwd = subs
        prepared = self._backward_prepare(bwd)
        future = self._pool.submit(self._in_worker, bwd, prepared, self._caller_state())
        try:
            self._forward(fwd, ctx)
        finally:
            future.result()                                # join; re-raises the backward's error
        self._backward_finish(bwd)
        self.n_overlapped += 1


def _ep_groups_in(schedule) -> set:
    return {m.group for s in schedule._stages for m in s.submod.modules() if isinstance(m, ExpertParallelExperts)}


def enable_overlap(schedule, ep_groups: dict | None = None) -> OverlapFB | None:
    """Register the concurrent OVERLAP_F_B handler on a `ScheduleDualPipeV` (or any `_PipelineScheduleRuntime`).

    ep_groups maps each EP process group the stages' experts use to a second group over the same ranks, for the
    collectives of the overlapped backward (`ParallelMesh(..., overlap=True).ep_group_bwd`, dsv3.parallel.mesh);
    every EP group found in the stages must be mapped. Call it on every rank of the pipeline (or on none): the
    ranks of an EP group must agree on which thread issues which all-to-all. Returns the handler, or None (with a
    warning) where this torch lacks the private pieces it needs: torch then runs each pair one after the other, as
    without it."""
    missing = missing_torch_pieces(schedule)
    if missing:
        warnings.warn(f"F/B overlap disabled, this torch lacks {missing}: overlapped pairs run sequentially",
                      RuntimeWarning, stacklevel=2)
        return None
    ep_groups = dict(ep_groups or {})
    for g, dup in ep_groups.items():
        if dup is g:
            raise ValueError("ep_groups must map each EP group to a different group over the same ranks")
        if dist.get_process_group_ranks(g) != dist.get_process_group_ranks(dup):
            raise ValueError("ep_groups must map each EP group to a group over the same ranks")
    unmapped = _ep_groups_in(schedule) - set(ep_groups)
    if unmapped:
        raise ValueError(f"the stages' experts use EP groups over ranks "
                         f"{[dist.get_process_group_ranks(g) for g in unmapped]} with no backward group in ep_groups")
    handler = OverlapFB(schedule, ep_groups)
    schedule.register_custom_function(_sched.OVERLAP_F_B, handler)
    return handler


__all__ = ["OverlapFB", "enable_overlap", "missing_torch_pieces"]
