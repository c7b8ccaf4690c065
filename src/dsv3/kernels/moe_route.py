"""The router of a decode step in one Triton kernel: gate logits -> routed weights, expert ids and per-expert load
counts (spec 1.6, the noaux_tc sigmoid gate of dsv3.model.moe.Gate; the gate GEMM itself stays outside).

Why: at batch 1 the PyTorch router is ~15 small kernels per MoE layer (top-k internals, scatters, gathers, index
copies): 0.68 ms of a 3.79 ms `lite` decode step (benchmarks/RESULTS.md, issue 16). One program per token does it
all in registers.

Per token t, with logits (E,) fp32, bias (E,) fp32, E = G groups of S experts (Gate.route's steps):
  1. scores = sigmoid(logits); choice = scores + bias (the bias steers the choice only: TR 2.1.2);
  2. if G > 1: a group's score is the sum of its top-2 choices; keep the best `topk_group` groups, the other
     groups' choices become -inf (a biased score can be negative: spec 1.6 step 4);
  3. K times: the largest choice, ties to the lowest expert id; ids come out in descending choice, as torch.topk;
  4. weights = the unbiased scores of the picks, divided by their sum (+1e-20) when norm_topk_prob and K > 1,
     times route_scale;
  5. counts[e] += 1 for each pick (atomic adds: the load counts the bias update reads).

Exactness: the picks are the reference's whenever no two candidates tie (torch.topk does not document its order
among equal values; on ties the kernel still returns a valid top-k set, lowest ids first). The sigmoid may differ
from torch's by an ulp, so choices closer than that may order differently; the weights agree to fp32 rounding.
A token with NaN logits gets ids in range (memory-safe downstream) but no meaningful routing.

`moe_route_reference`: the same contract in PyTorch (Gate.route's math on given logits; the CPU path and the
oracle). `moe_route`: Triton for CUDA fp32 logits of up to MOE_ROUTE_MAX_TOKENS tokens and MOE_ROUTE_MAX_EXPERTS
experts when triton imports, else the reference (DSV3_MOE_ROUTE=reference forces it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_setup import HAS_TRITON, need_triton, pdl_entry, pdl_launch, tl, triton, use_triton

__all__ = ["MOE_ROUTE_MAX_EXPERTS", "MOE_ROUTE_MAX_TOKENS", "moe_route", "moe_route_reference",
           "moe_route_triton", "sort_pairs_triton"]

MOE_ROUTE_MAX_TOKENS = 256      # decode-sized batches (dsv3.infer.moe_dispatch.MOE_DECODE_MAX_TOKENS)
MOE_ROUTE_MAX_EXPERTS = 256     # one token's experts fit one program's registers


def _check(logits: Tensor, bias: Tensor, top_k: int, n_group: int, topk_group: int) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a 2-D float tensor (T, E), got {tuple(logits.shape)} {logits.dtype}")
    E = logits.shape[1]
    if bias.shape != (E,):
        raise ValueError(f"bias must have shape ({E},), got {tuple(bias.shape)}")
    if n_group < 1 or E % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"n_group={n_group} must divide E={E} and topk_group={topk_group} be in 1..n_group")
    if n_group > 1 and E // n_group < 2:
        raise ValueError(f"a group's score sums its top 2 experts: groups of {E // n_group} are too small")
    if not 1 <= top_k <= topk_group * (E // n_group):
        raise ValueError(f"top_k={top_k} must be in 1..{topk_group * (E // n_group)} (the kept groups' experts)")


def moe_route_reference(logits: Tensor, bias: Tensor, top_k: int, n_group: int, topk_group: int,
                        norm_topk_prob: bool, route_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """logits (T, E) -> weights (T, K) in logits' dtype, idx (T, K) int64, counts (E,) int32: Gate.route's
    noaux_tc sigmoid math (dsv3.model.moe) on the gate's logits."""
    _check(logits, bias, top_k, n_group, topk_group)
    scores = logits.sigmoid()
    choice = scores + bias                                                          # 1.
    if n_group > 1:                                                                 # 2.
        grouped = choice.unflatten(-1, (n_group, -1))
        keep = grouped.topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices
        group_mask = torch.zeros(grouped.shape[:2], dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
        choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
    idx = choice.topk(top_k, dim=-1).indices                                        # 3.
    weights = scores.gather(1, idx)                                                 # 4.
    if norm_topk_prob and top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    counts = torch.bincount(idx.flatten(), minlength=logits.shape[1]).to(torch.int32)  # 5.
    return weights * route_scale, idx, counts


if HAS_TRITON:

    @triton.jit
    def _route_kernel(LOGITS, BIAS, W, IDX, COUNTS, stride_l, stride_w, stride_i, route_scale,
                      S: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr, TOPK: tl.constexpr,
                      BG: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr,
                      PDL: tl.constexpr = False):
        pdl_entry(PDL)
        t = tl.program_id(0).to(tl.int64)
        g = tl.arange(0, BG)[:, None]
        j = tl.arange(0, BS)[None, :]
        e = g * S + j                                                   # (BG, BS) expert ids, group-major
        valid = (g < G) & (j < S)
        logit = tl.load(LOGITS + t * stride_l + e, mask=valid, other=0.0)
        score = tl.sigmoid(logit)                                                                   # 1.
        choice = tl.where(valid, score + tl.load(BIAS + e, mask=valid, other=0.0), float("-inf"))
        if G > 1:                                                                                   # 2.
            m1 = tl.max(choice, axis=1)
            first = tl.min(tl.where(choice == m1[:, None], j, BS), axis=1)
            m2 = tl.max(tl.where(j == first[:, None], float("-inf"), choice), axis=1)
            gid = tl.arange(0, BG)
            gscore = tl.where(gid < G, m1 + m2, float("-inf"))
            keep = gid < 0
            for _ in tl.static_range(TOPK_GROUP):
                best = tl.min(tl.where(gscore == tl.max(gscore, axis=0), gid, BG), axis=0)
                keep = keep | (gid == best)
                gscore = tl.where(gid == best, float("-inf"), gscore)
            choice = tl.where(keep[:, None], choice, float("-inf"))
        ks = tl.arange(0, BK)
        out_i = tl.zeros([BK], dtype=tl.int32)
        out_w = tl.zeros([BK], dtype=tl.float32)
        for k in tl.static_range(TOPK):                                                             # 3.
            m = tl.max(tl.max(choice, axis=1), axis=0)
            # ties to the lowest id; a NaN row matches nothing: clamp, so no id or count leaves 0..E-1
            pick = tl.minimum(tl.min(tl.min(tl.where(choice == m, e, BG * BS), axis=1), axis=0), G * S - 1)
            w = tl.sum(tl.sum(tl.where(e == pick, score, 0.0), axis=1), axis=0)
            out_i = tl.where(ks == k, pick, out_i)
            out_w = tl.where(ks == k, w, out_w)
            choice = tl.where(e == pick, float("-inf"), choice)
        if NORM:                                                                                    # 4.
            out_w = out_w / (tl.sum(out_w, axis=0) + 1e-20)
        kmask = ks < TOPK
        tl.store(W + t * stride_w + ks, out_w * route_scale, mask=kmask)
        tl.store(IDX + t * stride_i + ks, out_i.to(tl.int64), mask=kmask)
        tl.atomic_add(COUNTS + out_i, tl.full([BK], 1, tl.int32), mask=kmask)                       # 5.


    @triton.jit
    def _sort_pairs_kernel(IDX, PAIRS, OFFS, TILE_E, TILE_ROW, P, E, NT, BLOCK_M: tl.constexpr, BE: tl.constexpr,
                           CH: tl.constexpr, PDL: tl.constexpr = False):
        pdl_entry(PDL)
        e = tl.arange(0, BE)
        cnt = tl.zeros([BE], dtype=tl.int32)
        for c in range(0, tl.cdiv(P, CH)):                  # 1. counts per expert
            p = c * CH + tl.arange(0, CH)
            ids = tl.load(IDX + p, mask=p < P, other=-1)
            cnt += tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0)
        ends = tl.cumsum(cnt, axis=0)                       # 2. segment ends
        tl.store(OFFS + e, ends, mask=e < E)
        starts = ends - cnt
        nxt = starts                                        # each expert's next free sorted row
        for c in range(0, tl.cdiv(P, CH)):                  # 3. pairs in order, CH at a time: a stable rank
            p = c * CH + tl.arange(0, CH)
            ids = tl.load(IDX + p, mask=p < P, other=-1)
            onehot = (ids[:, None] == e[None, :]).to(tl.int32)                          # (CH, BE)
            pos = tl.sum(onehot * (tl.cumsum(onehot, axis=0) - 1 + nxt[None, :]), axis=1)
            tl.store(PAIRS + pos, p, mask=p < P)
            nxt += tl.sum(onehot, axis=0)
        tiles = (cnt + BLOCK_M - 1) // BLOCK_M              # 4. the tile map (grouped_tile_map's formula)
        cum = tl.cumsum(tiles, axis=0)
        real = e[None, :] < E
        for c in range(0, tl.cdiv(NT, CH)):
            t = c * CH + tl.arange(0, CH)
            group = tl.sum(((cum[None, :] <= t[:, None]) & real).to(tl.int32), axis=1)   # searchsorted, right
            sel = e[None, :] == tl.minimum(group, E - 1)[:, None]
            first = tl.sum(tl.where(sel, starts[None, :], 0), axis=1)
            before = tl.sum(tl.where(sel, cum[None, :] - tiles[None, :], 0), axis=1)
            tl.store(TILE_E + t, group, mask=t < NT)
            tl.store(TILE_ROW + t, first + (t - before) * BLOCK_M, mask=t < NT)


def sort_pairs_triton(idx: Tensor, n_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dsv3.kernels.moe_decode.sort_pairs in one single-program launch (same contract and values): the (token * K
    + k) pairs of idx (T, K) in stable expert order (P,) int32, the cumulative segment ends (E,) int32 and the tile
    map (expert, first sorted row), (cdiv(P, block_m) + min(E, P),) int32 each. Why: the torch form is ~10 small
    kernels per MoE layer (scatter-add counts, scans, a scatter, searchsorted: the routing share of the batch-1
    profile, RESULTS.md issue 16). E <= MOE_ROUTE_MAX_EXPERTS, and the pairs go through in chunks one after
    another, so it is meant for decode batches (P <= MOE_ROUTE_MAX_TOKENS * K)."""
    need_triton("sort_pairs_triton")
    P, E = idx.numel(), n_experts
    if not 1 <= E <= MOE_ROUTE_MAX_EXPERTS:
        raise ValueError(f"sort_pairs_triton takes 1..{MOE_ROUTE_MAX_EXPERTS} experts, got {E}")
    n_tiles = -(-P // block_m) + min(E, P)
    pairs = torch.empty(P, dtype=torch.int32, device=idx.device)
    offs = torch.empty(E, dtype=torch.int32, device=idx.device)
    tile_e = torch.empty(n_tiles, dtype=torch.int32, device=idx.device)
    tile_row = torch.empty(n_tiles, dtype=torch.int32, device=idx.device)
    _sort_pairs_kernel[(1,)](idx.contiguous(), pairs, offs, tile_e, tile_row, P, E, n_tiles, BLOCK_M=block_m,
                             BE=triton.next_power_of_2(max(E, 2)), CH=32 if E > 64 else 64, num_warps=4,
                             **pdl_launch(idx))
    return pairs, offs, tile_e, tile_row


def moe_route_triton(logits: Tensor, bias: Tensor, top_k: int, n_group: int, topk_group: int,
                     norm_topk_prob: bool, route_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The router in one Triton launch (same contract as `moe_route_reference`, fp32 logits); graph-capturable."""
    need_triton("moe_route_triton")
    _check(logits, bias, top_k, n_group, topk_group)
    if logits.dtype != torch.float32 or bias.dtype != torch.float32:
        raise ValueError(f"the Triton router takes fp32 logits and bias, got {logits.dtype}, {bias.dtype}")
    T, E = logits.shape
    logits, bias = logits.contiguous(), bias.contiguous()
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    idx = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    counts = torch.zeros(E, dtype=torch.int32, device=logits.device)
    if T:
        S = E // n_group
        _route_kernel[(T,)](logits, bias, weights, idx, counts, logits.stride(0), weights.stride(0), idx.stride(0),
                            float(route_scale), S=S, G=n_group, TOPK_GROUP=topk_group, TOPK=top_k,
                            BG=triton.next_power_of_2(n_group), BS=triton.next_power_of_2(S),
                            BK=triton.next_power_of_2(top_k), NORM=bool(norm_topk_prob and top_k > 1),
                            num_warps=4 if E > 64 else 1, **pdl_launch(logits))
    return weights, idx, counts


def moe_route(logits: Tensor, bias: Tensor, top_k: int, n_group: int, topk_group: int, norm_topk_prob: bool,
              route_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Dispatcher (module docstring): the Triton kernel on CUDA for decode-sized fp32 logits, else the reference."""
    T, E = logits.shape
    if (use_triton(logits, "DSV3_MOE_ROUTE") and logits.dtype == torch.float32
            and T <= MOE_ROUTE_MAX_TOKENS and E <= MOE_ROUTE_MAX_EXPERTS):
        return moe_route_triton(logits, bias, top_k, n_group, topk_group, norm_topk_prob, route_scale)
    return moe_route_reference(logits, bias, top_k, n_group, topk_group, norm_topk_prob, route_scale)
