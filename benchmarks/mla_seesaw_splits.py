"""The seesaw MLA decode body's KV split count at V3's 128 heads (issue 16): every count from 1 to 8 beside the
default (`mla_decode_num_splits(one_wave=True)`, the rule fitted on this script's H100 rows in the thirty-second
session; before it, programs for ~2 waves over the SMs), timed as CUDA-graph replays, over batch and
context. Why: on an H100 (thirtieth session, RESULTS.md) the default was within 2% of the best at B = 64 from 8K
up but 10-14% slower at 64 x 4K, 16 x 4K and 32 x 8K, where one wave of programs won; these rows are for fitting a
rule that holds everywhere. Checks each count against the reference first (one ragged batch with NaN tails).
    PYTHONPATH=src:benchmarks python benchmarks/mla_seesaw_splits.py [--batches 8 16 32 64 128] [--contexts ...]
"""
import argparse
import json
import os

import torch
from mla_gluon_probe import ragged
from mla_small_batch import bench

from dsv3.kernels import mla_decode_reference, mla_decode_triton
from dsv3.kernels.mla_decode import mla_decode_num_splits


def _time(B: int, ctx: int, splits: list[int], sms: int) -> tuple[int, float, dict]:
    """(the default's split count, its us, {split count: us}) at B sequences of ctx tokens, 128 heads."""
    c = ragged([ctx] * B, 128, seed=2, nan_tail=False)
    default_s, _ = mla_decode_num_splits(B, 128, c[4].shape[1] * c[2].shape[1], 64, 64, sms, one_wave=True)
    t = {s: bench(lambda: mla_decode_triton(*c, num_splits=s)) for s in splits}
    return default_s, bench(lambda: mla_decode_triton(*c)), t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8])
    p.add_argument("--long", action="store_true", help="also B = 64 x 32K")
    args = p.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    case = ragged([1, 64, 65, 1000, 2048, 3001, 0, 127], 128, seed=1)
    ref = mla_decode_reference(*case).float()
    err = max((mla_decode_triton(*case, num_splits=s).float() - ref).abs().max().item() for s in args.splits)
    print(f"check: max err over splits {args.splits} = {err:.2e} ({torch.cuda.get_device_name()}, {sms} SMs)",
          flush=True)
    if not err < 2e-2:       # bf16 output: the O session's check read 3.9e-3
        raise SystemExit(f"a split count disagrees with the reference: {err}")
    shapes = [(B, ctx) for ctx in args.contexts for B in args.batches] + ([(64, 32768)] if args.long else [])
    rows = []
    for B, ctx in shapes:
        default_s, t_def, t = _time(B, ctx, args.splits, sms)
        best = min(t, key=t.get)
        rows.append(dict(B=B, ctx=ctx, default_splits=default_s, default_us=t_def, us=t, best=best,
                         programs_best=2 * B * best))
        print(f"B={B:4d} ctx={ctx:6d} default S={default_s} {t_def:8.1f} us | " +
              " ".join(f"S={s}:{u:8.1f}" for s, u in t.items()) +
              f" | best S={best} ({2 * B * best} programs, {t_def / t[best]:.3f}x the default)", flush=True)
        torch.cuda.empty_cache()
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "mla_seesaw_splits.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), sms=sms, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
