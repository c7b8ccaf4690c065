"""One AdamW update per parameter in a single pass over memory: BF16 (or FP32) moments, an FP32 master weight, the
gradient-clipping scale folded in (TR 3.3.3, "Low-Precision Optimizer States"; `dsv3.train.adamw_bf16`).

The reference is the update written as PyTorch ops (each a pass over the tensors: ~10 kernels and ~6 full reads and
writes per parameter, 127 ms per step for lite-8L's 4.6B parameters on an H200, 40% of the step; issue 15's
profile). The Triton kernel reads grad, m, v and the master once and writes m, v, the master and the parameter once:
~20 bytes per parameter with BF16 moments and parameters, the memory-bandwidth floor of this optimizer.

    g  = grad / grad_scale                                      (grad_scale: clipping, as torch's fused AdamW)
    m  = m + (1 - b1) (g - m);   v = b2 v + (1 - b2) g^2         FP32 arithmetic; stored in the moments' dtype
    w  = w (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)     on the FP32 master
    param = w                                                    rounded to the parameter's dtype

The m and v of the update are the FP32 values before rounding to the stored dtype, in both implementations.

The FP32 master of a BF16 parameter is either a tensor of its own (4 bytes per parameter) or split: the parameter
holds the master's high 16 bits, rounded half away from zero, and an int16 tensor the signed remainder, so that
`join_master(param, lo)` is the FP32 master bit for bit (2 bytes per parameter; 18 instead of 20 bytes moved per
update). The update's arithmetic is the same on the same FP32 value; the parameter differs from round-to-nearest-even
only where the master's low 16 bits are exactly 0x8000 (a tie, rounded away from zero instead of to even).
`adamw_update` dispatches: Triton for CUDA tensors when triton imports (DSV3_ADAMW=reference forces the reference),
else the reference. The two agree to FP32 rounding (FMA contraction), not bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_setup import HAS_TRITON, need_triton, tl, triton, use_triton

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor

__all__ = ["adamw_update", "adamw_update_reference", "adamw_update_triton", "join_master", "split_master"]


def split_master(w: Tensor) -> tuple[Tensor, Tensor]:
    """FP32 `w` as (hi bfloat16, lo int16) with join_master(hi, lo) == w bit for bit (module docstring): hi = w's
    bit pattern + 0x8000, its top 16 bits (rounding half away from zero; a NaN stays a NaN), lo = the remainder
    w - hi in units of w's last bit, in [-2^15, 2^15). Reference of the Triton kernel's store."""
    bits = w.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF
    nan = w.isnan()
    hi = torch.where(nan, 0x7FC0, (bits + 0x8000) >> 16)
    lo = torch.where(nan, 0, bits - (hi << 16))
    return _as_int16(hi).view(torch.bfloat16), lo.to(torch.int16)


def join_master(hi: Tensor, lo: Tensor) -> Tensor:
    """The FP32 master that split_master(hi, lo) came from (exact)."""
    bits = (((hi.contiguous().view(torch.int16).long() & 0xFFFF) << 16) + lo.long()) & 0xFFFFFFFF
    return torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32).view(torch.float32)


def _as_int16(u16: Tensor) -> Tensor:
    return torch.where(u16 >= 2 ** 15, u16 - 2 ** 16, u16).to(torch.int16)


def _check(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, master: Tensor | None) -> None:
    shapes = {t.shape for t in (param, grad, exp_avg, exp_avg_sq) + ((master,) if master is not None else ())}
    if len(shapes) != 1:
        raise ValueError(f"adamw_update: param, grad, moments and master must have one shape, got {shapes}")
    if master is not None and master.dtype == torch.int16:
        if param.dtype != torch.bfloat16:
            raise ValueError(f"adamw_update: a split master (int16 low half) needs a bfloat16 parameter, got "
                             f"{param.dtype}")
    elif master is not None and master.dtype != torch.float32:
        raise ValueError(f"adamw_update: the master weight must be float32 (or the int16 low half of a split one), "
                         f"got {master.dtype}")
    if master is None and param.dtype != torch.float32:
        raise ValueError(f"adamw_update: a {param.dtype} parameter needs an FP32 master weight")


@torch.no_grad()
def adamw_update_reference(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, master: Tensor | None,
                           lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                           grad_scale: Tensor | None = None) -> None:
    """In place: exp_avg, exp_avg_sq, master (or param itself when master is None, an FP32 parameter; an int16
    master is the low half of a split one, module docstring), param."""
    _check(param, grad, exp_avg, exp_avg_sq, master)
    split = master is not None and master.dtype == torch.int16
    w = join_master(param, master) if split else param if master is None else master
    g = grad.float()
    if grad_scale is not None:
        g = g / grad_scale
    m = exp_avg.float().lerp_(g, 1 - beta1)
    v = exp_avg_sq.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if weight_decay:
        w.mul_(1 - lr * weight_decay)
    denom = (v / (1 - beta2 ** step)).sqrt_().add_(eps)
    w.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))
    if split:
        hi, lo = split_master(w)
        param.copy_(hi)
        master.copy_(lo)
    elif w is not param:
        param.copy_(w)


_BLOCK = 2048

if HAS_TRITON:
    @triton.jit
    def _adamw_kernel(P, G, M, V, W, SCALE, n, lr, b1, b2, eps, decay, bc1, bc2,
                      HAS_MASTER: tl.constexpr, SPLIT: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
        # SPLIT: W is the int16 low half of the master, P (bf16) its high half (split_master / join_master)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g / tl.load(SCALE)
        m = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
        if SPLIT:
            hi = tl.load(P + offs, mask=mask, other=0.0).to(tl.uint16, bitcast=True).to(tl.uint32)
            lo = tl.load(W + offs, mask=mask, other=0).to(tl.int32).to(tl.uint32, bitcast=True)
            w = ((hi << 16) + lo).to(tl.float32, bitcast=True)          # mod 2^32, as join_master
        elif HAS_MASTER:
            w = tl.load(W + offs, mask=mask, other=0.0)
        else:
            w = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
        m = m + (1.0 - b1) * (g - m)
        v = b2 * v + (1.0 - b2) * g * g
        w = w * decay
        w = w - (lr / bc1) * m / (tl.sqrt(v / bc2) + eps)
        tl.store(M + offs, m.to(M.dtype.element_ty), mask=mask)
        tl.store(V + offs, v.to(V.dtype.element_ty), mask=mask)
        if SPLIT:
            bits = w.to(tl.uint32, bitcast=True)
            nan = w != w
            top = tl.where(nan, 0x7FC0, (bits + 0x8000) >> 16)
            rest = tl.where(nan, 0, bits - (top << 16)).to(tl.int32, bitcast=True)
            tl.store(W + offs, rest.to(tl.int16), mask=mask)
            tl.store(P + offs, top.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            if HAS_MASTER:
                tl.store(W + offs, w, mask=mask)
            tl.store(P + offs, w.to(P.dtype.element_ty), mask=mask)


@torch.no_grad()
def adamw_update_triton(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, master: Tensor | None,
                        lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                        grad_scale: Tensor | None = None) -> None:
    """The same update in one Triton kernel (contract of `adamw_update_reference`; contiguous tensors)."""
    need_triton("adamw_update_triton")
    _check(param, grad, exp_avg, exp_avg_sq, master)
    tensors = (param, grad, exp_avg, exp_avg_sq) + ((master,) if master is not None else ())
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("adamw_update_triton: every tensor must be contiguous")
    n = param.numel()
    if n == 0:
        return
    _adamw_kernel[(triton.cdiv(n, _BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, master if master is not None else param,
        grad_scale if grad_scale is not None else param, n, float(lr), float(beta1), float(beta2), float(eps),
        1.0 - float(lr) * float(weight_decay), 1.0 - float(beta1) ** step, 1.0 - float(beta2) ** step,
        HAS_MASTER=master is not None, SPLIT=master is not None and master.dtype == torch.int16,
        HAS_SCALE=grad_scale is not None, BLOCK=_BLOCK, num_warps=8)


def _local_shards(tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
    """The local shards of DTensor operands (FSDP2's parameters, their gradients and the state made from them) when
    every operand is a DTensor placed like the first: the update is elementwise, so updating each shard in place
    is updating the whole. None when there is no DTensor; the operands themselves when they are placed unalike."""
    if not (torch.distributed.is_available() and any(isinstance(t, DTensor) for t in tensors)):
        return None
    head = tensors[0]
    if all(isinstance(t, DTensor) and t.device_mesh == head.device_mesh and t.placements == head.placements
           for t in tensors):
        return tuple(t.to_local() for t in tensors)
    return tensors


def adamw_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, master: Tensor | None,
                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                 grad_scale: Tensor | None = None) -> None:
    """Dispatcher: the Triton kernel for contiguous CUDA tensors, else the reference (module docstring). DTensors
    placed alike are updated through their local shards (the launcher reads data_ptr(), 0 for a DTensor);
    others take the reference."""
    operands = (param, grad, exp_avg, exp_avg_sq) + ((master,) if master is not None else ())
    local = _local_shards(operands)
    if local is not None:
        if local is operands:          # DTensors placed unalike, or mixed with plain tensors: the reference
            return adamw_update_reference(param, grad, exp_avg, exp_avg_sq, master, lr, beta1, beta2, eps,
                                          weight_decay, step, grad_scale)
        return adamw_update(*local[:4], local[4] if master is not None else None, lr, beta1, beta2, eps,
                            weight_decay, step, grad_scale)
    fast = use_triton(param, "DSV3_ADAMW") and all(t.is_contiguous() for t in operands)
    (adamw_update_triton if fast else adamw_update_reference)(
        param, grad, exp_avg, exp_avg_sq, master, lr, beta1, beta2, eps, weight_decay, step, grad_scale)
