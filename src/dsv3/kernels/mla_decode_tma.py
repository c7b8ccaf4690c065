"""The paged MLA decode kernel with TMA tile loads: the many-head form (V3's 128 heads), an alternative body for
`mla_decode_triton` (`tma=True`; the default at 64+ heads), with the same contract, grid, splits and combine
(`dsv3.kernels.mla_decode`). On an H100 at 128 heads, B = 64 x 16K: 1.17-1.21x the gather kernel, 263-289 TFLOP/s
over 8K-32K contexts (~28% of bf16 peak; RESULTS.md twenty-third session).

Why (RESULTS.md, MLA decode kernel bandwidth): at 128 heads the decode is compute-bound (each 576-value latent is
used by every head: ~240 FLOP per byte) and the pointer-gather kernel reaches ~20% of bf16 tensor peak. FlashMLA's
formulation, which this follows where Triton lets it:
- the latent tile arrives by TMA, one page-aligned box per tile: a tile of BLOCK_N tokens never crosses a page
  (BLOCK_N divides the page, and splits are whole tiles), so its block-table entry is one scalar and the tile is a
  contiguous run of rows in the flat cache (num_blocks * page, C). No per-element address arithmetic, no gather
  registers, and the copy runs asynchronously ahead of the tensor cores;
- the latent is handled as two halves of C / 2 (a TMA box side is at most 256): both feed Q K^T, and each half is
  the V of its own accumulator (FlashMLA's split of the 512-wide V over two warpgroups), so no [H, 512] fp32 tile
  is ever one value;
- the tail tile past a sequence's end is zeroed in registers once, after the loop (a peeled last iteration): full
  tiles go straight from shared memory into `tl.dot`.
TMA boxes past the cache's last row read zeros; rows past a sequence's end inside its page are masked as in the
gather kernel, so a reused block's stale values (even NaN) never count.

`warp_specialize` (a keyword of `mla_decode_triton`, off): the tile loop as `tl.range(..., warp_specialize=True)`,
Triton's producer / consumer split, the cheapest form of FlashMLA's overlap of one tile's softmax with another's
MMAs; unmeasured (`benchmarks/mla_ws_probe.py`).

`tma_supported` says whether a call can take this path (shapes, strides, alignment; a Hopper GPU or the
interpreter); `mla_decode_triton` falls back to the gather kernel otherwise.
"""

from __future__ import annotations

import os

from torch import Tensor

from .triton_setup import HAS_TRITON, capability, pdl_entry, pdl_launch, tl, triton

__all__ = ["descriptor_kernel_args", "launch_tma", "split_bounds", "tma_supported"]


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def tma_supported(q_abs: Tensor, c_kv_cache: Tensor, k_pe_cache: Tensor, block_n: int) -> bool:
    """Whether the TMA kernel takes these tensors: sm_90+ (or the CPU interpreter), C / 2 and R powers of two of at
    most 256 (a TMA box side), BLOCK_N dividing the page, caches whose blocks flatten to rows (block stride = page x
    token stride) with 16-byte aligned bases and token strides (TMA's rules)."""
    if not HAS_TRITON:
        return False
    if q_abs.is_cuda:
        if capability(q_abs.device) < (9, 0):
            return False
    elif not (q_abs.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    page, C, R = c_kv_cache.shape[1], c_kv_cache.shape[2], k_pe_cache.shape[2]
    if C % 2 or not (_pow2(C // 2) and C // 2 <= 256 and _pow2(R) and 16 <= R <= 256):
        return False
    if page % block_n or block_n > 256:
        return False
    item = c_kv_cache.element_size()
    for t in (c_kv_cache, k_pe_cache):
        if t.stride(2) != 1 or t.stride(0) != page * t.stride(1):
            return False
        if t.data_ptr() % 16 or (t.stride(1) * item) % 16:
            return False
    return True


if HAS_TRITON:
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def split_bounds(SL, tokens_per_split, APPEND: tl.constexpr):
        """This program's (head group, split, sequence, its length, first token, end): the split's tiles cover
        [start, end). With APPEND the last position is this step's token, taken from the inputs: the tiles stop
        before it. Both MLA decode kernels (gather and TMA) split so."""
        hg = tl.program_id(0)
        sp = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        seq_len = tl.load(SL + b)
        start = sp * tokens_per_split
        end = tl.minimum(start + tokens_per_split, seq_len - 1 if APPEND else seq_len)
        return hg, sp, b, seq_len, start, end

    @triton.jit
    def _tile(q_lo, q_hi, qpe, m_i, l_i, acc_lo, acc_hi, ckv_desc, kpe_desc, bt_row, n0, end, sm_scale_log2,
              PAGE: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
              MASKED: tl.constexpr):
        """One BLOCK_N-token tile of the online softmax (both halves of the latent, the rope part)."""
        blk = tl.load(bt_row + n0 // PAGE)
        row = blk * PAGE + n0 % PAGE
        kv_lo = ckv_desc.load([row, 0])
        kv_hi = ckv_desc.load([row, HALF])
        kpe = kpe_desc.load([row, 0])
        if MASKED:   # the tail: rows past the end zeroed (stale values of a reused page never reach the dots)
            mask_n = n0 + tl.arange(0, BLOCK_N) < end
            kv_lo = tl.where(mask_n[:, None], kv_lo, 0.0)
            kv_hi = tl.where(mask_n[:, None], kv_hi, 0.0)
            kpe = tl.where(mask_n[:, None], kpe, 0.0)
        s = tl.dot(q_lo, tl.trans(kv_lo), input_precision=DOT_PREC)
        s = tl.dot(q_hi, tl.trans(kv_hi), acc=s, input_precision=DOT_PREC)
        s = tl.dot(qpe, tl.trans(kpe), acc=s, input_precision=DOT_PREC)
        s = s * sm_scale_log2
        if MASKED:
            s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(kv_lo.dtype)
        acc_lo = tl.dot(p, kv_lo, acc=acc_lo * alpha[:, None], input_precision=DOT_PREC)
        acc_hi = tl.dot(p, kv_hi, acc=acc_hi * alpha[:, None], input_precision=DOT_PREC)
        return m_new, l_i, acc_lo, acc_hi

    @triton.jit
    def _mla_decode_tma_kernel(
        Q, QPE, ckv_desc, kpe_desc, CKV, KPE, BT, SL, OP, LSE, NEWC, NEWK, SLOT,
        sm_scale_log2,
        stride_q_b, stride_q_h, stride_pe_b, stride_pe_h,
        stride_c_tok, stride_k_tok,
        stride_bt_b,
        stride_op_b, stride_op_h, stride_op_s,
        stride_lse_b, stride_lse_h,
        H, tokens_per_split,
        HALF: tl.constexpr, R: tl.constexpr, PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PREC: tl.constexpr, WRITE_LSE: tl.constexpr, APPEND: tl.constexpr, WS: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_entry(PDL)
        hg, sp, b, seq_len, start, end = split_bounds(SL, tokens_per_split, APPEND)

        offs_h = hg * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        offs_lo = tl.arange(0, HALF)
        offs_r = tl.arange(0, R)
        q_row = Q + b * stride_q_b + offs_h[:, None] * stride_q_h
        q_lo = tl.load(q_row + offs_lo[None, :], mask=mask_h[:, None], other=0.0)
        q_hi = tl.load(q_row + HALF + offs_lo[None, :], mask=mask_h[:, None], other=0.0)
        qpe = tl.load(QPE + b * stride_pe_b + offs_h[:, None] * stride_pe_h + offs_r[None, :],
                      mask=mask_h[:, None], other=0.0)

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc_lo = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
        acc_hi = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
        if APPEND:   # as the gather kernel: one program stores this step's latents, the split holding them attends
            new_lo = tl.load(NEWC + b * 2 * HALF + offs_lo)
            new_hi = tl.load(NEWC + b * 2 * HALF + HALF + offs_lo)
            new_k = tl.load(NEWK + b * R + offs_r)
            if (hg == 0) & (sp == 0):
                slot_new = tl.load(SLOT + b)
                tl.store(CKV + slot_new * stride_c_tok + offs_lo, new_lo)
                tl.store(CKV + slot_new * stride_c_tok + HALF + offs_lo, new_hi)
                tl.store(KPE + slot_new * stride_k_tok + offs_r, new_k)
            if (seq_len > 0) & (sp == (seq_len - 1) // tokens_per_split):
                m_i = (tl.sum(q_lo.to(tl.float32) * new_lo.to(tl.float32)[None, :], 1)
                       + tl.sum(q_hi.to(tl.float32) * new_hi.to(tl.float32)[None, :], 1)
                       + tl.sum(qpe.to(tl.float32) * new_k.to(tl.float32)[None, :], 1)) * sm_scale_log2
                l_i += 1.0
                acc_lo += new_lo.to(tl.float32)[None, :]
                acc_hi += new_hi.to(tl.float32)[None, :]

        bt_row = BT + b * stride_bt_b
        full_end = start + (tl.maximum(end - start, 0) // BLOCK_N) * BLOCK_N
        for n0 in tl.range(start, full_end, BLOCK_N, warp_specialize=WS):
            m_i, l_i, acc_lo, acc_hi = _tile(q_lo, q_hi, qpe, m_i, l_i, acc_lo, acc_hi, ckv_desc, kpe_desc, bt_row,
                                             n0, end, sm_scale_log2, PAGE, HALF, BLOCK_N, DOT_PREC, False)
        if full_end < end:
            m_i, l_i, acc_lo, acc_hi = _tile(q_lo, q_hi, qpe, m_i, l_i, acc_lo, acc_hi, ckv_desc, kpe_desc, bt_row,
                                             full_end, end, sm_scale_log2, PAGE, HALF, BLOCK_N, DOT_PREC, True)

        nonempty = l_i > 0.0
        inv = 1.0 / tl.where(nonempty, l_i, 1.0)
        op_row = OP + b * stride_op_b + sp * stride_op_s + offs_h[:, None] * stride_op_h
        tl.store(op_row + offs_lo[None, :], (acc_lo * inv[:, None]).to(OP.dtype.element_ty), mask=mask_h[:, None])
        tl.store(op_row + HALF + offs_lo[None, :], (acc_hi * inv[:, None]).to(OP.dtype.element_ty),
                 mask=mask_h[:, None])
        if WRITE_LSE:
            lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
            tl.store(LSE + b * stride_lse_b + offs_h * stride_lse_h + sp, lse, mask=mask_h)

else:  # pragma: no cover - exercised where triton is absent (dsv3.kernels.mla_decode imports the name)
    split_bounds = None


def descriptor_kernel_args(q_abs: Tensor, q_pe: Tensor, ckv_desc, kpe_desc, c_kv_cache: Tensor, k_pe_cache: Tensor,
                           block_tables: Tensor, seq_lens: Tensor, op: Tensor, lse: Tensor, append_args: tuple,
                           sm_scale_log2: float, op_strides: tuple, lse_strides: tuple, H: int,
                           tokens_per_split: int) -> tuple:
    """The positional arguments of the descriptor-fed bodies (this TMA kernel and the Gluon one,
    `dsv3.kernels.mla_decode_gluon`), which share one signature up to their constexprs."""
    return (q_abs, q_pe, ckv_desc, kpe_desc, c_kv_cache, k_pe_cache, block_tables, seq_lens, op, lse, *append_args,
            sm_scale_log2,
            q_abs.stride(0), q_abs.stride(1), q_pe.stride(0), q_pe.stride(1),
            c_kv_cache.stride(1), k_pe_cache.stride(1),
            block_tables.stride(0),
            *op_strides, *lse_strides,
            H, tokens_per_split)


def launch_tma(grid, q_abs: Tensor, q_pe: Tensor, c_kv_cache: Tensor, k_pe_cache: Tensor, block_tables: Tensor,
               seq_lens: Tensor, op: Tensor, lse: Tensor, append_args: tuple, sm_scale_log2: float,
               op_strides: tuple, lse_strides: tuple, H: int, tokens_per_split: int, cfg: dict, dot_prec: str,
               write_lse: bool, append: bool) -> None:
    """The TMA kernel's launch, for `mla_decode_triton` (which checked `tma_supported` and prepared every
    argument as for the gather kernel)."""
    page, C, R = c_kv_cache.shape[1], c_kv_cache.shape[2], k_pe_cache.shape[2]
    rows = c_kv_cache.shape[0] * page
    ckv = TensorDescriptor(c_kv_cache, [rows, C], [c_kv_cache.stride(1), 1], [cfg["block_n"], C // 2])
    kpe = TensorDescriptor(k_pe_cache, [rows, R], [k_pe_cache.stride(1), 1], [cfg["block_n"], R])
    _mla_decode_tma_kernel[grid](
        *descriptor_kernel_args(q_abs, q_pe, ckv, kpe, c_kv_cache, k_pe_cache, block_tables, seq_lens, op, lse,
                                append_args, sm_scale_log2, op_strides, lse_strides, H, tokens_per_split),
        HALF=C // 2, R=R, PAGE=page, BLOCK_H=cfg["block_h"], BLOCK_N=cfg["block_n"],
        DOT_PREC=dot_prec, WRITE_LSE=write_lse, APPEND=append, WS=bool(cfg.get("warp_specialize", False)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_launch(q_abs),
    )
