"""The sum of squares of many tensors in one pass: the global gradient norm that clipping uses (TR 4.2: clipping at
1.0), read at memory bandwidth.

The reference, `torch._foreach_norm(tensors, dtype=float64)`, launched ~220 kernels per step for lite-8L's
gradients and read their 9.2 GB at 2.3 TB/s (4.1 ms of a 126 ms step, issue 17's profile); the floor at the
H200's ~4.1 TB/s is ~2.2 ms. Here one Triton launch per dtype covers every tensor:

    1. the tensors are cut into chunks of CHUNK elements; a table (cached per list of sizes) maps each chunk to its
       tensor and its offset, and a pointer table (one small host-to-device copy per call) holds the tensors'
       addresses;
    2. program c loads chunk c in BLOCK-element tiles from its tensor's address, squares in FP64 and accumulates,
       and stores one FP64 partial sum (FP64 because squares of bf16 values overflow or underflow FP32: a finite
       gradient of 2^64 made the norm inf, the reference's not; FP64 FMA and conversion rates on H100/H200 exceed
       the element rate at HBM bandwidth, so it should stay read-bound: not yet timed on the GPU);
    3. the partials are summed in FP64.

`sum_of_squares` dispatches: Triton for the contiguous CUDA tensors when triton imports (DSV3_GRAD_NORM=reference
forces the reference), the reference for any others. Both return a float64 scalar on the tensors' device.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .triton_setup import HAS_TRITON, need_triton, tl, triton, use_triton

__all__ = ["sum_of_squares", "sum_of_squares_reference", "sum_of_squares_triton"]

_BLOCK = 4096
_CHUNK = 16 * _BLOCK       # elements per program: ~70K programs for lite-8L's 4.59B gradient elements


@torch.no_grad()
def sum_of_squares_reference(tensors: list[Tensor]) -> Tensor:
    """sum_i ||t_i||^2 as a float64 scalar: per-tensor norms accumulated in FP64 (no FP64 copy of a tensor)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float64)
    return torch.stack(norms).square().sum()


if HAS_TRITON:
    @triton.jit
    def _squares(x):
        # FP64: the squares of bf16/fp32 values span 2^-298..2^256, FP32 only 2^-149..2^128 (a gradient of 2^64
        # squared was inf, the norm inf, the step "diverged"; one of 1e-25 squared was 0)
        x = x.to(tl.float32).to(tl.float64)
        return x * x

    @triton.jit
    def _sumsq_kernel(PTRS, NUMELS, CHUNK_TENSOR, CHUNK_START, OUT, REF, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                      ALIGNED: tl.constexpr):
        # REF: any tensor of the group's dtype; its pointer type is what the table's addresses are cast to.
        # ALIGNED: every address is 16-byte aligned. An address read from a table carries no alignment the
        # compiler can see, and a mask against a size it cannot see either splits loads into single elements
        # (sm_90 PTX: 8 two-byte loads a thread per tile); said, and with the whole chunks unmasked, the loads are
        # 16-byte vectors (benchmarks/sm90_offline.py)
        c = tl.program_id(0)
        t = tl.load(CHUNK_TENSOR + c)
        start = tl.load(CHUNK_START + c)
        n = tl.load(NUMELS + t)
        base = tl.load(PTRS + t).to(REF.dtype)
        if ALIGNED:
            base = tl.multiple_of(base, 16)
            start = tl.multiple_of(start, BLOCK)        # chunks start at multiples of CHUNK, itself of BLOCK
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        if start + CHUNK <= n:                          # a whole chunk: no mask
            for i in range(0, CHUNK, BLOCK):
                acc += _squares(tl.load(base + start + i + tl.arange(0, BLOCK)))
        else:                                           # the tensor's last chunk
            for i in range(0, CHUNK, BLOCK):
                offs = start + i + tl.arange(0, BLOCK)
                acc += _squares(tl.load(base + offs, mask=offs < n, other=0.0))
        tl.store(OUT + c, tl.sum(acc, axis=0))


@functools.lru_cache(maxsize=16)
def _chunk_table(numels: tuple[int, ...], chunk: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(numels, chunk -> tensor index, chunk -> first element) on `device`, for tensors of these sizes (step 1)."""
    counts = torch.tensor([-(-n // chunk) for n in numels], dtype=torch.int64)
    owner = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
    first = torch.cat([torch.arange(k, dtype=torch.int64) * chunk for k in counts.tolist()])
    return (torch.tensor(numels, dtype=torch.int64).to(device), owner.to(device), first.to(device))


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.no_grad()
def sum_of_squares_triton(tensors: list[Tensor], block: int = _BLOCK, chunk: int = _CHUNK) -> Tensor:
    """The same sum in one Triton launch per dtype (contract of `sum_of_squares_reference`; contiguous tensors of
    bf16, fp16 or fp32 on one device). `chunk` (elements per program) is a multiple of `block` (a power of 2)."""
    need_triton("sum_of_squares_triton")
    if chunk % block:
        raise ValueError(f"sum_of_squares_triton: chunk {chunk} is not a multiple of block {block}")
    device = tensors[0].device if tensors else None
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    if any(t.device != device or not t.is_contiguous() or t.dtype not in _DTYPES for t in tensors):
        raise ValueError("sum_of_squares_triton: contiguous bf16/fp16/fp32 tensors on one device")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        group = [t for t in tensors if t.dtype == dtype]
        numels, owner, first = _chunk_table(tuple(t.numel() for t in group), chunk, device)
        addrs = [t.data_ptr() for t in group]
        ptrs = torch.tensor(addrs, dtype=torch.int64)
        if device.type == "cuda":       # no host sync: a pinned staging copy, ordered on the stream
            ptrs = ptrs.pin_memory().to(device, non_blocking=True)
        partial = torch.empty(owner.numel(), dtype=torch.float64, device=device)
        # a view into a flat buffer may start anywhere; PyTorch's own allocations are 256-byte aligned
        aligned = all(a % 16 == 0 for a in addrs)
        _sumsq_kernel[(owner.numel(),)](ptrs, numels, owner, first, partial, group[0], BLOCK=block,
                                        CHUNK=chunk, ALIGNED=aligned, num_warps=8)
        total += partial.sum()                    # step 3
    return total


def sum_of_squares(tensors: list[Tensor]) -> Tensor:
    """Dispatcher: the Triton pass over the contiguous CUDA tensors of a dtype Triton takes (on the first one's
    device), the reference over any others; the two sums added in FP64."""
    device = next((t.device for t in tensors if t.is_cuda), None)
    fast = [t for t in tensors if t.device == device and use_triton(t, "DSV3_GRAD_NORM") and t.is_contiguous()]
    if not fast:
        return sum_of_squares_reference(tensors)
    ids = {id(t) for t in fast}
    rest = [t for t in tensors if id(t) not in ids]
    total = sum_of_squares_triton(fast)
    return total + sum_of_squares_reference(rest).to(total.device) if rest else total
