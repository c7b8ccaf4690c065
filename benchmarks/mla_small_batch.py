"""The many-head MLA decode bodies at small batches and short contexts (where a default chosen at B = 64 x 8K-32K
could lose: the seesaw body always writes partials and runs the combine). One line per (B, ctx, body), with the
append form (the engine's) timed beside the plain one, both as CUDA-graph replays:
    PYTHONPATH=src python benchmarks/mla_small_batch.py [--bodies seesaw,gluon-bn64-s2,tma]
"""

from __future__ import annotations

import argparse

import triton.testing as tt
from mla_gluon_probe import BODIES, ragged

from dsv3.kernels import mla_decode_triton


def bench(fn) -> float:
    """Median us of replays of a CUDA graph of fn (the engine's form: no host launch time, which at these sizes
    is most of a plain launch's, RESULTS.md twenty-sixth session)."""
    fn()
    return tt.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bodies", default="seesaw,gluon-bn64-s2,tma")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    args = p.parse_args()
    for B in args.batches:
        for ctx in args.contexts:
            q, qpe, ckv, kpe, bt, lens, scale = ragged([ctx] * B, 128, seed=B + ctx, nan_tail=False)
            slots = (bt[:, (ctx - 1) // 64].long() * 64 + (ctx - 1) % 64).contiguous()
            new_c, new_k = ckv.view(-1, 512)[slots].clone(), kpe.view(-1, 64)[slots].clone()
            line = []
            for name in args.bodies.split(","):
                kw = BODIES[name]
                us = bench(lambda: mla_decode_triton(q, qpe, ckv, kpe, bt, lens, scale, **kw))
                us_a = bench(lambda: mla_decode_triton(q, qpe, ckv, kpe, bt, lens, scale, **kw,
                                                         append=(slots, new_c, new_k)))
                line.append(f"{name} {us:7.1f} / {us_a:7.1f}")
            print(f"B={B:3d} ctx={ctx:5d} H=128 (plain / append us): " + "  ".join(line), flush=True)


if __name__ == "__main__":
    main()
