"""The fused MoE's launch configurations (dsv3.kernels.moe_decode): `MoELaunch` (tile sizes, warps, stages per
GEMM stage, split-K), `LAUNCH_TABLE` by weight format and token count as benchmarks/moe_decode_sweep.py measured it,
`launch_config` (a row of it, with overrides) and `fused_token_range` (the token counts where the fused call won).
Python only: nothing here needs Triton.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .triton_setup import BLOCK

@dataclass(frozen=True)
class MoELaunch:
    """One launch configuration of the two GEMM stages: the row tile `block_m` (shared: it cuts the sorted pairs
    into tiles), then per stage the N tile, warps and pipeline stages; `split_k` cuts the down GEMM's K (= I) loop
    over that many programs (fp32 partial rows summed in a fixed order after it: more programs for small batches),
    `gate_up_split_k` the gate-up GEMM's K (= D) loop (its fp32 partials summed by the down kernel as it loads h);
    `f16_dot` / `down_f16_dot` (FP8 weights only): the stage's MMA in fp16 instead of x's dtype: e4m3 -> fp16 is one
    instruction per pair (-> bf16 takes several, the FP8 stages' limit in the H200 sweep: 2-3 TB/s vs 4.1-4.3 for
    bf16) and exact; bf16 activations convert exactly too (fp16 has more mantissa bits) except magnitudes under
    2^-14 (fp16 subnormals: low bits lost) and over 65280 (clamped, never inf: the largest bf16 under fp16's 65504;
    a bound of 65504 would round to 65536 in bf16 and overflow). fp32 activations are rounded."""
    block_m: int = 16
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    down_block_n: int = 64
    down_num_warps: int = 4
    down_num_stages: int = 3
    split_k: int = 1
    gate_up_split_k: int = 1
    f16_dot: bool = False
    down_f16_dot: bool = False

    def __post_init__(self) -> None:
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            raise ValueError(f"block_m must be a power of two >= 16, got {self}")
        if BLOCK % self.block_n or BLOCK % self.down_block_n or min(self.split_k, self.gate_up_split_k) < 1:
            raise ValueError(f"block_n and down_block_n must divide {BLOCK}, the split-Ks be >= 1, got {self}")


# The launch table, by weight format and token count T (tokens = rows of the decode step; P = 6 T pairs at lite's
# top-6): row (T, launch, faster) serves token counts above the previous row's T up to its own; `faster` = the fused
# call (sort + both stages + combine) measured faster than the MoE module's path (permutation + grouped GEMMs) at T
# tokens. Fill it from `benchmarks/moe_decode_sweep.py` (it prints this block with the best launch per row: paste it
# over this one). Rows below: the sweep of 2026-12-04 on one H200 (`--deadline-s 210`, 3 alternating weight sets,
# CUDA-graph replays; GB/s of the experts' weights read; the sweep's own copy figure, 2.77 TB/s, undercounts the
# ~4.3 TB/s of RESULTS.md, so its "% of copy" is not quoted). The fused call won at every T, both formats.
LAUNCH_TABLE: dict[str, tuple[tuple[int, MoELaunch, bool], ...]] = {
    "bf16": (
        (1, MoELaunch(block_m=16, num_stages=5, down_num_stages=4), True),  # 94 us vs module 113 us; 1.10 TB/s
        (8, MoELaunch(block_m=16, block_n=32, num_stages=4), True),  # 217 vs 305 us; 2.82 TB/s
        (32, MoELaunch(block_m=16, block_n=32, num_stages=5), True),  # 338 vs 461 us; 3.04 TB/s
        (64, MoELaunch(block_m=16, block_n=32, num_stages=4), True),  # 398 vs 506 us; 2.78 TB/s
        (128, MoELaunch(block_m=16, down_block_n=128), True),  # 486 vs 599 us; 2.28 TB/s
        (256, MoELaunch(block_m=32), True),  # 372 vs 505 us; 2.97 TB/s
    ),
    "fp8": (
        (1, MoELaunch(block_m=16, block_n=32, num_stages=4, down_block_n=32), True),  # 96 vs 222 us; 0.54 TB/s
        (8, MoELaunch(block_m=16, block_n=32), True),  # 182 vs 275 us; 1.68 TB/s
        (32, MoELaunch(block_m=16, block_n=32), True),  # 278 vs 364 us; 1.85 TB/s
        (64, MoELaunch(block_m=16, block_n=32), True),  # 333 vs 420 us; 1.67 TB/s
        (128, MoELaunch(block_m=16, block_n=32), True),  # 428 vs 522 us; 1.30 TB/s
        (256, MoELaunch(block_m=32, num_warps=8), True),  # 358 vs 630 us; 1.55 TB/s
    ),
}


_FIELDS = tuple(f.name for f in fields(MoELaunch))


def _launch_kwargs(tokens: int, fp8: bool, dtype: torch.dtype, overrides: dict) -> dict:
    """`launch_config` as a plain dict, built with dict and loop operations only: a compiled decode layer traces it
    (dsv3.kernels.decode_ops), and dynamo need not know dataclasses.replace / asdict."""
    rows = LAUNCH_TABLE["fp8" if fp8 else "bf16"]
    launch = rows[-1][1]
    for t, row_launch, _ in rows:
        if t >= tokens:
            launch = row_launch
            break
    cfg = {name: getattr(launch, name) for name in _FIELDS}
    if dtype == torch.float32:
        for name, cap in (("block_n", 32), ("down_block_n", 32), ("num_stages", 2), ("down_num_stages", 2)):
            cfg[name] = min(cfg[name], cap)
    for name, value in overrides.items():
        if name not in cfg:
            raise TypeError(f"unknown launch field {name!r} (MoELaunch: {', '.join(_FIELDS)})")
        if value is not None:
            cfg[name] = value
    return cfg


def launch_config(tokens: int, fp8: bool, dtype: torch.dtype = torch.bfloat16, **overrides) -> MoELaunch:
    """The table's launch for `tokens` (the first row whose T >= tokens, the last row past the table) with
    `overrides` (MoELaunch field -> value; None keeps the table's). fp32 activations (exactness runs, the
    interpreter) take narrower tiles and fewer stages: fp32 tiles need twice the shared memory."""
    return MoELaunch(**_launch_kwargs(tokens, fp8, dtype, overrides))


def fused_token_range(fp8: bool = False) -> tuple[int, int]:
    """(1, hi): the token counts where the fused call measured faster, from the table's leading `faster` rows; hi
    sits halfway to the first slower row's T (the decode graphs' buckets between two measured rows take the nearer
    verdict), or is the last row's T when every row is faster; (1, 0) when the first row is slower."""
    rows = LAUNCH_TABLE["fp8" if fp8 else "bf16"]
    hi = 0
    for i, (t, _, faster) in enumerate(rows):
        if not faster:
            return (1, (hi + t) // 2 if i else 0)
        hi = t
    return (1, hi)
