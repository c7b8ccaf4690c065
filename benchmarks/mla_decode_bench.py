"""Paged MLA decode kernel (dsv3.kernels.mla_decode_triton): bandwidth on GPU.

For each H in (16, 128), batch in (32, 64, 128) and context in (8K, 16K, 32K) tokens (C=512, R=64, bf16, block
size 64, every sequence `ctx` tokens long, blocks shuffled through the pool), times one decode call with
`triton.testing.do_bench` (median, L2 flushed between runs) and reports the achieved bandwidth
    GB/s = sum(seq_lens) * (C + R) * 2 bytes / time
against this GPU's copy bandwidth, measured in the same run (read + write bytes of a 1 GiB device copy: ~3.0 TB/s on an
H100, ~4.3 on an H200; the rows before the sixteenth session divided by the H200's 4.28 on every GPU), plus TFLOP/s
(2*H*(C+R) + 2*H*C flops per token per sequence). First it checks the kernel against the PyTorch reference at a smaller,
ragged size (H 16 and 128, splits forced and heuristic); `--sweep` then times a grid of block shapes / warps / stages
per H at B=64, ctx 16K and uses the fastest for the table (the defaults in mla_decode._default_config otherwise).

GPU (repo root; results also in $OUT/mla_decode_bench.json):
    PYTHONPATH=src python benchmarks/mla_decode_bench.py --sweep
CPU dry run (Triton interpreter, fp32, tiny shapes, wall-clock timing):
    PYTHONPATH=src python benchmarks/mla_decode_bench.py --interpret --tiny
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

COPY_BW = 4.28e12  # H200 device-to-device copy bandwidth, bytes/s: the interpreter's stand-in (GPU: measured)


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interpret", action="store_true", help="TRITON_INTERPRET=1 on CPU (fp32)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (for --interpret)")
    p.add_argument("--sweep", action="store_true", help="sweep launch configs per H first, use the best")
    p.add_argument("--graph-timing", action="store_true", help="time replays of a CUDA graph of the call")
    p.add_argument("--heads", type=int, nargs="+", default=[16, 128])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--sweep-stages", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--sweep-warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--sweep-block-h", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--sweep-block-n", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--sweep-tma", type=int, nargs="+", default=[0, 1],
                   help="1: also the TMA kernel (dsv3.kernels.mla_decode_tma; where it cannot run, the gather one)")
    p.add_argument("--sweep-each", action="store_true",
                   help="time the sweep's grid (gather kernel) at every (H, B, ctx) of the table beside its default "
                        "launch, and print the best per point (short decode contexts differ from 64 x 16K)")
    p.add_argument("--sweep-splits", type=int, nargs="+", default=[0],
                   help="with --sweep-each: split counts to try (0: the heuristic's)")
    p.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for mla_decode_bench.json")
    return p.parse_args()


ARGS = _parse()
if ARGS.interpret:  # must precede the @triton.jit decorators, i.e. the import of dsv3.kernels
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dsv3.kernels import mla_decode_bytes, mla_decode_reference, mla_decode_triton  # noqa: E402
from dsv3.infer.bench import copy_bandwidth  # noqa: E402


def _patch_interpreter_for_numpy2():
    from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
    patch_interpreter_for_numpy2()


def make_inputs(lens, H, C, R, bs, dtype, device, seed=0, extra_blocks=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    B = len(lens)
    need = [-(-n // bs) for n in lens]
    max_blocks = max(need)
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    bt = torch.zeros(B, max_blocks, dtype=torch.int32)
    i = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[i:i + n]
        i += n
    torch.manual_seed(seed)
    c_kv = torch.randn(num_blocks, bs, C, device=device, dtype=dtype)
    k_pe = torch.randn(num_blocks, bs, R, device=device, dtype=dtype)
    q_abs = torch.randn(B, H, C, device=device, dtype=dtype)
    q_pe = torch.randn(B, H, R, device=device, dtype=dtype)
    scale = 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2  # V3's softmax scale (mscale^2 / sqrt(192))
    return q_abs, q_pe, c_kv, k_pe, bt.to(device), torch.tensor(lens, dtype=torch.int32, device=device), scale


def bench(fn, interpret):
    if interpret:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing
    if ARGS.graph_timing:   # replays from a CUDA graph: no launch gaps (the L2 is not flushed)
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def sweep_point(inp, H, default_ms, nbytes, interpret):
    """--sweep-each: the gather kernel's grid (block_n x warps x stages x split counts, 16-row head blocks at 16
    heads) at one table point; prints the best beside the default launch and returns every timing."""
    timings, best = [], (default_ms, "default")
    grid = itertools.product(ARGS.sweep_block_n, ARGS.sweep_warps, ARGS.sweep_stages, ARGS.sweep_splits)
    if ARGS.tiny:
        grid = [(16, 4, 1, 0), (32, 4, 2, 0), (16, 4, 1, 2)]
    for bn, nw, ns, sp in grid:
        kw = dict(block_h=16 if H <= 16 else 64, block_n=bn, num_warps=nw, num_stages=ns, tma=False, gluon=False,
                  seesaw=False, num_splits=sp or None)
        try:
            ms = bench(lambda kw=kw: mla_decode_triton(*inp, **kw), interpret)
        except Exception as e:  # e.g. out of shared memory for this tile
            print(f"    {kw}: failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
            continue
        timings.append(dict(kw, ms=ms))
        if ms < best[0]:
            best = (ms, f"bn={bn} warps={nw} stages={ns} splits={sp or 'heuristic'}")
    print(f"    best of {len(timings)}: {best[0] * 1e3:.1f} us ({nbytes / (best[0] * 1e-3) / 1e9:.1f} GB/s), "
          f"{best[1]}; default {default_ms * 1e3:.1f} us: {default_ms / best[0]:.2f}x")
    return dict(timings=timings, best_ms=best[0], best=best[1])


def main():
    interpret = ARGS.interpret
    if interpret:
        _patch_interpreter_for_numpy2()
        device, dtype = "cpu", torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --interpret --tiny for a CPU dry run")
        device, dtype = "cuda", torch.bfloat16
    tiny = ARGS.tiny
    C, R, bs = (32, 16, 16) if tiny else (512, 64, 64)   # R >= 16: the TMA kernel's smallest rope tile
    heads = [4, 20] if tiny else ARGS.heads
    batches = [2, 3] if tiny else ARGS.batches
    contexts = [32, 48] if tiny else ARGS.contexts
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    result = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu (triton interpreter)",
                  dtype=str(dtype), C=C, R=R, block_size=bs, interpret=interpret, tiny=tiny)
    copy_bw = result["copy_bw"] = COPY_BW if interpret else copy_bandwidth("cuda")
    print(f"copy bandwidth: {copy_bw / 1e12:.2f} TB/s{' (stand-in)' if interpret else ''}")
    import triton
    result["triton"], result["torch"] = triton.__version__, torch.__version__

    # 1. correctness at a smaller, ragged size
    check_lens = [1, 16, 17, 40, 0] if tiny else [1, 64, 65, 1000, 2048, 4095, 0, 777]
    checks = []
    for H in heads:
        inp = make_inputs(check_lens, H, C, R, bs, dtype, device, seed=H)
        ref = mla_decode_reference(*inp).float()
        for ns, tma in itertools.product((None, 1, 5), sorted(set(ARGS.sweep_tma))):
            err = (mla_decode_triton(*inp, num_splits=ns, tma=bool(tma)).float() - ref).abs().max().item()
            checks.append(dict(H=H, num_splits=ns, tma=tma, max_abs_err=err))
            print(f"check H={H:4d} splits={str(ns):>4s} tma={tma}: max |triton - reference| = {err:.3e}")
            if not err <= tol:
                sys.exit(f"correctness check failed: {err} > {tol}")
    result["checks"] = checks

    # 2. optional sweep of launch configs per H
    best = {H: {} for H in heads}
    if ARGS.sweep:
        sweep = []
        sB, sctx = (2, 48) if tiny else (64, 16384)
        inp_kv = make_inputs([sctx] * sB, 16, C, R, bs, dtype, device, seed=1)
        for H in heads:
            q_abs = torch.randn(sB, H, C, device=device, dtype=dtype)
            q_pe = torch.randn(sB, H, R, device=device, dtype=dtype)
            inp = (q_abs, q_pe) + inp_kv[2:]
            nbytes = mla_decode_bytes(inp[5], C, R, dtype)
            bhs = [bh for bh in ARGS.sweep_block_h if bh <= max(16, H)]
            grid = itertools.product(bhs, ARGS.sweep_block_n, ARGS.sweep_warps, ARGS.sweep_stages, ARGS.sweep_tma)
            if tiny:
                grid = [(16, 16, 4, 1, 0), (16, 32, 4, 2, 0), (16, 16, 4, 1, 1)]
            best_ms = float("inf")
            for bh, bn, nw, ns, tma in grid:
                kw = dict(block_h=bh, block_n=bn, num_warps=nw, num_stages=ns, tma=bool(tma), gluon=False, seesaw=False)
                try:
                    ms = bench(lambda inp=inp, kw=kw: mla_decode_triton(*inp, **kw), interpret)
                except Exception as e:  # e.g. out of shared memory for this tile
                    print(f"sweep H={H} {kw}: failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                    continue
                gbs = nbytes / (ms * 1e-3) / 1e9
                sweep.append(dict(H=H, B=sB, ctx=sctx, **kw, ms=ms, GBps=gbs))
                print(f"sweep H={H:4d} bh={bh:3d} bn={bn:3d} warps={nw} stages={ns} tma={tma}: {ms * 1e3:9.1f} us "
                      f"{gbs:8.1f} GB/s")
                if ms < best_ms:
                    best_ms, best[H] = ms, kw
            print(f"best for H={H}: {best[H]}")
            ref = mla_decode_reference(*inp).float()
            err = (mla_decode_triton(*inp, **best[H]).float() - ref).abs().max().item()
            print(f"check H={H:4d} best config: max |triton - reference| = {err:.3e}")
            if not err <= tol:
                sys.exit(f"correctness check of {best[H]} failed: {err} > {tol}")
        result["sweep"] = sweep
        result["best"] = {str(k): v for k, v in best.items()}
        del inp_kv, inp

    # 3. the table
    rows = []
    print(f"\n{'H':>4s} {'B':>4s} {'ctx':>6s} {'splits':>6s} {'time us':>9s} {'GB/s':>8s} {'% copy':>7s} "
          f"{'TFLOP/s':>8s}")
    for B in batches:
        for ctx in contexts:
            kv = make_inputs([ctx] * B, 1, C, R, bs, dtype, device, seed=B + ctx)[2:]
            for H in heads:
                q_abs = torch.randn(B, H, C, device=device, dtype=dtype)
                q_pe = torch.randn(B, H, R, device=device, dtype=dtype)
                inp = (q_abs, q_pe) + kv
                ms = bench(lambda inp=inp, H=H: mla_decode_triton(*inp, **best[H]), interpret)
                nbytes = mla_decode_bytes(inp[5], C, R, dtype)
                flops = 2 * B * ctx * H * (2 * C + R)
                gbs = nbytes / (ms * 1e-3) / 1e9
                from dsv3.kernels.mla_decode import _default_config, _sm_count, mla_decode_num_splits
                cfg = {**_default_config(H, C, dtype, B), **best[H]}
                splits = mla_decode_num_splits(B, H, kv[2].shape[1] * bs, cfg["block_h"], cfg["block_n"],
                                               _sm_count(q_abs.device), cfg.get("min_tokens_per_split", 256))[0]
                row = dict(H=H, B=B, ctx=ctx, splits=splits, config=cfg, ms=ms, bytes=nbytes, GBps=gbs,
                           frac_copy_bw=gbs * 1e9 / copy_bw, TFLOPs=flops / (ms * 1e-3) / 1e12)
                rows.append(row)
                print(f"{H:4d} {B:4d} {ctx:6d} {splits:6d} {ms * 1e3:9.1f} {gbs:8.1f} "
                      f"{100 * row['frac_copy_bw']:6.1f}% {row['TFLOPs']:8.1f}")
                if ARGS.sweep_each:
                    row["sweep"] = sweep_point(inp, H, ms, nbytes, interpret)
            del kv, inp
            if device == "cuda":
                torch.cuda.empty_cache()
    result["rows"] = rows
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mla_decode_bench.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'mla_decode_bench.json'}")


if __name__ == "__main__":
    main()
