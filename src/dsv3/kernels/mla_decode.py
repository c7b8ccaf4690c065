"""Paged MLA decode attention (absorbed, FlashMLA "MQA mode" semantics): a PyTorch reference and a Triton kernel.

One decode query token per sequence b; per head h it has `q_abs[b, h]` (C = kv_lora_rank, 512 for V3/lite) and
`q_pe[b, h]` (R = qk_rope_head_dim, 64). The cache holds per token one latent `c_kv` (C) and one rotated `k_pe` (R),
shared by every head, in a paged layout:

    c_kv_cache (num_blocks, block_size, C),  k_pe_cache (num_blocks, block_size, R)
    block_tables (B, max_blocks) int32: physical block of the j-th logical block of sequence b (entries past the
                 sequence's last block are ignored, whatever they hold)
    seq_lens (B,) int32: tokens of sequence b in the cache; the query sees all of them (it is the last position)

    score[b,h,s] = (q_abs[b,h] . c_kv[s] + q_pe[b,h] . k_pe[s]) * scale,  s < seq_lens[b]
    p = softmax_s(score) (fp32);  out[b,h] = sum_s p[b,h,s] c_kv[s]             -> (B, H, C) in q's dtype

The output is the latent; the caller applies W_UV. A sequence with seq_lens[b] == 0 (a padded batch row) gets
zeros, in both implementations.

`mla_decode_reference`: pure PyTorch, vectorised over the batch (gather through the block tables up to the longest
sequence, mask, fp32 softmax); the CPU path of the inference engine.

`mla_decode_triton`: FlashDecoding-style Triton kernel that reads the block table itself (no gather copy). Grid
(head groups, KV splits, batch), head groups fastest so that the programs sharing one KV range run together and
hit L2; each program holds BLOCK_H heads' queries and streams BLOCK_N-token tiles of c_kv/k_pe, each tile used by
all BLOCK_H heads for both products (`tl.dot`, fp32 accumulation), online softmax in base 2. With more than one
split a small combine kernel merges the partial outputs of the splits a sequence reached through their log-sum-exps. The
number of splits depends only on shapes (B, H, block_tables.shape[1]) and the SM count, never on seq_lens' values: no
host sync, so the call can be captured in a CUDA graph. Keep block_tables no wider than the longest sequence needs (the
splits cover block_tables.shape[1] * block_size tokens; splits past a sequence's end return at once).

`append` (every function): this step's latents (slots (B,), c_kv (B, C), k_pe (B, R), the cache's dtype) are
stored at their flat slots (block * block_size + offset) before attending, as a decode step's cache write then
attention do; each row's slot must be that of its last position (seq_lens[b] - 1), as in a decode step. The
kernel does both in its one launch: the split holding that position takes the new latents from the inputs as one
more key of its online softmax, its tiles stop before it (no program reads what another stores), and one program
per sequence stores them. This saves the two index_copy launches per layer of a decode step (~2 us each, 54 per
`lite` step on an H100: RESULTS.md seventeenth session). A padding row (seq_lens 0) stores at its slot (the scratch
block's) and attends to nothing.

`mla_decode`: Triton on CUDA when triton imports, else the reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .mla_decode_gluon import gluon_supported, launch_gluon
from .mla_decode_seesaw import launch_seesaw, seesaw_supported
from .mla_decode_tma import launch_tma, split_bounds, tma_supported
from .triton_setup import HAS_TRITON, need_triton, pdl_entry, pdl_launch, tl, triton, use_triton

__all__ = ["HAS_TRITON", "mla_decode", "mla_decode_reference", "mla_decode_triton", "mla_decode_bytes",
           "mla_decode_num_splits"]


def _check_inputs(q_abs, q_pe, c_kv_cache, k_pe_cache, block_tables, seq_lens):
    if q_abs.dim() != 3 or q_pe.dim() != 3 or q_abs.shape[:2] != q_pe.shape[:2]:
        raise ValueError(f"q_abs (B, H, C) and q_pe (B, H, R) expected, got {tuple(q_abs.shape)}, {tuple(q_pe.shape)}")
    B, H, C = q_abs.shape
    R = q_pe.shape[2]
    if c_kv_cache.dim() != 3 or k_pe_cache.dim() != 3 or c_kv_cache.shape[:2] != k_pe_cache.shape[:2]:
        raise ValueError(f"c_kv_cache (N, bs, C) and k_pe_cache (N, bs, R) expected, got "
                         f"{tuple(c_kv_cache.shape)}, {tuple(k_pe_cache.shape)}")
    if c_kv_cache.shape[2] != C or k_pe_cache.shape[2] != R:
        raise ValueError(f"cache widths {c_kv_cache.shape[2]}, {k_pe_cache.shape[2]} != q widths {C}, {R}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError(f"block_tables (B, max_blocks) and seq_lens (B,) expected for B={B}, got "
                         f"{tuple(block_tables.shape)}, {tuple(seq_lens.shape)}")
    return B, H, C, R


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------

def _check_append(append, B: int, c_kv_cache: Tensor, k_pe_cache: Tensor) -> None:
    slots, c_kv, k_pe = append
    if slots.shape != (B,) or c_kv.shape != (B, c_kv_cache.shape[2]) or k_pe.shape != (B, k_pe_cache.shape[2]):
        raise ValueError(f"append: slots (B,), c_kv (B, C), k_pe (B, R) expected for B={B}, got "
                         f"{tuple(slots.shape)}, {tuple(c_kv.shape)}, {tuple(k_pe.shape)}")
    if c_kv.dtype != c_kv_cache.dtype or k_pe.dtype != k_pe_cache.dtype:
        raise ValueError(f"append: latents in the cache's dtype expected, got {c_kv.dtype}, {k_pe.dtype}")


def _store_append(c_kv_cache: Tensor, k_pe_cache: Tensor, append: tuple[Tensor, Tensor, Tensor]) -> None:
    """The step's latents into their flat slots of the (contiguous) caches: `append`'s store on its own."""
    slots, c_kv, k_pe = append
    c_kv_cache.view(-1, c_kv_cache.shape[2]).index_copy_(0, slots.long(), c_kv)
    k_pe_cache.view(-1, k_pe_cache.shape[2]).index_copy_(0, slots.long(), k_pe)


def mla_decode_reference(q_abs: Tensor, q_pe: Tensor, c_kv_cache: Tensor, k_pe_cache: Tensor, block_tables: Tensor,
                         seq_lens: Tensor, scale: float, *,
                         append: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Paged absorbed-MLA decode in plain PyTorch (fp32 math), vectorised over the batch. Returns (B, H, C) in
    q_abs' dtype; rows with seq_lens == 0 are zeros. `append`: stored first (module docstring)."""
    B, H, C, R = _check_inputs(q_abs, q_pe, c_kv_cache, k_pe_cache, block_tables, seq_lens)
    if append is not None:
        _check_append(append, B, c_kv_cache, k_pe_cache)
        _store_append(c_kv_cache, k_pe_cache, append)
    bs = c_kv_cache.shape[1]
    dev = q_abs.device
    seq_lens = seq_lens.to(device=dev, dtype=torch.long)
    max_len = int(seq_lens.max()) if B else 0
    if max_len == 0:
        return q_abs.new_zeros(B, H, C)
    nb = -(-max_len // bs)
    if nb > block_tables.shape[1]:
        raise ValueError(f"a sequence of {max_len} tokens needs {nb} blocks; block_tables has {block_tables.shape[1]}")
    used = torch.arange(nb, device=dev) * bs < seq_lens[:, None]                         # (B, nb)
    blocks = torch.where(used, block_tables[:, :nb].to(device=dev, dtype=torch.long), 0)  # padding never indexed
    T = nb * bs
    valid = torch.arange(T, device=dev) < seq_lens[:, None]                                # (B, T)
    # latents past a sequence's end never count, whatever a reused block holds (p = 0 times a stale NaN is NaN):
    # zeroed, as the kernel's masked loads do (the gather made a copy: in place is safe). Their scores are -inf below
    kv = c_kv_cache[blocks].reshape(B, T, C).float().masked_fill_(~valid[..., None], 0.0)   # (B, T, C)
    pe = k_pe_cache[blocks].reshape(B, T, R).float()
    score = torch.baddbmm(torch.bmm(q_pe.float(), pe.transpose(1, 2)), q_abs.float(), kv.transpose(1, 2))
    score.mul_(scale)                                                                      # (B, H, T)
    score.masked_fill_(~valid[:, None, :], float("-inf"))
    p = torch.softmax(score, dim=-1)
    p = p.masked_fill((seq_lens == 0)[:, None, None], 0.0)   # empty rows (all -inf: NaN) -> 0; a NaN input stays
    return torch.bmm(p, kv).to(q_abs.dtype)


def mla_decode_bytes(seq_lens: Tensor, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype) -> int:
    """Bytes of KV cache one call must read: sum(seq_lens) * (C + R) * itemsize (queries, block tables and the
    output are left out: they are small beside the cache)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return int(seq_lens.long().sum()) * (kv_lora_rank + rope_dim) * itemsize


# ----------------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _mla_decode_split_kernel(
        Q, QPE, CKV, KPE, BT, SL, OP, LSE, NEWC, NEWK, SLOT,
        sm_scale_log2,
        stride_q_b, stride_q_h, stride_pe_b, stride_pe_h,
        stride_c_blk, stride_c_tok, stride_k_blk, stride_k_tok,
        stride_bt_b,
        stride_op_b, stride_op_h, stride_op_s,
        stride_lse_b, stride_lse_h,
        H, tokens_per_split,
        C: tl.constexpr, R: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PREC: tl.constexpr, WRITE_LSE: tl.constexpr, APPEND: tl.constexpr, PDL: tl.constexpr = False,
    ):
        pdl_entry(PDL)
        # with APPEND the last position is this step's token, taken from the inputs below: the tiles stop before it
        hg, sp, b, seq_len, start, end = split_bounds(SL, tokens_per_split, APPEND)

        offs_h = hg * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R

        q = tl.load(Q + b * stride_q_b + offs_h[:, None] * stride_q_h + offs_c[None, :],
                    mask=mask_h[:, None] & mask_c[None, :], other=0.0)
        qpe = tl.load(QPE + b * stride_pe_b + offs_h[:, None] * stride_pe_h + offs_r[None, :],
                      mask=mask_h[:, None] & mask_r[None, :], other=0.0)

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
        bt_row = BT + b * stride_bt_b
        if APPEND:   # this step's latents: stored by one program, attended by the split holding the position
            new_c = tl.load(NEWC + b * C + offs_c, mask=mask_c, other=0.0)
            new_k = tl.load(NEWK + b * R + offs_r, mask=mask_r, other=0.0)
            if (hg == 0) & (sp == 0):
                slot_new = tl.load(SLOT + b)
                blk_new, pos_new = slot_new // PAGE, slot_new % PAGE
                tl.store(CKV + blk_new * stride_c_blk + pos_new * stride_c_tok + offs_c, new_c, mask=mask_c)
                tl.store(KPE + blk_new * stride_k_blk + pos_new * stride_k_tok + offs_r, new_k, mask=mask_r)
            if (seq_len > 0) & (sp == (seq_len - 1) // tokens_per_split):
                # one more key in the online softmax, before the tiles: a broadcast product, no tile to pad
                m_i = (tl.sum(q.to(tl.float32) * new_c.to(tl.float32)[None, :], 1)
                       + tl.sum(qpe.to(tl.float32) * new_k.to(tl.float32)[None, :], 1)) * sm_scale_log2
                l_i += 1.0
                acc += new_c.to(tl.float32)[None, :]

        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            blk = tl.load(bt_row + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)
            slot = offs_n % PAGE
            # loads straight into tl.dot: a select between them (the first form of APPEND) cost the H100 ~11 us
            # per layer at batch 1 (RESULTS.md seventeenth session)
            kv = tl.load(CKV + blk[:, None] * stride_c_blk + slot[:, None] * stride_c_tok + offs_c[None, :],
                         mask=mask_n[:, None] & mask_c[None, :], other=0.0)
            kpe = tl.load(KPE + blk[:, None] * stride_k_blk + slot[:, None] * stride_k_tok + offs_r[None, :],
                          mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            s = tl.dot(q, tl.trans(kv), input_precision=DOT_PREC)
            s = tl.dot(qpe, tl.trans(kpe), acc=s, input_precision=DOT_PREC)
            s = s * sm_scale_log2
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(kv.dtype), kv, acc=acc, input_precision=DOT_PREC)
            m_i = m_new

        nonempty = l_i > 0.0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        op_ptrs = OP + b * stride_op_b + sp * stride_op_s + offs_h[:, None] * stride_op_h + offs_c[None, :]
        tl.store(op_ptrs, out.to(OP.dtype.element_ty), mask=mask_h[:, None] & mask_c[None, :])
        if WRITE_LSE:
            lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
            tl.store(LSE + b * stride_lse_b + offs_h * stride_lse_h + sp, lse, mask=mask_h)

    @triton.jit
    def _mla_decode_combine_kernel(
        OP, LSE, O, SL,
        stride_op_b, stride_op_h, stride_op_s,
        stride_lse_b, stride_lse_h,
        stride_o_b, stride_o_h,
        S, tokens_per_split,
        C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr = False,
    ):
        pdl_entry(PDL)
        h = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        # only the splits that held tokens of this sequence: a short sequence in a wide block table (a CUDA graph's
        # bucket) reads its few partial rows, not S planes of (C,) fp32 zeros
        live = tl.minimum(S, tl.cdiv(tl.load(SL + b), tokens_per_split))
        offs_s = tl.arange(0, BLOCK_S)
        lse_row = LSE + b * stride_lse_b + h * stride_lse_h
        lse = tl.load(lse_row + offs_s, mask=offs_s < live, other=float("-inf"))
        m = tl.max(lse, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        denom = tl.sum(tl.exp2(lse - m), 0)
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        op_row = OP + b * stride_op_b + h * stride_op_h
        for s in range(live):
            w = tl.exp2(tl.load(lse_row + s) - m)
            o = tl.load(op_row + s * stride_op_s + offs_c, mask=mask_c, other=0.0)
            acc += w * o
        out = acc / tl.where(denom > 0.0, denom, 1.0)
        tl.store(O + b * stride_o_b + h * stride_o_h + offs_c, out.to(O.dtype.element_ty), mask=mask_c)


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few splits, so that the split path is exercised
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _default_config(H: int, C: int, dtype: torch.dtype, B: int = 64) -> dict:
    """Block shapes and launch parameters, from sweeps on one H200 (C=512, R=64, bf16, B=64, ctx 16K, triton 3.6:
    benchmarks/mla_decode_bench.py --sweep). H=16: 2.8 TB/s with (16, 128, 4 warps, 3 stages) vs 2.0 TB/s for
    (16, 32, 4, 2). H=128: 0.93 TB/s (~225 TFLOP/s, compute-bound) with (64, 64, 8 warps, 2 stages) vs 0.32 TB/s
    for (32, 32, 8, 2): a 64-row head block lets Triton use Hopper's wgmma.
    A small grid (H <= 16, B <= 8: the batch-1 decode of `lite`) takes 64-token tiles and splits of 64 tokens
    (`min_tokens_per_split`): with 256-token splits one program read a whole short sequence alone, ~17 us per layer
    at batch 1 and 128-192 tokens on an H100 (12% of the step, RESULTS.md fifteenth session): an SM alone does not
    pull a 221 KB sequence fast; 64-token splits spread it over several. At batch 1, 8 warps (4 spill: 248 B of
    stack in the sm_90 build): 9.1 / 10.6 / 15.7 us vs 11.1 / 12.6 / 17.8 at 192 / 1K / 4K tokens (CUDA-graph
    replays, append form, H100, RESULTS.md twenty-sixth session); at B = 4-8, 8 warps won at <= 1K tokens and lost
    at 4K (and 32-token tiles, 4 stages, won there): unchanged until measured inside the engine."""
    if dtype == torch.float32:  # twice the bytes per tile: smaller tiles (exactness tests, not speed)
        return dict(block_h=16, block_n=16, num_warps=4, num_stages=2)
    if H <= 16 and B <= 8:
        return dict(block_h=16, block_n=64, num_warps=8 if B == 1 else 4, num_stages=2, min_tokens_per_split=64)
    if H <= 16:
        return dict(block_h=16, block_n=128, num_warps=4, num_stages=3)
    if H < 64:
        return dict(block_h=32, block_n=64, num_warps=4, num_stages=2)
    # the seesaw kernel on sm_90 (dsv3.kernels.mla_decode_seesaw, FlashMLA's schedule: 404 / 773 / 1,568 us at
    # B = 64 x 8K / 16K / 32K, 36.5-38.3% of bf16 peak, 1.2x Gluon on an H100, RESULTS.md twenty-sixth session;
    # without its spills and one wave of splits, 559 us at 64 x 16K, 52.8%: thirty-second session),
    # else the Gluon kernel on sm_90 (dsv3.kernels.mla_decode_gluon: S split over the warpgroups by tokens),
    # else the TMA kernel (sm_90+, page-aligned 64-token tiles: dsv3.kernels.mla_decode_tma), else the same shapes
    # through the gather kernel. H100, 128 heads: Gluon 505 / 974 / 1,882 us at B = 64 x 8K / 16K / 32K vs TMA
    # 550 / 1,059 / 2,058 (1.09x, twenty-fifth session); TMA vs gather 1,062-1,094 us vs 1,285 at 64 x 16K
    # (twenty-third); at 16 heads TMA was slower (759 vs 685 us at 64-token tiles) and stays off
    return dict(block_h=64, block_n=64, num_warps=8, num_stages=2, tma=True, gluon=True, seesaw=True)


def mla_decode_num_splits(B: int, H: int, max_tokens: int, block_h: int, block_n: int, sm_count: int,
                          min_tokens_per_split: int = 256, max_splits: int = 64,
                          one_wave: bool = False) -> tuple[int, int]:
    """(num_splits, tokens_per_split) for a launch: enough programs for ~2 waves over the SMs, each split at
    least `min_tokens_per_split` tokens (a multiple of block_n). Depends on shapes only (graph-capturable).

    `one_wave` (the seesaw kernel, whose program fills an SM with its two warpgroups): one program per SM, at
    least one split. Fitted on an H100 (`benchmarks/mla_seesaw_splits.py`, 128 heads, B = 8-128 x 4K-16K, RESULTS.md
    thirty-second session), after the body's spills went: the best count at every point measured (1.10-1.11x the
    next at B = 128, 1.08x at 64 x 16K); the two-wave rule lost up to 1.4x (B = 8 x 4K)."""
    n_hg = -(-H // block_h)
    base = max(1, B * n_hg)
    if one_wave:
        want = max(1, sm_count // base)
    else:
        want = -(-2 * sm_count // base)
    cap = max(1, -(-max_tokens // min_tokens_per_split))
    splits = max(1, min(want, cap, max_splits))
    n_tiles = max(1, -(-max_tokens // block_n))
    tiles_per_split = -(-n_tiles // splits)
    tokens_per_split = tiles_per_split * block_n
    splits = max(1, -(-max_tokens // tokens_per_split))
    return splits, tokens_per_split


def _kernel_inputs(q_abs: Tensor, q_pe: Tensor, c_kv_cache: Tensor, k_pe_cache: Tensor, block_tables: Tensor,
                   seq_lens: Tensor, append: tuple[Tensor, Tensor, Tensor] | None) -> tuple:
    """The layouts the kernels read (last dims contiguous, int32 tables and lengths, int64 slots), copying only
    what is not already so; the caches are never copied (they are written in place), so a strided one is an
    error, as are mixed dtypes. Returns (q_abs, q_pe, block_tables, seq_lens, append)."""
    if append is not None:
        _check_append(append, q_abs.shape[0], c_kv_cache, k_pe_cache)
        slots, new_c, new_k = append
        # int64: a flat slot times a stride may pass 2**31
        append = (slots.to(torch.int64).contiguous(), new_c.contiguous(), new_k.contiguous())
    if q_abs.stride(-1) != 1:
        q_abs = q_abs.contiguous()
    if q_pe.stride(-1) != 1:
        q_pe = q_pe.contiguous()
    if c_kv_cache.stride(-1) != 1 or k_pe_cache.stride(-1) != 1:
        raise ValueError("the caches' last dimension must be contiguous")
    if block_tables.dtype != torch.int32 or block_tables.stride(-1) != 1:
        block_tables = block_tables.to(torch.int32).contiguous()
    if seq_lens.dtype != torch.int32 or not seq_lens.is_contiguous():
        seq_lens = seq_lens.to(torch.int32).contiguous()
    if not (q_abs.dtype == q_pe.dtype == c_kv_cache.dtype == k_pe_cache.dtype):
        raise ValueError(f"dtypes differ: {q_abs.dtype}, {q_pe.dtype}, {c_kv_cache.dtype}, {k_pe_cache.dtype}")
    return q_abs, q_pe, block_tables, seq_lens, append


def _splits(B: int, H: int, max_tokens: int, cfg: dict, num_splits: int | None,
            device: torch.device, one_wave: bool = False) -> tuple[int, int]:
    """(num_splits, tokens_per_split): `mla_decode_num_splits`' choice (one_wave: the seesaw body's rule, for the
    launches that run it), or num_splits asked for (rounded to whole tiles: the count that results may be
    smaller)."""
    if num_splits is None:
        return mla_decode_num_splits(B, H, max_tokens, cfg["block_h"], cfg["block_n"], _sm_count(device),
                                     cfg.get("min_tokens_per_split", 256), one_wave=one_wave)
    n_tiles = max(1, -(-max_tokens // cfg["block_n"]))
    tps = -(-n_tiles // max(1, num_splits)) * cfg["block_n"]
    return max(1, -(-max_tokens // tps)), tps


def mla_decode_triton(q_abs: Tensor, q_pe: Tensor, c_kv_cache: Tensor, k_pe_cache: Tensor, block_tables: Tensor,
                      seq_lens: Tensor, scale: float, *, num_splits: int | None = None, block_h: int | None = None,
                      block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                      tma: bool | None = None, warp_specialize: bool | None = None, gluon: bool | None = None,
                      seesaw: bool | None = None, append: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Paged absorbed-MLA decode through Triton (same contract as `mla_decode_reference`, `append` included). The
    other keyword-only arguments override the tuned defaults (benchmark sweeps); `num_splits` fixes the KV split
    count; `tma` asks for the TMA kernel (`dsv3.kernels.mla_decode_tma`), which runs where `tma_supported`, and
    `warp_specialize` for its tile loop as Triton's producer / consumer split (no gain on an H100); `gluon` for the
    Gluon body (`dsv3.kernels.mla_decode_gluon`: S split over the warpgroups, asynchronous wgmma), which runs where
    `gluon_supported` (Hopper, bf16, 64-head blocks of 32- or 64-token tiles) and is tried before the TMA body;
    `seesaw` for FlashMLA's two-warpgroup schedule in Gluon (`dsv3.kernels.mla_decode_seesaw`; 64-token tiles; with
    `append` the latents are stored before its launch), tried first. All three are on by default at 64+ heads."""
    need_triton("mla_decode_triton")
    B, H, C, R = _check_inputs(q_abs, q_pe, c_kv_cache, k_pe_cache, block_tables, seq_lens)
    q_abs, q_pe, block_tables, seq_lens, append = _kernel_inputs(q_abs, q_pe, c_kv_cache, k_pe_cache, block_tables,
                                                                 seq_lens, append)
    cfg = _default_config(H, C, q_abs.dtype, B)
    for k, v in (("block_h", block_h), ("block_n", block_n), ("num_warps", num_warps), ("num_stages", num_stages),
                 ("tma", tma), ("warp_specialize", warp_specialize), ("gluon", gluon), ("seesaw", seesaw)):
        if v is not None:
            cfg[k] = v
    page = c_kv_cache.shape[1]
    max_tokens = block_tables.shape[1] * page
    out = torch.empty(B, H, C, device=q_abs.device, dtype=q_abs.dtype)
    if B == 0 or H == 0:
        if append is not None and B:      # no heads to attend, the store still owed
            mla_decode_reference(q_abs, q_pe, c_kv_cache, k_pe_cache, block_tables, seq_lens, scale, append=append)
        return out
    seesaw = bool(cfg.get("seesaw")) and seesaw_supported(q_abs, c_kv_cache, k_pe_cache, cfg["block_h"],
                                                          cfg["block_n"])
    S, tps = _splits(B, H, max_tokens, cfg, num_splits, q_abs.device, one_wave=seesaw)
    if seesaw and append is not None:
        # the seesaw body has no append form: the latents stored first (two index copies), then attended from the
        # cache like every other key. At 128 heads a step attends thousands of keys per sequence in ~0.4 ms or more
        # (RESULTS.md twenty-sixth session): the copies' launches are noise there
        _store_append(c_kv_cache, k_pe_cache, append)
        append = None
    if S == 1 and not seesaw:  # write the final output directly (the seesaw body always writes partials)
        op, lse = out.unsqueeze(2), out  # lse unused (WRITE_LSE=False)
        op_strides = (op.stride(0), op.stride(1), op.stride(2))
        lse_strides = (0, 0)
    else:
        op = torch.empty(B, H, S, C, device=q_abs.device, dtype=torch.float32)
        lse = torch.empty(B, H, S, device=q_abs.device, dtype=torch.float32)
        op_strides = (op.stride(0), op.stride(1), op.stride(2))
        lse_strides = (lse.stride(0), lse.stride(1))

    dot_prec = "ieee" if q_abs.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(H, cfg["block_h"]), S, B)
    # (new latents, new rope keys, slots); without APPEND unread placeholders
    append_args = (append[1], append[2], append[0]) if append is not None else (q_abs, q_abs, seq_lens)
    if seesaw:
        launch_seesaw(grid, q_abs, q_pe, c_kv_cache, k_pe_cache, block_tables, seq_lens, op, lse, append_args,
                      float(scale) * math.log2(math.e), op_strides, lse_strides, H, tps)
    elif cfg.get("gluon") and gluon_supported(q_abs, c_kv_cache, k_pe_cache, cfg["block_h"], cfg["block_n"]):
        launch_gluon(grid, q_abs, q_pe, c_kv_cache, k_pe_cache, block_tables, seq_lens, op, lse, append_args,
                     float(scale) * math.log2(math.e), op_strides, lse_strides, H, tps, cfg, S > 1, append is not None)
    elif cfg.get("tma") and tma_supported(q_abs, c_kv_cache, k_pe_cache, cfg["block_n"]):
        launch_tma(grid, q_abs, q_pe, c_kv_cache, k_pe_cache, block_tables, seq_lens, op, lse, append_args,
                   float(scale) * math.log2(math.e), op_strides, lse_strides, H, tps, cfg, dot_prec, S > 1,
                   append is not None)
    else:
        _mla_decode_split_kernel[grid](
            q_abs, q_pe, c_kv_cache, k_pe_cache, block_tables, seq_lens, op, lse, *append_args,
            float(scale) * math.log2(math.e),
            q_abs.stride(0), q_abs.stride(1), q_pe.stride(0), q_pe.stride(1),
            c_kv_cache.stride(0), c_kv_cache.stride(1), k_pe_cache.stride(0), k_pe_cache.stride(1),
            block_tables.stride(0),
            *op_strides, *lse_strides,
            H, tps,
            C=C, R=R, PAGE=page,
            BLOCK_C=_next_pow2(C), BLOCK_R=max(16, _next_pow2(R)), BLOCK_H=cfg["block_h"], BLOCK_N=cfg["block_n"],
            DOT_PREC=dot_prec, WRITE_LSE=S > 1, APPEND=append is not None,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_launch(q_abs),
        )
    if S > 1 or seesaw:
        _mla_decode_combine_kernel[(H, B)](
            op, lse, out, seq_lens,
            op.stride(0), op.stride(1), op.stride(2),
            lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            S, tps,
            C=C, BLOCK_C=_next_pow2(C), BLOCK_S=_next_pow2(S),
            num_warps=4, **pdl_launch(q_abs),
        )
    return out


def mla_decode(q_abs: Tensor, q_pe: Tensor, c_kv_cache: Tensor, k_pe_cache: Tensor, block_tables: Tensor,
               seq_lens: Tensor, scale: float, *, append: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Dispatcher: the Triton kernel for CUDA bf16/fp16/fp32 tensors when triton imports, else the PyTorch
    reference (DSV3_MLA_DECODE=reference forces it)."""
    if use_triton(q_abs, "DSV3_MLA_DECODE"):  # fp64 (tl.dot has none on the GPU) takes the reference
        return mla_decode_triton(q_abs, q_pe, c_kv_cache, k_pe_cache, block_tables, seq_lens, scale, append=append)
    return mla_decode_reference(q_abs, q_pe, c_kv_cache, k_pe_cache, block_tables, seq_lens, scale, append=append)
