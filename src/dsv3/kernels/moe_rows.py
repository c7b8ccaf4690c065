"""The fused MoE's GEMV form for batch-1 decode: steps 2-3 of dsv3.kernels.moe_decode with one program per (pair,
BLOCK_N rows) instead of sorted row tiles.

Why: at one token the tiled stages pad each pair to a 16-row MMA tile and stream 128-column blocks; on an H100 they
read FP8 experts at ~1.5 TB/s and bf16 ones at ~2.6 (RESULTS.md, fifteenth session), and the pair sort before them is
one more launch per layer. A token's 6 pairs are 6 GEMVs: each program streams a 4-row strip of its pair's expert
with fp8_gemv's wide loads (`_row_strip`: KU * 128 columns per load, block scales gathered per column; the cold
GEMV probe's 1.5-1.7x bf16 cuBLAS, sixteenth session), no sort at all.

    h[p] = silu(x[t] . gate_e^T) * (x[t] . up_e^T)       (x's dtype, as the tiled stage stores it)
    y[p] = tw[p] * (h[p] . down_e^T)                     (fp32; t = p // top_k, e = idx[p])

then the caller's fixed-order combine over k. Pairs that share an expert read its rows once each (the tiled form
reads them once per tile): fine at batch 1, where 6 of 64 experts rarely repeat, not at larger batches.

The shared experts as one more pair per token (optional): given their gate / up (I_s, D) (I_s = n_shared *
moe_intermediate_size; views into dsv3.infer.fused_proj's fused gate-up buffer do, row stride D), down (D, I_s) and,
for FP8 weights, their 2-D scale_inv, token t's pairs are its K routed ones then the shared one (y row t*(K+1) + K,
weight 1): the program of that pair picks the shared base pointers, its own rows (gate-up: I_s) and columns (down:
I_s) at run time, the gate-up grid covers max(I, I_s) rows (strips past a pair's own rows return at once), and the
caller's combine sums K+1 rows per token in a fixed order. Why: the shared SwiGLU is otherwise a dense MLP after the
routed experts, 3-4 more launches per MoE layer (gate-up GEMV, silu * up, down GEMV, the add) at ~2 us of fixed cost
each in a batch-1 step of ~625 launches (RESULTS.md, issue 16); folded in, its weights stream in the same two
launches, with no copy of them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fp8_gemv import gemv_launch
from .triton_setup import BLOCK, HAS_TRITON, pdl_entry, pdl_launch, tl, triton

if HAS_TRITON:
    from .fp8_gemv import _row_strip, _row_strips

__all__ = ["ROWS_MAX_TOKENS", "moe_decode_rows_triton", "rows_form", "rows_launch"]

if HAS_TRITON:

    @triton.jit
    def _gate_up_rows_kernel(X, IDX, WG, WU, SG, SU, WGS, WUS, SGS, SUS, H, N, NS, K, NKB, TOPK, stride_xm,
                             stride_we, stride_wn, stride_se, stride_sn, stride_wsn, stride_ssn, stride_hm,
                             BLOCK_N: tl.constexpr, KU: tl.constexpr, EVEN_K: tl.constexpr, FP8: tl.constexpr,
                             PAIR: tl.constexpr, SHARED: tl.constexpr, PDL: tl.constexpr = False):
        """The GEMV form of step 2, one program per (pair, BLOCK_N rows of I): h[p] = silu(x[t] g_e^T) * x[t] u_e^T
        for the pair's token t and expert e, each weight strip read with fp8_gemv's wide loads; PAIR: gate's and
        up's loads in the same steps, else gate's strip then up's. SHARED: each token's pairs are its TOPK routed ones
        then one over the shared experts' WGS / WUS (NS rows; strips past a pair's own rows return at once)."""
        pdl_entry(PDL)
        p = tl.program_id(0)
        n0 = tl.program_id(1) * BLOCK_N
        if SHARED:
            t = p // (TOPK + 1)
            k = p % (TOPK + 1)
            shared = k == TOPK
            # scalars by tl.where: an `if` would have to merge a launch's constexpr 1 with an i32 (Triton
            # specialises integer arguments equal to 1); the pointers below by a scalar `if`
            n = tl.where(shared, NS, N)
            if n0 >= n:         # the grid covers max(I, I_s) rows
                return
            e = tl.load(IDX + t * TOPK + k, mask=k < TOPK, other=0).to(tl.int64)
            swn = tl.where(shared, stride_wsn, stride_wn)
            ssn = tl.where(shared, stride_ssn, stride_sn)
        else:
            t = p // TOPK
            e = tl.load(IDX + p).to(tl.int64)
            n = N
            swn = stride_wn
            ssn = stride_sn
        wg = WG + e * stride_we
        wu = WU + e * stride_we
        sg = SG + e * stride_se
        su = SU + e * stride_se
        if SHARED:
            if shared:
                wg = WGS
                wu = WUS
                sg = SGS
                su = SUS
        x = X + t.to(tl.int64) * stride_xm
        if PAIR:
            g, u, offs_n = _row_strips(x, wg, sg, wu, su, n0, n, K, 0, NKB, swn, ssn, BLOCK_N, KU, EVEN_K, FP8, True)
        else:
            g, offs_n = _row_strip(x, wg, sg, n0, n, K, 0, NKB, swn, ssn, BLOCK_N, KU, EVEN_K, FP8)
            u, _ = _row_strip(x, wu, su, n0, n, K, 0, NKB, swn, ssn, BLOCK_N, KU, EVEN_K, FP8)
        h = g * tl.sigmoid(g) * u                                          # silu(gate) * up, fp32
        tl.store(H + p.to(tl.int64) * stride_hm + offs_n, h.to(H.dtype.element_ty), mask=offs_n < n)

    @triton.jit
    def _down_rows_kernel(H, IDX, WD, SD, WDS, SDS, TW, Y, N, K, KS, NKB, NKBS, TOPK, stride_hm, stride_we,
                          stride_wn, stride_se, stride_sn, stride_wsn, stride_ssn, stride_ym,
                          BLOCK_N: tl.constexpr, KU: tl.constexpr, EVEN_K: tl.constexpr, FP8: tl.constexpr,
                          SHARED: tl.constexpr, PDL: tl.constexpr = False):
        """The GEMV form of step 3: y[p] = tw[p] * h[p] d_e^T (fp32), one program per (pair, BLOCK_N rows of D);
        SHARED: each token's last pair runs the shared experts' WDS (KS columns) with weight 1."""
        pdl_entry(PDL)
        p = tl.program_id(0)
        if SHARED:
            k = p % (TOPK + 1)
            shared = k == TOPK
            q = (p // (TOPK + 1)) * TOPK + k            # the routed pair's (token, k) place in IDX and TW
            e = tl.load(IDX + q, mask=k < TOPK, other=0).to(tl.int64)
            tw = tl.load(TW + q, mask=k < TOPK, other=1.0)
            kk = tl.where(shared, KS, K)
            nkb = tl.where(shared, NKBS, NKB)
            swn = tl.where(shared, stride_wsn, stride_wn)
            ssn = tl.where(shared, stride_ssn, stride_sn)
        else:
            e = tl.load(IDX + p).to(tl.int64)
            tw = tl.load(TW + p)
            kk = K
            nkb = NKB
            swn = stride_wn
            ssn = stride_sn
        wd = WD + e * stride_we
        sd = SD + e * stride_se
        if SHARED:
            if shared:
                wd = WDS
                sd = SDS
        acc, offs_n = _row_strip(H + p.to(tl.int64) * stride_hm, wd, sd, tl.program_id(1) * BLOCK_N, N, kk, 0, nkb,
                                 swn, ssn, BLOCK_N, KU, EVEN_K, FP8)
        tl.store(Y + p.to(tl.int64) * stride_ym + offs_n, acc * tw, mask=offs_n < N)


# Steps 2-3 in the GEMV form (no sort, one program per (pair, strip of rows)) for decode steps of at most this many
# tokens: each pair's expert rows streamed with fp8_gemv's wide loads. At batch 1 the tiled stages read FP8 experts at
# ~1.5 TB/s and bf16 at ~2.6 on an H100 (RESULTS.md, fifteenth session) and the sort is one more launch per layer;
# pairs of one expert read its rows twice (through L2 when adjacent), which the tiled form avoids at larger batches.
ROWS_MAX_TOKENS = 2
NO_SLICES = 1 << 30     # the SM count given to gemv_launch: its strips always "fill the GPU", so no K slices (these
                        # kernels have none; a pair's strips already make P x N / 4 programs)


def rows_form(x: Tensor, gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor, max_tokens: int | None = None,
              shared: tuple | None = None) -> bool:
    """Whether `moe_decode_triton` takes the GEMV form: few tokens, weights with unit stride along K, gate and up
    with the same strides (the gate-up kernel steps through both with gate's); `shared` (gate, up, down of the shared
    experts, 2-D), the same of theirs."""
    limit = ROWS_MAX_TOKENS if max_tokens is None else max_tokens
    ok = (x.shape[0] <= limit and up_proj.stride() == gate_proj.stride()
          and all(w.stride(2) == 1 for w in (gate_proj, up_proj, down_proj)))
    if shared is not None:
        ok = ok and shared[1].stride() == shared[0].stride() and all(w.stride(1) == 1 for w in shared[:3])
    return ok


# Measured defaults over fp8_gemv's one-row rules (benchmarks/moe_decode_sweep.py step 4 at lite widths, T = 1 and 2,
# H100, RESULTS.md eighteenth session): down's 16-row strips of 2 wide loads were the best of the grid in all four
# cases (FP8 T = 1: 30.2 -> 27.2 us); FP8 gate-up's 8-row strips with gate's and up's loads paired next (30.2 -> 27.9;
# bf16's gate-up gained nothing from either, so it keeps the rules).
ROWS_DOWN = dict(block_n=16, ku=2)
ROWS_GATE_UP_FP8 = dict(block_n=8, ku=4, pair=True)


def rows_launch(D: int, I: int, gate_up: dict | None = None, down: dict | None = None,
                pair: bool | None = None, fp8: bool = False) -> tuple[dict, dict]:
    """The two stages' launches (block_n, ku, num_warps, and the gate-up stage's `pair`): fp8_gemv's one-row rules
    (`gemv_launch`), no K slices, then the measured defaults above (`fp8`: the experts' weights are FP8), then
    `gate_up` / `down` / `pair` overriding fields (benchmarks/moe_decode_sweep.py sweeps them)."""
    base = {"gate_up": dict(ROWS_GATE_UP_FP8) if fp8 else {"pair": False}, "down": dict(ROWS_DOWN)}
    launches = []
    for stage, (n, k), over in (("gate_up", (I, D), gate_up), ("down", (D, I), down)):
        cfg = {f: v for f, v in gemv_launch(1, n, k, NO_SLICES).items() if f != "split"}
        cfg.update(base[stage])
        cfg.update(over or {})
        if stage == "gate_up" and pair is not None:
            cfg["pair"] = bool(pair)
        fields = {"block_n", "ku", "num_warps"} | ({"pair"} if stage == "gate_up" else set())
        if set(cfg) != fields or cfg["block_n"] not in (1, 2, 4, 8, 16, 32, 64, 128) or \
                cfg["ku"] < 1 or cfg["ku"] & (cfg["ku"] - 1) or cfg["num_warps"] not in (1, 2, 4, 8, 16):
            raise ValueError(f"moe rows launch: block_n a power of two <= 128, ku a power of two, num_warps 1-16; "
                             f"got {cfg}")
        launches.append(cfg)
    return launches[0], launches[1]


def moe_decode_rows_triton(x: Tensor, tw: Tensor, idx: Tensor, gate_proj: Tensor, up_proj: Tensor,
                           down_proj: Tensor, gate_scale: Tensor | None = None, up_scale: Tensor | None = None,
                           down_scale: Tensor | None = None, shared_gate: Tensor | None = None,
                           shared_up: Tensor | None = None, shared_down: Tensor | None = None,
                           shared_gate_scale: Tensor | None = None, shared_up_scale: Tensor | None = None,
                           shared_down_scale: Tensor | None = None, *, gate_up: dict | None = None,
                           down: dict | None = None, pair: bool | None = None) -> Tensor:
    """Steps 2-3 in the GEMV form: tw (T, K) fp32 routed weights, idx (T, K) -> y (T*K, D) fp32, each pair's weighted
    expert output at its (token, k) row (as `moe_decode_sorted_triton`, without the sort). With the shared experts
    (gate / up (I_s, D), down (D, I_s), and their scale_inv for FP8 weights; module docstring): y (T*(K+1), D),
    each token's K routed rows then its shared row. Launch: `rows_launch` (its keyword arguments here)."""
    D, I = x.shape[1], gate_proj.shape[1]
    T, topk = idx.shape
    fp8 = gate_scale is not None
    has_shared = shared_gate is not None
    I_s = shared_gate.shape[0] if has_shared else I
    P = T * (topk + has_shared)
    x = x.contiguous()
    flat = idx.reshape(-1)          # the router's ids as they are: a cast would be one more kernel per layer
    # fp32 contiguous scales (no copy for the checkpoint's: already so); x stands in (never read) without FP8 or
    # without the shared experts
    scales = [s.float().contiguous() if fp8 else x for s in (gate_scale, up_scale, down_scale)]
    ws = [w if has_shared else x for w in (shared_gate, shared_up, shared_down)]
    ss = [s.float().contiguous() if fp8 and has_shared else x for s in (shared_gate_scale, shared_up_scale,
                                                                          shared_down_scale)]
    st = lambda t, d: t.stride(d) if t is not x else 0      # noqa: E731
    h = torch.empty(P, max(I, I_s), device=x.device, dtype=x.dtype)
    cfg, down_cfg = rows_launch(D, I, gate_up, down, pair, fp8)
    nkb = -(-D // BLOCK)
    _gate_up_rows_kernel[(P, triton.cdiv(max(I, I_s), cfg["block_n"]))](
        x, flat, gate_proj, up_proj, scales[0], scales[1], ws[0], ws[1], ss[0], ss[1], h, I, I_s, D, nkb, topk,
        x.stride(0), gate_proj.stride(0), gate_proj.stride(1), st(scales[0], 0), st(scales[0], 1), st(ws[0], 0),
        st(ss[0], 0), h.stride(0),
        BLOCK_N=cfg["block_n"], KU=cfg["ku"], EVEN_K=D % (cfg["ku"] * BLOCK) == 0, FP8=fp8, PAIR=cfg["pair"],
        SHARED=has_shared, num_warps=cfg["num_warps"], **pdl_launch(x))
    y = torch.empty(P, D, device=x.device, dtype=torch.float32)
    cfg = down_cfg
    kw = cfg["ku"] * BLOCK
    _down_rows_kernel[(P, triton.cdiv(D, cfg["block_n"]))](
        h, flat, down_proj, scales[2], ws[2], ss[2], tw.reshape(-1), y, D, I, I_s, -(-I // BLOCK), -(-I_s // BLOCK),
        topk, h.stride(0), down_proj.stride(0), down_proj.stride(1), st(scales[2], 0), st(scales[2], 1),
        st(ws[2], 0), st(ss[2], 0), y.stride(0),
        BLOCK_N=cfg["block_n"], KU=cfg["ku"], EVEN_K=I % kw == 0 and I_s % kw == 0, FP8=fp8, SHARED=has_shared,
        num_warps=cfg["num_warps"], **pdl_launch(h))
    return y
