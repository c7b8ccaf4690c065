"""Weight-only FP8 GEMMs (dsv3.kernels.fp8_weight_gemm) at `lite` decode shapes vs bf16 cuBLAS / torch._grouped_mm.

Dense: the FP8-stored projections of a lite layer (q_proj 3072x2048, kv_a 576x2048, o_proj 2048x2048, dense-FFN
gate/up 10944x2048 and down 2048x10944) at M = 1, 32, 64 rows. Grouped: the 64 routed experts (gate/up 1408x2048,
down 2048x1408) with B = 1, 32, 64 tokens x 6 experts each, routed at random. Each case is first checked against the
reference, then timed with `triton.testing.do_bench_cudagraph` (median; eager timing would measure the launch): the
default launch config and the best of a small sweep (block_n, warps, stages; split-K slices for the dense ones).
Bandwidth = weight bytes the call must read (fp8 + scales; for grouped, only the experts hit) / time, against the 4.28
TB/s copy bandwidth; the bf16 rows read twice the bytes.

GEMV rows (issue 16: FP8 >= 1.6x BF16 at batch 1): the weight-streaming GEMV (kernels/fp8_gemv.py, what
fp8_linear_triton dispatches to for M <= 16) at M = 1, 4, 16 on the dense shapes and for one token's 6 experts
(grouped, M = 6), against bf16 cuBLAS / `_grouped_mm` and against the tiled kernel (`gemv=False`): its launch-table
default and the best of GEMV_SWEEP (block_n, ku, split, warps). `--only gemv` runs just these. They are timed cold:
each call of the captured sequence reads the next of enough copies of the weights (COLD_BYTES, 4x the H100's and 5x
the H200's L2) that none is still in L2, as in a decode step (a lite step reads 2.7-4.9 GB). Timed warm (`--warm`,
what the fourteenth session's rows were), a 6 MB FP8 q_proj read at 1.18 TB/s while in the engine's step the FP8
GEMVs averaged 0.66 TB/s (RESULTS.md, fifteenth session).

GPU: PYTHONPATH=src python benchmarks/fp8_weight_gemm_bench.py [--only gemv] [--gemv-sweep none|small|full]   (JSON in
     $OUT/fp8_weight_gemm.json; each GEMV row printed as measured)
CPU dry run (tiny shapes, TRITON_INTERPRET=1, one config per sweep, wall-clock "timing", numbers meaningless):
     TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/fp8_weight_gemm_bench.py --dry-run
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch
import triton.testing

from dsv3.fp8 import quantize_blocks
from dsv3.kernels.fp8_weight_gemm import (fp8_grouped_linear_reference, fp8_grouped_linear_triton,
                                          fp8_linear_reference, fp8_linear_triton)

COPY_BW = 4.28e12
DENSE = {"q_proj": (3072, 2048), "kv_a": (576, 2048), "o_proj": (2048, 2048), "ffn_up": (10944, 2048),
         "ffn_down": (2048, 10944)}
# what a lite decode step runs (dsv3.infer.fused_proj): q + kv_a fused, the shared experts' gate + up fused, their
# down, o; 26 MoE layers (`--gemv-shapes engine`)
ENGINE = {"q_kv_a": (3648, 2048), "o_proj": (2048, 2048), "shared_up": (5632, 2048), "shared_down": (2048, 2816)}
EXPERTS = {"expert_up": (1408, 2048), "expert_down": (2048, 1408)}
SWEEP = [dict(block_n=bn, num_warps=w, num_stages=s) for bn, w, s in itertools.product((16, 32, 64, 128), (4, 8),
                                                                                         (3, 5))]
# dense decode GEMMs: K slices too (split_k = 1 is the kernel without them)
DENSE_SWEEP = [dict(block_n=bn, num_warps=4, num_stages=s, split_k=k)
               for bn, s, k in itertools.product((16, 32, 64), (3, 5), (1, 2, 4, 8, 16))]
GEMV_SWEEP = [dict(gemv=True, block_n=bn, ku=ku, split_k=k, num_warps=w)
              for bn, ku, k, w in itertools.product((8, 16, 32, 64), (1, 2, 4, 8), (1, 2, 4, 8), (4,))]
# --gemv-sweep small (default): 24 of GEMV_SWEEP's 64 launches; the full sweep compiles and times 64 x 17 cases,
# which ran out of a 90 s limit on the H200 before printing anything (sixth session)
GEMV_SWEEP_SMALL = [dict(gemv=True, block_n=bn, ku=ku, split_k=k, num_warps=4)
                    for bn, ku, k in itertools.product((8, 16, 32, 64), (2, 4, 8), (1, 4))]
# cold reads want bytes in flight: more programs (K slices, one more launch to sum them) or more K blocks loaded
# together per program (ku 16: a 2048-wide row's 16 blocks at once, no slices)
GEMV_SWEEP_SPLIT = [dict(gemv=True, block_n=bn, ku=ku, split_k=k, num_warps=4)
                    for bn, ku, k in itertools.product((8, 16, 32), (4, 8, 16), (1, 2, 4, 8))]
GEMV_M = (1, 2, 4, 16)   # 2: batch-1 verify of one draft token
DRY = False     # --dry-run: CPU interpreter, tiny shapes, wall-clock of one call
COLD_BYTES = 256 << 20   # the weight copies a cold GEMV row cycles through (--warm: one)


def copies(make, nbytes: int):
    """`make()` called into a list of copies of >= COLD_BYTES in all (one when warm or dry), and a function that
    returns the next copy on each call: a captured sequence of calls never re-reads one that may still be in L2."""
    n = 1 if DRY or COLD_BYTES == 0 else max(1, -(-COLD_BYTES // nbytes))
    return itertools.cycle([make() for _ in range(n)]).__next__


def bench(fn) -> float:
    # replayed from a CUDA graph: single small GEMMs take less GPU time than their launch on this host
    if DRY:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e-3


def best(fn_of_cfg, sweep=SWEEP) -> tuple[float, dict]:
    out = []
    for cfg in sweep:
        try:
            out.append((bench(lambda: fn_of_cfg(cfg)), cfg))
        except Exception:     # configs over the shared-memory limit
            continue
    return min(out, key=lambda t: t[0])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def expert_weights(E: int, N: int, K: int, dev: str):
    w = torch.randn(E, N, K, device=dev) * 0.02
    pairs = [quantize_blocks(m) for m in w]
    return w, torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _print_gemv(r: dict) -> None:
    print(f"GEMV {r['name']:11s} M={r['M']:<3d} err {r['rel_err']:.1e}  default {r['us_default']:7.1f} us "
          f"({r['bw_default'] / 1e12:.2f} TB/s)  best {r['us_best']:7.1f} us ({r['bw_best'] / 1e12:.2f} TB/s) "
          f"{r['best']}  tiled {r['us_tiled']:7.1f} us  bf16 {r['us_bf16']:7.1f} us ({r['bw_bf16'] / 1e12:.2f} "
          f"TB/s)  vs bf16 {r['us_bf16'] / r['us_default']:.2f}x default, {r['us_bf16'] / r['us_best']:.2f}x "
          f"best; vs tiled {r['us_tiled'] / r['us_default']:.2f}x", flush=True)


def gemv_rows(dev: str, dtype: torch.dtype) -> list[dict]:
    """The GEMV vs bf16 and vs the tiled kernel: dense at GEMV_M rows, grouped for one token's 6 of 64 experts."""
    rows = []
    for (name, (N, K)), M in itertools.product(DENSE.items(), GEMV_M):
        w = torch.randn(N, K, device=dev) * 0.02
        q, s = quantize_blocks(w)
        x = torch.randn(M, K, device=dev, dtype=dtype)
        ref = fp8_linear_reference(x, q, s)
        err = rel_err(fp8_linear_triton(x, q, s, gemv=True), ref)
        nq = copies(lambda: (q.clone(), s.clone()), q.numel())
        nb = copies(lambda: w.to(dtype), 2 * q.numel())
        t_def = bench(lambda: fp8_linear_triton(x, *nq(), gemv=True))
        t_best, cfg = best(lambda c: fp8_linear_triton(x, *nq(), **c), GEMV_SWEEP)
        t_tiled = bench(lambda: fp8_linear_triton(x, *nq(), gemv=False))
        t_bf16 = bench(lambda: torch.nn.functional.linear(x, nb()))
        rows.append(dict(kind="gemv", name=name, M=M, N=N, K=K, rel_err=err, us_default=t_def * 1e6,
                         us_best=t_best * 1e6, best=cfg, us_tiled=t_tiled * 1e6, us_bf16=t_bf16 * 1e6,
                         bw_default=(q.numel() + s.numel() * 4) / t_def, bw_best=(q.numel() + s.numel() * 4) / t_best,
                         bw_bf16=2 * N * K / t_bf16))
        _print_gemv(rows[-1])
    for name, (N, K) in EXPERTS.items():
        E = 64 if not DRY else 8
        w, q, s = expert_weights(E, N, K, dev)
        idx = torch.randperm(E, device=dev)[:6].sort().values             # batch 1: 6 distinct experts
        offs = torch.bincount(idx, minlength=E).cumsum(0).to(torch.int32)
        x = torch.randn(6, K, device=dev, dtype=dtype)
        ref = fp8_grouped_linear_reference(x, q, s, offs)
        err = rel_err(fp8_grouped_linear_triton(x, q, s, offs, gemv=True), ref)
        nq = copies(lambda: (q.clone(), s.clone()), 6 * N * K)         # the 6 experts hit are what is read
        nb = copies(lambda: w.to(dtype).transpose(-2, -1), 12 * N * K)
        t_def = bench(lambda: fp8_grouped_linear_triton(x, *nq(), offs, gemv=True))
        t_best, cfg = best(lambda c: fp8_grouped_linear_triton(x, *nq(), offs, **c), GEMV_SWEEP)
        t_tiled = bench(lambda: fp8_grouped_linear_triton(x, *nq(), offs, gemv=False))
        t_bf16 = bench(lambda: torch._grouped_mm(x, nb(), offs=offs)) if not DRY else float("nan")
        nbytes = 6 * (N * K + s[0].numel() * 4)
        rows.append(dict(kind="grouped_gemv", name=name, B=1, M=6, N=N, K=K, experts_hit=6, rel_err=err,
                         us_default=t_def * 1e6, us_best=t_best * 1e6, best=cfg, us_tiled=t_tiled * 1e6,
                         us_bf16=t_bf16 * 1e6, bw_default=nbytes / t_def, bw_best=nbytes / t_best,
                         bw_bf16=2 * 6 * N * K / t_bf16))
        _print_gemv(rows[-1])
    return rows


def main() -> None:
    global DENSE, EXPERTS, GEMV_SWEEP, DENSE_SWEEP, SWEEP, DRY, COLD_BYTES, GEMV_M
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("all", "gemv"), default="all")
    ap.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    ap.add_argument("--gemv-sweep", choices=("none", "small", "full", "split"), default="small",
                    help="GEMV launches timed beside the table's default: none, 24, all 64, or split: 36 with K "
                    "slices 1..8 and up to 16 K blocks per step (more bytes in flight: what a cold read may want)")
    ap.add_argument("--warm", action="store_true", help="GEMV rows re-read one copy of the weights (L2-resident "
                    "where they fit: not what a decode step sees)")
    ap.add_argument("--gemv-m", default=",".join(map(str, GEMV_M)), help="the dense GEMV rows' M values")
    ap.add_argument("--gemv-shapes", choices=("layer", "engine"), default="layer", help="layer: a lite layer's "
                    "projections one by one; engine: the fused ones a lite decode step runs")
    args = ap.parse_args()
    DENSE = ENGINE if args.gemv_shapes == "engine" else DENSE
    COLD_BYTES = 0 if args.warm else COLD_BYTES
    GEMV_M = tuple(int(m) for m in args.gemv_m.split(","))
    GEMV_SWEEP = {"none": [dict(gemv=True)], "small": GEMV_SWEEP_SMALL, "full": GEMV_SWEEP,
                  "split": GEMV_SWEEP_SPLIT}[args.gemv_sweep]
    dev, dtype = "cuda", torch.bfloat16
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run needs TRITON_INTERPRET=1 in the environment (set before triton imports)")
        from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
        patch_interpreter_for_numpy2()
        DRY, dev, dtype = True, "cpu", torch.float32   # the interpreter's bf16 tl.dot is not faithful
        DENSE = {"dense_odd": (200, 300), "dense_even": (128, 256)}
        EXPERTS = {"expert_odd": (136, 200)}
        GEMV_SWEEP = [dict(gemv=True, block_n=16, ku=2, split_k=2, num_warps=4),   # block_n 8 fails at M=16
                      dict(gemv=True, block_n=8, ku=1, split_k=1, num_warps=4)]
        DENSE_SWEEP, SWEEP = DENSE_SWEEP[:1], SWEEP[:1]
    torch.manual_seed(0)
    rows = gemv_rows(dev, dtype)
    if args.only == "all" and not DRY:
        rows += tiled_rows(dev)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_weight_gemm.json").write_text(json.dumps(rows, indent=1))


def tiled_rows(dev: str) -> list[dict]:
    """The tiled kernel (`gemv=False`) at M = 1, 32, 64 and B = 1, 32, 64 tokens, as measured before the GEMV."""
    rows = []
    for (name, (N, K)), M in itertools.product(DENSE.items(), (1, 32, 64)):
        w = torch.randn(N, K, device=dev) * 0.02
        q, s = quantize_blocks(w)
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        ref = fp8_linear_reference(x, q, s).float()
        err = ((fp8_linear_triton(x, q, s, gemv=False).float() - ref).norm() / ref.norm()).item()
        wb = w.to(torch.bfloat16)
        t_def = bench(lambda: fp8_linear_triton(x, q, s, gemv=False))
        t_best, cfg = best(lambda c: fp8_linear_triton(x, q, s, **c), DENSE_SWEEP)
        t_bf16 = bench(lambda: torch.nn.functional.linear(x, wb))
        nbytes = q.numel() + s.numel() * 4
        rows.append(dict(kind="dense", name=name, M=M, N=N, K=K, rel_err=err, us_default=t_def * 1e6,
                         us_best=t_best * 1e6, best=cfg, us_bf16=t_bf16 * 1e6,
                         bw_best=nbytes / t_best, bw_bf16=2 * N * K / t_bf16))
    for (name, (N, K)), B in itertools.product(EXPERTS.items(), (1, 32, 64)):
        E = 64
        w = torch.randn(E, N, K, device=dev) * 0.02
        pairs = [quantize_blocks(m) for m in w]
        q, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        idx = torch.stack([torch.randperm(E, device=dev)[:6] for _ in range(B)]).flatten()
        counts = torch.bincount(idx, minlength=E)
        offs = counts.cumsum(0).to(torch.int32)
        M = idx.numel()
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        ref = fp8_grouped_linear_reference(x, q, s, offs).float()
        err = ((fp8_grouped_linear_triton(x, q, s, offs, gemv=False).float() - ref).norm() / ref.norm()).item()
        wb = w.to(torch.bfloat16).transpose(-2, -1)
        t_def = bench(lambda: fp8_grouped_linear_triton(x, q, s, offs, gemv=False))
        t_best, cfg = best(lambda c: fp8_grouped_linear_triton(x, q, s, offs, **c))
        t_bf16 = bench(lambda: torch._grouped_mm(x, wb, offs=offs))
        hit = int((counts > 0).sum())
        nbytes = hit * (N * K + s[0].numel() * 4)
        rows.append(dict(kind="grouped", name=name, B=B, M=M, N=N, K=K, experts_hit=hit, rel_err=err,
                         us_default=t_def * 1e6, us_best=t_best * 1e6, best=cfg, us_bf16=t_bf16 * 1e6,
                         bw_best=nbytes / t_best, bw_bf16=2 * hit * N * K / t_bf16))
    for r in rows:
        m = f"M={r['M']}" if r["kind"] == "dense" else f"B={r['B']} ({r['experts_hit']} experts)"
        print(f"{r['name']:11s} {m:20s} err {r['rel_err']:.1e}  fp8 {r['us_default']:7.1f} us default, "
              f"{r['us_best']:7.1f} us best {r['best']}  ({r['bw_best'] / 1e12:.2f} TB/s)  bf16 {r['us_bf16']:7.1f} us "
              f"({r['bw_bf16'] / 1e12:.2f} TB/s)  speed-up {r['us_bf16'] / r['us_best']:.2f}x", flush=True)
    return rows


if __name__ == "__main__":
    main()
