"""The many-head MLA decode body after FlashMLA's Hopper schedule ("seesaw"), in Gluon with two warp-specialised
warpgroups: `mla_decode_triton(..., seesaw=True)`, sm_90, bf16, C = 512, R = 64, 64 heads and 64-token tiles a
program; no `append` form (the caller stores the step's latents first). Same contract, grid, splits and combine as
the other bodies (`dsv3.kernels.mla_decode`); it always writes fp32 partials and the LSE (Triton 3.6 cannot lower
its one-split specialisation). The sm_90 default at 64+ heads: 1.2x the Gluon body on an H100 (RESULTS.md,
twenty-sixth session), 1.3-1.4x more since its wgmma descriptors stopped spilling (`_opaque_zero`; 52.8% of bf16
peak at B = 64 x 16K, thirty-second session).

Why (RESULTS.md, twenty-fourth session): the Gluon body (`mla_decode_gluon`) splits one tile's S over both
warpgroups by tokens, so each reads all of Q from shared memory for half the tokens (n = 32 wgmma); here each
warpgroup computes a whole 64 x 64 S of its own tile (n = 64), Q is read once per tile, and the two tiles of a pair
overlap. Per pair (tile 2j in buffer K0, 2j + 1 in K1), warpgroup 0 (WG0: the kernel's own warps) owning O's left
half (latent columns 0-255) and WG1 (a worker partition) the right half:

    WG0: S0 = Q K0^T; m0 = max(m, rowmax S0); s0 = 2^(m - m0); P0; l0 = l0 s0 + sum P0; O_L *= s0
         -> [b_s0: m0, s0 in shared memory]
         O_L += P0 V0_L (P0 from registers)
         <- [b_s1] s1; P0' = P0 s1 -> shared memory -> [b_p0]; O_L *= s1, l0 *= s1; O_L += P1 V1_L (P1 from shared)
    WG1: S1 = Q K1^T (while WG0 computes S0)
         <- [b_s0] m1 = max(m0, rowmax S1); s1 = 2^(m0 - m1); P1 -> shared memory; O_R *= s0 s1;
         l1 = l1 s0 s1 + sum P1 -> [b_s1: m1, s1, P1]
         O_R += P1 V1_R (registers); <- [b_p0] O_R += P0' V0_R (shared)

so both halves end each pair relative to the pair's last max m1; l0 + l1 is the softmax denominator. Every
exchange is one mbarrier (one arrive per warpgroup, after a barrier of its own warps). Each buffer is three TMA
boxes (lo: latent 0-255, hi: 256-511, pe: the rope part), each with its own barrier, refilled for the next pair as
soon as its last reader is done, by that reader: K0.pe after S0, K0.lo after P0 V0_L (WG0), K0.hi after P0' V0_R
(WG1); K1.pe after S1, K1.hi after P1 V1_R (WG1), K1.lo after P1 V1_L (WG0). The next S reads its parts in the
order they come back. Q's latent is in shared memory (64 KB), its rope part in registers (FlashMLA does the same
to make room for the second P buffer): 64 + 2 x 72 + 2 x 8 KB.
The tail (the sequence's end inside the last tile) is masked in S and its stale rows of the latent (even NaN) are
zeroed in shared memory by the tile's owner before any P V reads them; a pair without its second tile has
P1 = 0, m1 = m0, s1 = 1 and skips the products with it.
"""

from __future__ import annotations

from torch import Tensor

from .mla_decode_gluon import HAS_GLUON, gluon_supported
from .mla_decode_tma import descriptor_kernel_args

__all__ = ["launch_seesaw", "seesaw_supported"]

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

    from .mla_decode_gluon import GluonDescriptor, _store_lse, _store_part, _zero_rows


def seesaw_supported(q_abs: Tensor, c_kv_cache: Tensor, k_pe_cache: Tensor, block_h: int, block_n: int) -> bool:
    """The Gluon body's rules (`gluon_supported`) with 64-token tiles. No `append` form: `mla_decode_triton` stores
    the step's latents before the launch."""
    return block_n == 64 and gluon_supported(q_abs, c_kv_cache, k_pe_cache, block_h, block_n)


if HAS_GLUON:
    # every partition (and the parent region) is one warpgroup: S (64 x 64) and O's half (64 x 256) are wgmma
    # accumulators of its 4 warps, P the register operand of P V, LD the plain layout of 256-wide bf16 rows
    _S = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    _O = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])
    S_L = gl.constexpr(_S)
    O_L = gl.constexpr(_O)
    P_L = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=_O, k_width=2))
    ROW = gl.constexpr(gl.SliceLayout(1, _S))
    ROW_O = gl.constexpr(gl.SliceLayout(1, _O))
    LD = gl.constexpr(gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0]))

    @gluon.jit
    def _opaque_zero(j):
        """0, computed from the loop counter by an instruction LLVM cannot see through. The loops index Q's and
        the K buffers' shared memory with it, so their ~80 wgmma descriptors (64-bit each) are built inside the loop
        instead of hoisted above it and held live across it: hoisted, they spilled 208 B per thread in WG1, ~20
        local loads per pair on the path of its S (ncu, thirty-second session: 1.2M local requests a launch at
        B = 64 x 8K; `benchmarks/mla_kernel_resources.py --offline` reads the spill count without a GPU)."""
        return gl.inline_asm_elementwise("mov.u32 $0, 0;", "=r,r", [j], dtype=gl.int32, is_pure=True, pack=1)

    @gluon.jit
    def _load(desc, bt_row, n0, col, dst, bar, PAGE: gl.constexpr):
        """One TMA box (rows of the tile at token n0, columns from col) into dst, signalling bar."""
        blk = gl.load(bt_row + n0 // PAGE)
        mbarrier.expect(bar, desc.block_type.nbytes)
        tma.async_copy_global_to_shared(desc, [blk * PAGE + n0 % PAGE, col], bar, dst)

    @gluon.jit
    def _scores(qpe, k_pe, bar_pe, q_a, k_a, bar_a, q_b, k_b, bar_b, phase, S_L: gl.constexpr):
        """S = Q K^T of one tile, each part issued as soon as its box has arrived: the rope part first (it is
        refilled first), then the latent halves a, b in the order the caller expects them back; asynchronous, the
        caller waits."""
        s = gl.full([64, 64], 0.0, gl.float32, S_L)
        mbarrier.wait(bar_pe, phase)
        s = warpgroup_mma(qpe, k_pe.permute((1, 0)), s, use_acc=False, is_async=True)
        mbarrier.wait(bar_a, phase)
        s = warpgroup_mma(q_a, k_a.permute((1, 0)), s, is_async=True)
        mbarrier.wait(bar_b, phase)
        return warpgroup_mma(q_b, k_b.permute((1, 0)), s, is_async=True)

    @gluon.jit
    def _tail(s, k_lo, k_hi, n0, end, S_L: gl.constexpr, LD: gl.constexpr):
        """The last tile past the sequence's end: S masked, the latent's stale rows zeroed in shared memory (then
        fenced for the tensor cores and made visible to this warpgroup's warps)."""
        cols = n0 + gl.arange(0, 64, layout=gl.SliceLayout(0, S_L))
        s = gl.where(gl.expand_dims(cols < end, 0), s, float("-inf"))
        if n0 + 64 > end:
            _zero_rows(k_lo, k_hi, n0, end, 64, LD)
        return s

    @gluon.jit
    def _qpe_regs(QPE, b, hg, H, stride_pe_b, stride_pe_h, S_L: gl.constexpr):
        """Q's rope part (64 heads x 64) as the register operand of Q K^T's rope product."""
        A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=S_L, k_width=2)
        heads = hg * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, A_L))
        cols = gl.arange(0, 64, layout=gl.SliceLayout(0, A_L))
        return gl.load(QPE + b * stride_pe_b + gl.expand_dims(heads, 1) * stride_pe_h + gl.expand_dims(cols, 0),
                       mask=gl.expand_dims(heads < H, 1), other=0.0)

    @gluon.jit
    def _partition_init(QPE, b, hg, H, stride_pe_b, stride_pe_h):
        """A warpgroup's starting state: Q's rope part in registers, its denominator and its half of O at zero."""
        return (_qpe_regs(QPE, b, hg, H, stride_pe_b, stride_pe_h, S_L), gl.full([64], 0.0, gl.float32, ROW),
                gl.full([64, 256], 0.0, gl.float32, O_L))

    @gluon.jit
    def _wg0(ckv_desc, kpe_desc, QPE, OP, LSE, q, k_lo, k_hi, k_pe, kready, xbar, s_m, s_s0, s_s1, s_l0, s_l1,
             p0_s, p1_s, bt_row, b, hg, sp, H, start, end, n_tiles, sm_scale_log2,
             stride_pe_b, stride_pe_h, stride_op_b, stride_op_h, stride_op_s, stride_lse_b, stride_lse_h,
             PAGE: gl.constexpr):
        qpe, l0, o = _partition_init(QPE, b, hg, H, stride_pe_b, stride_pe_h)
        for j in range(gl.cdiv(n_tiles, 2)):
            ph = j & 1
            t0 = 2 * j
            n0 = start + t0 * 64
            z = _opaque_zero(j)
            s = _scores(qpe, k_pe.index(z), kready.index(2), q.index(z), k_lo.index(z), kready.index(0),
                        q.index(z + 1), k_hi.index(z), kready.index(1), ph, S_L)   # K0.lo comes back before K0.hi
            s = warpgroup_mma_wait(num_outstanding=0, deps=[s])
            if t0 + 2 < n_tiles:
                _load(kpe_desc, bt_row, n0 + 128, 0, k_pe.index(0), kready.index(2), PAGE)
            s = _tail(s * sm_scale_log2, k_lo.index(0), k_hi.index(0), n0, end, S_L, LD)
            m_old = s_m.load(ROW)
            m0 = gl.maximum(m_old, gl.max(s, axis=1))
            s0 = gl.exp2(m_old - m0)
            p = gl.exp2(s - gl.expand_dims(m0, 1))
            l0 = l0 * s0 + gl.sum(p, axis=1)
            o = o * gl.expand_dims(gl.convert_layout(s0, ROW_O), 1)
            s_m.store(m0)
            s_s0.store(s0)
            gl.thread_barrier()
            mbarrier.arrive(xbar.index(0))
            pb = p.to(gl.bfloat16)   # kept in bf16 for P0' below (FlashMLA rescales the bf16 P too)
            o = warpgroup_mma(gl.convert_layout(pb, P_L), k_lo.index(z), o, is_async=True)
            o = warpgroup_mma_wait(num_outstanding=0, deps=[o])
            if t0 + 2 < n_tiles:
                _load(ckv_desc, bt_row, n0 + 128, 0, k_lo.index(0), kready.index(0), PAGE)
            mbarrier.wait(xbar.index(1), ph)
            s1 = s_s1.load(ROW)
            p0_s.store((pb.to(gl.float32) * gl.expand_dims(s1, 1)).to(gl.bfloat16))
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(xbar.index(2))
            o = o * gl.expand_dims(gl.convert_layout(s1, ROW_O), 1)
            l0 = l0 * s1
            if t0 + 1 < n_tiles:
                o = warpgroup_mma(p1_s, k_lo.index(z + 1), o, is_async=True)
                o = warpgroup_mma_wait(num_outstanding=0, deps=[o])
                if t0 + 3 < n_tiles:
                    _load(ckv_desc, bt_row, n0 + 192, 0, k_lo.index(1), kready.index(3), PAGE)
        # the denominator: l1 from WG1, the sum back to it; the final max is the last pair's m1 (WG1 wrote it)
        mbarrier.wait(xbar.index(3), 0)
        l_i = l0 + s_l1.load(ROW)
        s_l0.store(l_i)
        gl.thread_barrier()
        mbarrier.arrive(xbar.index(4))
        _store_part(OP, b, sp, hg, H, l_i, o, 0, stride_op_b, stride_op_h, stride_op_s, 64, 256, O_L)
        _store_lse(LSE, b, sp, hg, H, s_m.load(ROW), l_i, stride_lse_b, stride_lse_h, 64, S_L)

    @gluon.jit
    def _wg1(ckv_desc, kpe_desc, QPE, OP, LSE, q, k_lo, k_hi, k_pe, kready, xbar, s_m, s_s0, s_s1, s_l0, s_l1,
             p0_s, p1_s, bt_row, b, hg, sp, H, start, end, n_tiles, sm_scale_log2,
             stride_pe_b, stride_pe_h, stride_op_b, stride_op_h, stride_op_s, stride_lse_b, stride_lse_h,
             PAGE: gl.constexpr):
        qpe, l1, o = _partition_init(QPE, b, hg, H, stride_pe_b, stride_pe_h)
        for j in range(gl.cdiv(n_tiles, 2)):
            ph = j & 1
            t1 = 2 * j + 1
            n1 = start + t1 * 64
            has1 = t1 < n_tiles
            z = _opaque_zero(j)
            s = gl.full([64, 64], float("-inf"), gl.float32, S_L)
            if has1:
                s = _scores(qpe, k_pe.index(z + 1), kready.index(5), q.index(z + 1), k_hi.index(z + 1),
                            kready.index(4), q.index(z), k_lo.index(z + 1), kready.index(3), ph,
                            S_L)   # K1.hi comes back before K1.lo
                s = warpgroup_mma_wait(num_outstanding=0, deps=[s])
                if t1 + 2 < n_tiles:
                    _load(kpe_desc, bt_row, n1 + 128, 0, k_pe.index(1), kready.index(5), PAGE)
                s = _tail(s * sm_scale_log2, k_lo.index(1), k_hi.index(1), n1, end, S_L, LD)
            mbarrier.wait(xbar.index(0), ph)
            m0 = s_m.load(ROW)
            s0 = s_s0.load(ROW)
            m1 = gl.maximum(m0, gl.max(s, axis=1))
            s1 = gl.exp2(m0 - m1)
            p = gl.exp2(s - gl.expand_dims(m1, 1))
            l1 = l1 * (s0 * s1) + gl.sum(p, axis=1)
            o = o * gl.expand_dims(gl.convert_layout(s0 * s1, ROW_O), 1)
            pb = p.to(gl.bfloat16)
            s_m.store(m1)
            s_s1.store(s1)
            p1_s.store(pb)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(xbar.index(1))
            if has1:   # (an asynchronous result may not leave the branch: retired here, P0' is not ready yet anyway)
                o = warpgroup_mma(gl.convert_layout(pb, P_L), k_hi.index(z + 1), o, is_async=True)
                o = warpgroup_mma_wait(num_outstanding=0, deps=[o])
            mbarrier.wait(xbar.index(2), ph)
            o = warpgroup_mma(p0_s, k_hi.index(z), o, is_async=True)
            o = warpgroup_mma_wait(num_outstanding=0, deps=[o])
            if t1 + 1 < n_tiles:   # K0.hi is free: the pair after this one's first tile
                _load(ckv_desc, bt_row, n1 + 64, 256, k_hi.index(0), kready.index(1), PAGE)
            if t1 + 2 < n_tiles:
                _load(ckv_desc, bt_row, n1 + 128, 256, k_hi.index(1), kready.index(4), PAGE)
        s_l1.store(l1)
        gl.thread_barrier()
        mbarrier.arrive(xbar.index(3))
        mbarrier.wait(xbar.index(4), 0)
        _store_part(OP, b, sp, hg, H, s_l0.load(ROW), o, 256, stride_op_b, stride_op_h, stride_op_s, 64, 256,
                    O_L)

    @gluon.jit
    def _mla_decode_seesaw_kernel(
        Q, QPE, ckv_desc, kpe_desc, CKV, KPE, BT, SL, OP, LSE, NEWC, NEWK, SLOT,
        sm_scale_log2,
        stride_q_b, stride_q_h, stride_pe_b, stride_pe_h,
        stride_c_tok, stride_k_tok,
        stride_bt_b,
        stride_op_b, stride_op_h, stride_op_s,
        stride_lse_b, stride_lse_h,
        H, tokens_per_split,
        PAGE: gl.constexpr,
    ):
        VEC: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        hg = gl.program_id(0)
        sp = gl.program_id(1)
        b = gl.program_id(2).to(gl.int64)
        seq_len = gl.load(SL + b)
        start = sp * tokens_per_split
        end = gl.minimum(start + tokens_per_split, seq_len)
        n_tiles = gl.cdiv(gl.maximum(end - start, 0), 64)

        heads = hg * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, LD))
        cols = gl.expand_dims(gl.arange(0, 256, layout=gl.SliceLayout(0, LD)), 0)
        q_row = Q + b * stride_q_b + gl.expand_dims(heads, 1) * stride_q_h
        mask_h = gl.expand_dims(heads < H, 1)
        q = gl.allocate_shared_memory(gl.bfloat16, [2, 64, 256], ckv_desc.layout)
        q.index(0).store(gl.load(q_row + cols, mask=mask_h, other=0.0))
        q.index(1).store(gl.load(q_row + 256 + cols, mask=mask_h, other=0.0))
        fence_async_shared()
        k_lo = gl.allocate_shared_memory(gl.bfloat16, [2, 64, 256], ckv_desc.layout)
        k_hi = gl.allocate_shared_memory(gl.bfloat16, [2, 64, 256], ckv_desc.layout)
        k_pe = gl.allocate_shared_memory(gl.bfloat16, [2, 64, 64], kpe_desc.layout)
        p0_s = gl.allocate_shared_memory(gl.bfloat16, [64, 64], kpe_desc.layout)
        p1_s = gl.allocate_shared_memory(gl.bfloat16, [64, 64], kpe_desc.layout)
        # the running max starts at -inf; the scales and the denominators are written before they are read
        s_m = gl.allocate_shared_memory(gl.float32, [64], VEC,
                                        gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, S_L)))
        s_s0 = gl.allocate_shared_memory(gl.float32, [64], VEC)
        s_s1 = gl.allocate_shared_memory(gl.float32, [64], VEC)
        s_l0 = gl.allocate_shared_memory(gl.float32, [64], VEC)
        s_l1 = gl.allocate_shared_memory(gl.float32, [64], VEC)
        # kready: K0 lo, hi, pe, K1 lo, hi, pe; xbar: s0 ready, s1 / P1 ready, P0' ready, l1 ready, l ready
        kready = gl.allocate_shared_memory(gl.int64, [6, 1], mbarrier.MBarrierLayout())
        xbar = gl.allocate_shared_memory(gl.int64, [5, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(6):
            mbarrier.init(kready.index(i), count=1)
        for i in gl.static_range(5):
            mbarrier.init(xbar.index(i), count=1)
        fence_async_shared()
        gl.thread_barrier()
        bt_row = BT + b * stride_bt_b
        if n_tiles > 0:
            _load(ckv_desc, bt_row, start, 0, k_lo.index(0), kready.index(0), PAGE)
            _load(ckv_desc, bt_row, start, 256, k_hi.index(0), kready.index(1), PAGE)
            _load(kpe_desc, bt_row, start, 0, k_pe.index(0), kready.index(2), PAGE)
        if n_tiles > 1:
            _load(ckv_desc, bt_row, start + 64, 0, k_lo.index(1), kready.index(3), PAGE)
            _load(ckv_desc, bt_row, start + 64, 256, k_hi.index(1), kready.index(4), PAGE)
            _load(kpe_desc, bt_row, start + 64, 0, k_pe.index(1), kready.index(5), PAGE)
        args = (ckv_desc, kpe_desc, QPE, OP, LSE, q, k_lo, k_hi, k_pe, kready, xbar, s_m, s_s0, s_s1, s_l0,
                s_l1, p0_s, p1_s, bt_row, b, hg, sp, H, start, end, n_tiles, sm_scale_log2,
                stride_pe_b, stride_pe_h, stride_op_b, stride_op_h, stride_op_s, stride_lse_b, stride_lse_h,
                PAGE)
        gl.warp_specialize([(_wg0, args), (_wg1, args)], [4], [256])


def launch_seesaw(grid, q_abs: Tensor, q_pe: Tensor, c_kv_cache: Tensor, k_pe_cache: Tensor, block_tables: Tensor,
                  seq_lens: Tensor, op: Tensor, lse: Tensor, append_args: tuple, sm_scale_log2: float,
                  op_strides: tuple, lse_strides: tuple, H: int, tokens_per_split: int) -> None:
    """The seesaw kernel's launch, for `mla_decode_triton` (which checked `seesaw_supported`). No programmatic
    dependent launch (no grid-dependency wait in the kernel). It always writes fp32 partials and their log-sum-exp,
    one split included (the caller combines): with the direct bf16 store compiled in, Triton 3.6 fails an LLVM
    assertion lowering the warp-specialised partitions (ConvertTritonGPUToLLVM, on the H100 and offline alike)."""
    page = c_kv_cache.shape[1]
    rows = c_kv_cache.shape[0] * page
    lay_c = gl.NVMMASharedLayout.get_default_for([64, 256], gl.bfloat16)
    lay_k = gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16)
    ckv = GluonDescriptor(c_kv_cache, [rows, 512], [c_kv_cache.stride(1), 1], [64, 256], lay_c)
    kpe = GluonDescriptor(k_pe_cache, [rows, 64], [k_pe_cache.stride(1), 1], [64, 64], lay_k)
    _mla_decode_seesaw_kernel[grid](
        *descriptor_kernel_args(q_abs, q_pe, ckv, kpe, c_kv_cache, k_pe_cache, block_tables, seq_lens, op, lse,
                                append_args, sm_scale_log2, op_strides, lse_strides, H, tokens_per_split),
        PAGE=page, num_warps=4,
    )
