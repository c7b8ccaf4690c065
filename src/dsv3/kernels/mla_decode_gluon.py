"""The paged MLA decode kernel for many heads (V3's 128) in Gluon: explicit layouts and asynchronous wgmma, the
third body of `mla_decode_triton` (`gluon=True`), with the contract, grid, splits and combine of the other two
(`dsv3.kernels.mla_decode`). Hopper only (sm_90: wgmma, TMA); no interpreter.

Why a third body (RESULTS.md, twenty-fourth session): the TMA kernel's TTGIR shows that Triton gives a dot whose
result feeds another dot all warps along M. With 64 heads (M = 64) and 8 warps that is `warpsPerCTA = [8, 1]` for
S = Q K^T, and both warpgroups compute the same 64 x 64 S: 13.6 MFLOP of tensor work per 64-token tile for 8.9
useful, each of the three Q K^T products waited for before the softmax. Plain Triton has no way to choose the
layout; Gluon does. Here, per 64-token tile:
- S = Q K^T is split over the two warpgroups by tokens (`warps_per_cta = [4, 2]`): each computes the 64 x 32 of its
  own tokens, once. The row max and sum cross the warpgroups through shared memory (the compiler's reduction);
- O = P V is split by latent columns: each warpgroup owns half of each 256-wide half of the latent (FlashMLA's
  split of V), with P (all 64 tokens) as the register operand;
- the next tile's S is issued (asynchronously) before this tile's softmax, so the tensor cores compute it while
  the CUDA cores do the exponentials and the rescale of O (FA3's intra-warpgroup overlap); this tile's P V follows,
  and one wait retires both;
- tiles arrive by TMA into a ring of STAGES buffers (page-aligned boxes, one block-table scalar per tile, as in the
  TMA kernel), refilled as soon as every warp has passed the wait that retired the stage's last reader;
- Q lives in shared memory (64 x 576 bf16, 72 KB) and feeds every Q K^T from there.
The tail past a sequence's end: S masked to -inf, and the stale rows of the latent (even NaN) zeroed in shared
memory before they meet P (0 x NaN is NaN), once, for the last tile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .mla_decode_tma import descriptor_kernel_args
from .triton_setup import HAS_TRITON, capability

__all__ = ["HAS_GLUON", "gluon_supported", "launch_gluon"]

HAS_GLUON = False
if HAS_TRITON:
    try:
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.hopper import (
            fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
        HAS_GLUON = True
    except ImportError:  # pragma: no cover - a Triton without Gluon: the other bodies run
        pass


def gluon_supported(q_abs: Tensor, c_kv_cache: Tensor, k_pe_cache: Tensor, block_h: int, block_n: int) -> bool:
    """Whether the Gluon kernel takes these tensors: a Hopper GPU (sm_90; wgmma is sm_90a only), bf16, C = 512 and
    R = 64 (the layouts are written for them), 64-head blocks, 32- or 64-token tiles dividing the page, caches whose
    blocks flatten to rows with 16-byte aligned bases and token strides (TMA's rules)."""
    if not (HAS_GLUON and q_abs.is_cuda and capability(q_abs.device) == (9, 0)):
        return False
    if q_abs.dtype != torch.bfloat16 or c_kv_cache.dtype != torch.bfloat16:
        return False
    page, C, R = c_kv_cache.shape[1], c_kv_cache.shape[2], k_pe_cache.shape[2]
    if C != 512 or R != 64 or block_h != 64 or block_n not in (32, 64) or page % block_n:
        return False
    for t in (c_kv_cache, k_pe_cache):
        if t.stride(2) != 1 or t.stride(0) != page * t.stride(1):
            return False
        if t.data_ptr() % 16 or (t.stride(1) * t.element_size()) % 16:
            return False
    return True


if HAS_GLUON:

    @gluon.jit
    def _issue(ckv_desc, kpe_desc, bt_row, n0, kv_lo, kv_hi, kpe, ready, stage,
               PAGE: gl.constexpr, HALF: gl.constexpr):
        """The TMA loads of the tile at token n0 (page-aligned: one block-table entry) into ring slot `stage`."""
        blk = gl.load(bt_row + n0 // PAGE)
        row = blk * PAGE + n0 % PAGE
        bar = ready.index(stage)
        mbarrier.expect(bar, 2 * ckv_desc.block_type.nbytes + kpe_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(ckv_desc, [row, 0], bar, kv_lo.index(stage))
        tma.async_copy_global_to_shared(ckv_desc, [row, HALF], bar, kv_hi.index(stage))
        tma.async_copy_global_to_shared(kpe_desc, [row, 0], bar, kpe.index(stage))

    @gluon.jit
    def _qk(q_lo, q_hi, qpe, kv_lo, kv_hi, kpe, S_L: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr):
        """S = Q K^T of one tile, issued asynchronously (three wgmma groups on one accumulator)."""
        s = gl.full([BLOCK_H, BLOCK_N], 0.0, gl.float32, S_L)
        s = warpgroup_mma(q_lo, kv_lo.permute((1, 0)), s, use_acc=False, is_async=True)
        s = warpgroup_mma(q_hi, kv_hi.permute((1, 0)), s, is_async=True)
        return warpgroup_mma(qpe, kpe.permute((1, 0)), s, is_async=True)

    @gluon.jit
    def _softmax_pv(s, m_i, l_i, o_lo, o_hi, v_lo, v_hi, n0, end, sm_scale_log2,
                    S_L: gl.constexpr, O_L: gl.constexpr, BLOCK_N: gl.constexpr, MASKED: gl.constexpr):
        """The online softmax of one tile's S, the rescale of O, and P V issued asynchronously."""
        s = s * sm_scale_log2
        if MASKED:
            cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_L))
            s = gl.where(gl.expand_dims(cols < end, 0), s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, axis=1)
        a_o = gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, O_L)), 1)
        o_lo = o_lo * a_o
        o_hi = o_hi * a_o
        p = gl.convert_layout(p.to(gl.bfloat16), gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2))
        o_lo = warpgroup_mma(p, v_lo, o_lo, is_async=True)
        o_hi = warpgroup_mma(p, v_hi, o_hi, is_async=True)
        return m_new, l_i, o_lo, o_hi

    @gluon.jit
    def _zero_rows(kv_lo, kv_hi, n0, end, BLOCK_N: gl.constexpr, LD: gl.constexpr):
        """Zero, in shared memory, the rows of the last tile past the sequence's end (a reused page's stale
        values, even NaN, must not meet P's zeros), 16 rows at a time (a whole 64 x 256 tile in registers would
        take 64 a thread in a 4-warp partition); then fenced for the tensor cores and visible to these warps."""
        for r in gl.static_range(BLOCK_N // 16):
            rows = gl.expand_dims(n0 + 16 * r + gl.arange(0, 16, layout=gl.SliceLayout(1, LD)) < end, 1)
            lo = kv_lo.slice(16 * r, 16).load(LD)
            kv_lo.slice(16 * r, 16).store(gl.where(rows, lo, gl.zeros_like(lo)))
            hi = kv_hi.slice(16 * r, 16).load(LD)
            kv_hi.slice(16 * r, 16).store(gl.where(rows, hi, gl.zeros_like(hi)))
        fence_async_shared()
        gl.thread_barrier()

    @gluon.jit
    def _mla_decode_gluon_kernel(
        Q, QPE, ckv_desc, kpe_desc, CKV, KPE, BT, SL, OP, LSE, NEWC, NEWK, SLOT,
        sm_scale_log2,
        stride_q_b, stride_q_h, stride_pe_b, stride_pe_h,
        stride_c_tok, stride_k_tok,
        stride_bt_b,
        stride_op_b, stride_op_h, stride_op_s,
        stride_lse_b, stride_lse_h,
        H, tokens_per_split,
        HALF: gl.constexpr, R: gl.constexpr, PAGE: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, WRITE_LSE: gl.constexpr, APPEND: gl.constexpr,
    ):
        # S split over the warpgroups by tokens, O by latent columns (module docstring)
        S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                      instr_shape=[16, BLOCK_N // 2, 16])
        O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                      instr_shape=[16, HALF // 2, 16])
        LD: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [8, 1], [1, 0])      # rows of 256 bf16
        LDR: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0])      # rows of 64 bf16
        ROW_S: gl.constexpr = gl.SliceLayout(1, S_L)

        hg = gl.program_id(0)
        sp = gl.program_id(1)
        b = gl.program_id(2).to(gl.int64)
        seq_len = gl.load(SL + b)
        start = sp * tokens_per_split
        end = gl.minimum(start + tokens_per_split, seq_len - 1 if APPEND else seq_len)
        n_tiles = gl.cdiv(gl.maximum(end - start, 0), BLOCK_N)

        # Q into shared memory (the layouts of the TMA boxes: 128-byte swizzled rows), heads past H as zeros
        heads = hg * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, LD))
        mask_h = gl.expand_dims(heads < H, 1)
        cols = gl.expand_dims(gl.arange(0, HALF, layout=gl.SliceLayout(0, LD)), 0)
        q_row = Q + b * stride_q_b + gl.expand_dims(heads, 1) * stride_q_h
        q_lo_r = gl.load(q_row + cols, mask=mask_h, other=0.0)
        q_hi_r = gl.load(q_row + HALF + cols, mask=mask_h, other=0.0)
        heads_r = hg * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, LDR))
        cols_r = gl.expand_dims(gl.arange(0, R, layout=gl.SliceLayout(0, LDR)), 0)
        qpe_r = gl.load(QPE + b * stride_pe_b + gl.expand_dims(heads_r, 1) * stride_pe_h + cols_r,
                        mask=gl.expand_dims(heads_r < H, 1), other=0.0)
        q_lo = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, HALF], ckv_desc.layout, q_lo_r)
        q_hi = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, HALF], ckv_desc.layout, q_hi_r)
        qpe = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, R], kpe_desc.layout, qpe_r)

        kv_lo = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HALF], ckv_desc.layout)
        kv_hi = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HALF], ckv_desc.layout)
        kpe = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, R], kpe_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for j in gl.static_range(STAGES):
            mbarrier.init(ready.index(j), count=1)
        fence_async_shared()   # Q's stores and the barriers' init, before the async proxy (TMA, wgmma) sees them
        gl.thread_barrier()

        bt_row = BT + b * stride_bt_b
        for j in gl.static_range(STAGES):
            if j < n_tiles:
                _issue(ckv_desc, kpe_desc, bt_row, start + j * BLOCK_N, kv_lo, kv_hi, kpe, ready, j, PAGE, HALF)

        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, ROW_S)
        l_i = gl.full([BLOCK_H], 0.0, gl.float32, ROW_S)
        o_lo = gl.full([BLOCK_H, HALF], 0.0, gl.float32, O_L)
        o_hi = gl.full([BLOCK_H, HALF], 0.0, gl.float32, O_L)
        if APPEND:   # as the other bodies: one program stores this step's latents, the split holding them attends
            m_i, l_i, o_lo, o_hi = _append_init(q_lo_r, q_hi_r, qpe_r, NEWC, NEWK, SLOT, CKV, KPE, b, hg, sp,
                                                seq_len, tokens_per_split, stride_c_tok, stride_k_tok,
                                                sm_scale_log2, m_i, l_i, o_lo, o_hi, HALF, R, LD, LDR, S_L, O_L)

        if n_tiles > 0:
            mbarrier.wait(ready.index(0), 0)
            s_cur = _qk(q_lo, q_hi, qpe, kv_lo.index(0), kv_hi.index(0), kpe.index(0), S_L, BLOCK_H, BLOCK_N)
            s_cur = warpgroup_mma_wait(num_outstanding=0, deps=[s_cur])
            for i in range(n_tiles - 1):
                st = i % STAGES
                nx = (i + 1) % STAGES
                mbarrier.wait(ready.index(nx), ((i + 1) // STAGES) & 1)
                s_nxt = _qk(q_lo, q_hi, qpe, kv_lo.index(nx), kv_hi.index(nx), kpe.index(nx), S_L, BLOCK_H, BLOCK_N)
                m_i, l_i, o_lo, o_hi = _softmax_pv(s_cur, m_i, l_i, o_lo, o_hi, kv_lo.index(st), kv_hi.index(st),
                                                   start, end, sm_scale_log2, S_L, O_L, BLOCK_N, False)
                s_cur, o_lo, o_hi = warpgroup_mma_wait(num_outstanding=0, deps=[s_nxt, o_lo, o_hi])
                gl.thread_barrier()   # every warpgroup is past its last read of slot st: refill it
                if i + STAGES < n_tiles:
                    _issue(ckv_desc, kpe_desc, bt_row, start + (i + STAGES) * BLOCK_N, kv_lo, kv_hi, kpe, ready,
                           st, PAGE, HALF)
            last = n_tiles - 1
            n_last = start + last * BLOCK_N
            st = last % STAGES
            if n_last + BLOCK_N > end:
                _zero_rows(kv_lo.index(st), kv_hi.index(st), n_last, end, BLOCK_N, LD)
            m_i, l_i, o_lo, o_hi = _softmax_pv(s_cur, m_i, l_i, o_lo, o_hi, kv_lo.index(st), kv_hi.index(st),
                                               n_last, end, sm_scale_log2, S_L, O_L, BLOCK_N, True)
            o_lo, o_hi = warpgroup_mma_wait(num_outstanding=0, deps=[o_lo, o_hi])
        for j in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(j))

        _store(OP, LSE, b, sp, hg, H, m_i, l_i, o_lo, o_hi, stride_op_b, stride_op_h, stride_op_s, stride_lse_b,
               stride_lse_h, BLOCK_H, HALF, O_L, S_L, WRITE_LSE)

    @gluon.jit
    def _append_init(q_lo_r, q_hi_r, qpe_r, NEWC, NEWK, SLOT, CKV, KPE, b, hg, sp, seq_len, tokens_per_split,
                     stride_c_tok, stride_k_tok, sm_scale_log2, m_i, l_i, o_lo, o_hi,
                     HALF: gl.constexpr, R: gl.constexpr, LD: gl.constexpr, LDR: gl.constexpr,
                     S_L: gl.constexpr, O_L: gl.constexpr):
        """This step's token: stored into the cache by one program, taken as the first key of the online softmax
        by the split holding the last position (the tiles stop before it)."""
        c_ld = gl.arange(0, HALF, layout=gl.SliceLayout(0, LD))
        r_ld = gl.arange(0, R, layout=gl.SliceLayout(0, LDR))
        new_lo = gl.load(NEWC + b * 2 * HALF + c_ld)
        new_hi = gl.load(NEWC + b * 2 * HALF + HALF + c_ld)
        new_k = gl.load(NEWK + b * R + r_ld)
        if (hg == 0) & (sp == 0):
            slot_new = gl.load(SLOT + b)
            gl.store(CKV + slot_new * stride_c_tok + c_ld, new_lo)
            gl.store(CKV + slot_new * stride_c_tok + HALF + c_ld, new_hi)
            gl.store(KPE + slot_new * stride_k_tok + r_ld, new_k)
        take = (seq_len > 0) & (sp == (seq_len - 1) // tokens_per_split)
        dot = (gl.sum(q_lo_r.to(gl.float32) * gl.expand_dims(new_lo.to(gl.float32), 0), axis=1)
               + gl.sum(q_hi_r.to(gl.float32) * gl.expand_dims(new_hi.to(gl.float32), 0), axis=1))
        dot_pe = gl.sum(qpe_r.to(gl.float32) * gl.expand_dims(new_k.to(gl.float32), 0), axis=1)
        score = (gl.convert_layout(dot, gl.SliceLayout(1, S_L))
                 + gl.convert_layout(dot_pe, gl.SliceLayout(1, S_L))) * sm_scale_log2
        m_i = gl.where(take, score, m_i)
        l_i = gl.where(take, l_i + 1.0, l_i)
        c_o = gl.arange(0, HALF, layout=gl.SliceLayout(0, O_L))
        lo = gl.expand_dims(gl.load(NEWC + b * 2 * HALF + c_o).to(gl.float32), 0)
        hi = gl.expand_dims(gl.load(NEWC + b * 2 * HALF + HALF + c_o).to(gl.float32), 0)
        o_lo = gl.where(take, o_lo + lo, o_lo)
        o_hi = gl.where(take, o_hi + hi, o_hi)
        return m_i, l_i, o_lo, o_hi

    @gluon.jit
    def _store_part(OP, b, sp, hg, H, l_i, o, col0, stride_op_b, stride_op_h, stride_op_s,
                    BLOCK_H: gl.constexpr, WIDTH: gl.constexpr, O_L: gl.constexpr):
        """O / l for the latent columns [col0, col0 + WIDTH) into this split's slot of the partial output (or the
        output itself with one split); an empty split (l = 0) writes zeros."""
        inv = 1.0 / gl.where(l_i > 0.0, l_i, 1.0)
        inv = gl.expand_dims(gl.convert_layout(inv, gl.SliceLayout(1, O_L)), 1)
        heads = hg * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, O_L))
        cols = gl.expand_dims(gl.arange(0, WIDTH, layout=gl.SliceLayout(0, O_L)), 0)
        row = OP + b * stride_op_b + sp * stride_op_s + gl.expand_dims(heads, 1) * stride_op_h + col0
        gl.store(row + cols, (o * inv).to(OP.dtype.element_ty), mask=gl.expand_dims(heads < H, 1))

    @gluon.jit
    def _store_lse(LSE, b, sp, hg, H, m_i, l_i, stride_lse_b, stride_lse_h, BLOCK_H: gl.constexpr,
                   S_L: gl.constexpr):
        """The split's log-sum-exp (base 2) for the combine; -inf for an empty split."""
        nonempty = l_i > 0.0
        lse = gl.where(nonempty, m_i + gl.log2(gl.where(nonempty, l_i, 1.0)), float("-inf"))
        heads = hg * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, S_L))
        gl.store(LSE + b * stride_lse_b + heads * stride_lse_h + sp, lse, mask=heads < H)

    @gluon.jit
    def _store(OP, LSE, b, sp, hg, H, m_i, l_i, o_lo, o_hi, stride_op_b, stride_op_h, stride_op_s, stride_lse_b,
               stride_lse_h, BLOCK_H: gl.constexpr, HALF: gl.constexpr, O_L: gl.constexpr, S_L: gl.constexpr,
               WRITE_LSE: gl.constexpr):
        """Both halves of O / l, and the log-sum-exp with more than one split."""
        _store_part(OP, b, sp, hg, H, l_i, o_lo, 0, stride_op_b, stride_op_h, stride_op_s, BLOCK_H, HALF, O_L)
        _store_part(OP, b, sp, hg, H, l_i, o_hi, HALF, stride_op_b, stride_op_h, stride_op_s, BLOCK_H, HALF, O_L)
        if WRITE_LSE:
            _store_lse(LSE, b, sp, hg, H, m_i, l_i, stride_lse_b, stride_lse_h, BLOCK_H, S_L)


def launch_gluon(grid, q_abs: Tensor, q_pe: Tensor, c_kv_cache: Tensor, k_pe_cache: Tensor, block_tables: Tensor,
                 seq_lens: Tensor, op: Tensor, lse: Tensor, append_args: tuple, sm_scale_log2: float,
                 op_strides: tuple, lse_strides: tuple, H: int, tokens_per_split: int, cfg: dict,
                 write_lse: bool, append: bool) -> None:
    """The Gluon kernel's launch, for `mla_decode_triton` (which checked `gluon_supported` and prepared every
    argument as for the other bodies). No programmatic dependent launch: the kernel has no grid-dependency wait,
    so it launches after the kernel before it, as a plain launch does."""
    page, C, R = c_kv_cache.shape[1], c_kv_cache.shape[2], k_pe_cache.shape[2]
    rows = c_kv_cache.shape[0] * page
    bn = cfg["block_n"]
    lay_c = gl.NVMMASharedLayout.get_default_for([bn, C // 2], gl.bfloat16)
    lay_k = gl.NVMMASharedLayout.get_default_for([bn, R], gl.bfloat16)
    ckv = GluonDescriptor(c_kv_cache, [rows, C], [c_kv_cache.stride(1), 1], [bn, C // 2], lay_c)
    kpe = GluonDescriptor(k_pe_cache, [rows, R], [k_pe_cache.stride(1), 1], [bn, R], lay_k)
    _mla_decode_gluon_kernel[grid](
        *descriptor_kernel_args(q_abs, q_pe, ckv, kpe, c_kv_cache, k_pe_cache, block_tables, seq_lens, op, lse,
                                append_args, sm_scale_log2, op_strides, lse_strides, H, tokens_per_split),
        HALF=C // 2, R=R, PAGE=page, BLOCK_H=cfg["block_h"], BLOCK_N=bn, STAGES=cfg["num_stages"],
        WRITE_LSE=write_lse, APPEND=append, num_warps=8,
    )
