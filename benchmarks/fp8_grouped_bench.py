"""The routed experts' FP8 grouped GEMMs against bf16 `torch._grouped_mm`, each of the three (forward, input gradient,
weight gradient), and the whole SwiGLU expert FFN forward + backward against bf16 and torchao's FP8 grouped MM
(issue 15: grouped >= 1.3x bf16 for fwd / dgrad / wgrad, 64 groups, lite and V3 widths, uniform and imbalanced).

1. Per GEMM, operands quantised beforehand (TFLOP/s = 2 M N K / time), each checked first against its fp32
   reference on the same codes (relative Frobenius error):
     fwd    y  = X W^T       bf16 _grouped_mm  |  dsv3 row: fp8_grouped_gemm_rowwise(Q_rows(X), Q_rows(W))
     dgrad  dX = dY W        bf16 _grouped_mm  |  same kernel with Q_rows(W^T)
     wgrad  dW = dY^T X      bf16 _grouped_mm  |  fp8_grouped_wgrad_rowwise (2-D x 2-D, per-group column scales)
   and the quantisers each needs (ms and GB/s read + written): rows of X, per-group columns of X (the wgrad's).
2. The SwiGLU FFN (gate, up, down) forward + backward, the same routed tokens (counts rounded up to 16, which
   torchao's grouped MM asks for): bf16 (the model's `_grouped_mm` path), dsv3 `FP8ExpertsFunction` with recipe row
   and row-fp8-wgrad (weights quantised inside: no cache), torchao `_to_fp8_rowwise_then_scaled_grouped_mm` per GEMM
   (if torchao imports: issue15_gpu.sh installs .whl/peers/torchao-0.18.0-*.whl).

GPU:  PYTHONPATH=src python benchmarks/fp8_grouped_bench.py          (JSON in $OUT/fp8_grouped_bench.json)
CPU dry run (tiny shapes, the references, wall-clock timing: that every path runs):
      PYTHONPATH=src python benchmarks/fp8_grouped_bench.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dsv3.fp8.experts import FP8ExpertsFunction
from dsv3.kernels.fp8_grouped_wgrad import (fp8_grouped_wgrad_rowwise, fp8_grouped_wgrad_rowwise_reference,
                                            quantize_cols_grouped)
from dsv3.kernels.fp8_rowwise import fp8_grouped_gemm_rowwise, fp8_grouped_gemm_rowwise_reference, quantize_rows

# (name, D = hidden, I = expert width); 64 experts, 6 per token
WIDTHS = [("lite", 2048, 1408), ("v3 widths", 7168, 2048)]


def bench(fn, dev: str) -> float:
    """Median seconds of fn."""
    if dev == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e-3
    fn()
    t = time.perf_counter()
    for _ in range(2):
        fn()
    return (time.perf_counter() - t) / 2


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def routed_counts(E: int, tokens: int, topk: int, imbalance: str, dev: str) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    if imbalance == "uniform":
        idx = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(tokens)]).flatten()
    else:   # Zipf-like expert popularity (fp8_grouped_probe.py's)
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float32) ** 0.8
        idx = torch.multinomial(p.expand(tokens, E), topk, generator=g).flatten()
    return torch.bincount(idx, minlength=E).to(dev)


def per_gemm(D: int, I: int, counts: torch.Tensor, dev: str) -> list[dict]:
    """Section 1 at one width and routing: gate/up (N = I, K = D) and down (N = D, K = I)."""
    offs = counts.cumsum(0).to(torch.int32)
    M, E, rows = int(offs[-1]), counts.numel(), []
    for name, N, K in (("gate/up", I, D), ("down", D, I)):
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
        w = torch.randn(E, N, K, device=dev, dtype=torch.bfloat16) * 0.02
        xq, wq, dyq, wtq = quantize_rows(x), quantize_rows(w), quantize_rows(dy), quantize_rows(w.transpose(1, 2))
        dyc, xc = quantize_cols_grouped(dy, offs), quantize_cols_grouped(x, offs)
        flops = 2 * M * N * K
        cases = {"fwd": (lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs),
                         lambda: fp8_grouped_gemm_rowwise(*xq, *wq, offs),
                         lambda: fp8_grouped_gemm_rowwise_reference(*xq, *wq, offs, torch.float32)),
                 "dgrad": (lambda: torch._grouped_mm(dy, w, offs=offs),
                           lambda: fp8_grouped_gemm_rowwise(*dyq, *wtq, offs),
                           lambda: fp8_grouped_gemm_rowwise_reference(*dyq, *wtq, offs, torch.float32)),
                 "wgrad": (lambda: torch._grouped_mm(dy.t(), x, offs=offs),
                           lambda: fp8_grouped_wgrad_rowwise(*dyc, *xc, offs),
                           lambda: fp8_grouped_wgrad_rowwise_reference(*dyc, *xc, offs, torch.float32)),
                 # what the training step pays for an FP8 weight gradient: both operands' group-column quantisers
                 # and the GEMM (the row above: the GEMM alone, operands quantised beforehand)
                 "wgrad with its quantisers": (
                     lambda: torch._grouped_mm(dy.t(), x, offs=offs),
                     lambda: fp8_grouped_wgrad_rowwise(*quantize_cols_grouped(dy, offs),
                                                       *quantize_cols_grouped(x, offs), offs),
                     lambda: fp8_grouped_wgrad_rowwise_reference(*dyc, *xc, offs, torch.float32))}
        for gemm, (bf16, fp8, ref) in cases.items():
            r = {"gemm": f"{name} {gemm}", "M": M, "N": N, "K": K, "err_vs_ref": rel(fp8(), ref())}
            r["bf16_tflops"] = flops / bench(bf16, dev) / 1e12
            r["fp8_tflops"] = flops / bench(fp8, dev) / 1e12
            r["speedup"] = r["fp8_tflops"] / r["bf16_tflops"]
            rows.append(r)
        copy_gbps = M * K * 4 / bench(lambda: x.clone(), dev) / 1e9
        for qname, fn, nbytes in (("quantize rows of X", lambda: quantize_rows(x), M * K * 3 + M * 4),
                                  ("quantize group columns of X", lambda: quantize_cols_grouped(x, offs),
                                   M * K * 3 + E * K * 4)):
            t = bench(fn, dev)
            rows.append({"gemm": f"{name} {qname}", "M": M, "K": K, "ms": t * 1e3, "GBps": nbytes / t / 1e9,
                         "of_copy": nbytes / t / 1e9 / copy_gbps})
        if dev == "cuda":       # launch shapes of the group-column quantiser (kernels/fp8_grouped_wgrad.py)
            from dsv3.kernels.fp8_grouped_wgrad import quantize_cols_grouped_triton
            # one_pass_m: groups of at most that many tokens read once, held in registers (0 = two reads); stages:
            # the two-pass loops' pipelining depth (cp.async through shared memory for 2 and up)
            for bm, bk, nw, one, st in ((64, 64, 4, 0, 1), (128, 64, 8, 0, 1), (64, 32, 4, 0, 1), (128, 32, 4, 0, 1),
                                        (64, 16, 8, 1024, 1), (64, 32, 8, 512, 1), (128, 32, 4, 0, 2),
                                        (128, 32, 4, 0, 3), (128, 32, 4, 0, 4), (64, 32, 4, 0, 3), (64, 64, 4, 0, 3),
                                        (128, 64, 8, 0, 3), (256, 32, 8, 0, 3), (64, 32, 2, 0, 4)):
                try:
                    t = bench(lambda: quantize_cols_grouped_triton(x, offs, bm, bk, nw, one_pass_m=one, stages=st),
                              dev)
                except Exception as e:  # noqa: BLE001 - a launch shape that does not compile (registers): say so
                    print(f"group columns sweep {bm} {bk} {nw} {one} {st}: failed ({type(e).__name__})", flush=True)
                    continue
                gbps = (M * K * 3 + E * K * 4) / t / 1e9
                rows.append({"gemm": f"{name} group columns sweep", "block_m": bm, "block_k": bk, "warps": nw,
                             "one_pass_m": one, "stages": st, "GBps": gbps, "of_copy": gbps / copy_gbps})
            # the looping grid (`programs` per SM x SMs): fewer strips in flight, so L2 keeps each between its reads
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            for bm, bk, nw, st, per_sm in ((128, 32, 4, 1, 2), (128, 32, 4, 1, 4), (128, 32, 4, 3, 2),
                                           (64, 32, 4, 3, 4), (128, 64, 8, 3, 1), (128, 64, 8, 3, 2)):
                t = bench(lambda: quantize_cols_grouped_triton(x, offs, bm, bk, nw, stages=st,
                                                               programs=per_sm * sms), dev)
                gbps = (M * K * 3 + E * K * 4) / t / 1e9
                rows.append({"gemm": f"{name} group columns sweep", "block_m": bm, "block_k": bk, "warps": nw,
                             "stages": st, "programs": per_sm * sms, "GBps": gbps, "of_copy": gbps / copy_gbps})
    return rows


def _torchao_mm():
    try:
        from torchao.prototype.moe_training.fp8_grouped_mm import _to_fp8_rowwise_then_scaled_grouped_mm
    except Exception as e:     # not installed / not importable with this torch
        return None, repr(e)[:200]
    return (lambda a, w, offs: _to_fp8_rowwise_then_scaled_grouped_mm(
        a, w.transpose(-2, -1), offs, pad_token_groups_for_grouped_mm=False)), None


def swiglu_ffn(D: int, I: int, counts: torch.Tensor, dev: str) -> dict:
    """Section 2: forward + backward of the expert FFN, FLOPs = 3 GEMMs x 3 (fwd, dgrad, wgrad) x 2 M N K."""
    counts = (counts + 15) // 16 * 16          # torchao's grouped MM wants 16-aligned groups
    offs = counts.cumsum(0).to(torch.int32)
    M, E = int(offs[-1]), counts.numel()
    x = torch.randn(M, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ws = [(torch.randn(E, n, k, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
          for n, k in ((I, D), (I, D), (D, I))]
    dy = torch.randn(M, D, device=dev, dtype=torch.bfloat16)

    def bf16_ffn(mm):
        def run():
            h = F.silu(mm(x, ws[0], offs)) * mm(x, ws[1], offs)
            mm(h, ws[2], offs).backward(dy)
        return run

    arms = {"bf16": bf16_ffn(lambda a, w, o: torch._grouped_mm(a, w.transpose(-2, -1), offs=o))}
    for recipe in ("row", "row-fp8-wgrad"):
        arms[f"dsv3 {recipe}"] = (lambda rc: lambda: FP8ExpertsFunction.apply(x, *ws, offs, rc).backward(dy))(recipe)
    mm, err = _torchao_mm()
    if mm is not None and dev == "cuda":
        arms["torchao rowwise"] = bf16_ffn(mm)
    res = {"M": M, "D": D, "I": I, **({"torchao_error": err} if err else {})}
    flops = 9 * 2 * M * D * I
    for name, fn in arms.items():
        try:
            res[f"{name}_tflops"] = flops / bench(fn, dev) / 1e12
        except Exception as e:
            res[f"{name}_error"] = repr(e)[:300]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, the reference paths")
    p.add_argument("--tokens", type=int, default=4 * 2048)
    a = p.parse_args()
    dev = "cpu" if a.dry_run else "cuda"
    widths, tokens, E = ([("tiny", 256, 128)], 64, 8) if a.dry_run else (WIDTHS, a.tokens, 64)
    torch.manual_seed(0)
    out = {"torch": torch.__version__, "per_gemm": [], "swiglu_ffn": []}
    for wname, D, I in widths:
        for imbalance in ("uniform", "skewed"):
            counts = routed_counts(E, tokens, 6, imbalance, dev)
            tag = {"width": wname, "routing": imbalance, "max_group": int(counts.max()), "min_group": int(counts.min())}
            for r in per_gemm(D, I, counts, dev):
                out["per_gemm"].append({**tag, **r})
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in {**tag, **r}.items()}, flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()
            r = {**tag, **swiglu_ffn(D, I, counts, dev)}
            out["swiglu_ffn"].append(r)
            print({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    path = Path(os.environ.get("OUT", "out"))
    path.mkdir(parents=True, exist_ok=True)
    (path / "fp8_grouped_bench.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
