"""The Gluon MLA decode body (`dsv3.kernels.mla_decode_gluon`) against the TMA body at V3's 128 heads: first every
config's correctness against the PyTorch reference on ragged lengths (0, 1, page edges, long; NaN written past the
ends inside the last pages; 1, default and 7 splits; the append form against store-then-attend, which the seesaw
body hands to the TMA body), then times at
B = 64 x 8K / 16K / 32K and B = 128 x 8K (bf16, C = 512, R = 64, pages of 64). A config that fails its check or
does not compile is reported and not timed. GPU only (sm_90):
    PYTHONPATH=src python benchmarks/mla_gluon_probe.py [--quick] [--sharing] [--bodies tma,seesaw]
    ncu --clock-control none -k regex:mla_decode --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        python benchmarks/mla_gluon_probe.py --launch gluon-bn64-s2       (gpu_next.sh L)
"""

from __future__ import annotations

import argparse

import torch
import triton.testing as tt

from dsv3.kernels import mla_decode_reference, mla_decode_triton

# each body named with the ones tried before it switched off (the default tries seesaw, then Gluon, then TMA)
_G = dict(gluon=True, seesaw=False)
BODIES = {"tma": dict(tma=True, gluon=False, seesaw=False), "gluon-bn64-s2": dict(_G, block_n=64, num_stages=2),
          "gluon-bn32-s4": dict(_G, block_n=32, num_stages=4), "gluon-bn32-s3": dict(_G, block_n=32, num_stages=3),
          "seesaw": dict(seesaw=True, block_n=64)}
PEAK = {"H100": 989e12, "H200": 989e12}   # dense bf16 tensor peak of the SXM parts


def ragged(lens, H, seed, nan_tail=True):
    g = torch.Generator(device="cpu").manual_seed(seed)
    C, R, bs = 512, 64, 64
    B = len(lens)
    per = [max(1, -(-n // bs)) for n in lens]
    nb = sum(per) + 3
    ckv = torch.randn(nb, bs, C, generator=g).to("cuda", torch.bfloat16)
    kpe = torch.randn(nb, bs, R, generator=g).to("cuda", torch.bfloat16)
    perm = torch.randperm(nb, generator=g)
    bt = torch.full((B, max(per)), -7, dtype=torch.int32)
    k = 0
    for b, p in enumerate(per):
        bt[b, :p] = perm[k:k + p].to(torch.int32)
        k += p
    bt = bt.cuda()
    if nan_tail:
        for b, n in enumerate(lens):
            if n % bs:
                ckv[int(bt[b, (n - 1) // bs]), n % bs:] = float("nan")
    q = torch.randn(B, H, C, generator=g).to("cuda", torch.bfloat16)
    qpe = torch.randn(B, H, R, generator=g).to("cuda", torch.bfloat16)
    return q, qpe, ckv, kpe, bt, torch.tensor(lens, dtype=torch.int32, device="cuda"), 0.04


def check(name: str, kw: dict) -> float:
    worst = 0.0
    for H in (64, 128):
        case = ragged([1, 64, 65, 1000, 2048, 3001, 0, 127], H, seed=H)
        ref = mla_decode_reference(*case).float()
        for ns in (None, 1, 7):
            out = mla_decode_triton(*case, num_splits=ns, **kw).float()
            worst = max(worst, (out - ref).abs().max().item())
        # append: this step's latents at each row's last position
        q, qpe, ckv, kpe, bt, lens, scale = ragged([1, 64, 65, 1000, 0, 129], H, seed=H + 1, nan_tail=False)
        pos = (lens - 1).clamp(min=0).long()
        slots = bt.long().gather(1, (pos // 64)[:, None]).squeeze(1).clamp(min=0) * 64 + pos % 64
        new_c = torch.randn(len(lens), 512, device="cuda", dtype=torch.bfloat16)
        new_k = torch.randn(len(lens), 64, device="cuda", dtype=torch.bfloat16)
        c_ref, k_ref = ckv.clone(), kpe.clone()
        want = mla_decode_reference(q, qpe, c_ref, k_ref, bt, lens, scale, append=(slots, new_c, new_k)).float()
        got = mla_decode_triton(q, qpe, ckv, kpe, bt, lens, scale, append=(slots, new_c, new_k), num_splits=3,
                                **kw).float()
        stored = max((ckv.float() - c_ref.float()).abs().max().item(), (kpe.float() - k_ref.float()).abs().max().item())
        worst = max(worst, (got - want).abs().max().item(), stored)
    print(f"check {name:14s}: max |err| {worst:.3e}", flush=True)
    return worst


def timing_inputs(B: int, ctx: int, H: int = 128) -> tuple:
    C, R = 512, 64
    nb = B * ctx // 64
    ckv = torch.randn(nb, 64, C, device="cuda", dtype=torch.bfloat16)
    kpe = torch.randn(nb, 64, R, device="cuda", dtype=torch.bfloat16)
    bt = torch.randperm(nb, device="cuda", dtype=torch.int32).view(B, -1)
    lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(B, H, C, device="cuda", dtype=torch.bfloat16)
    qpe = torch.randn(B, H, R, device="cuda", dtype=torch.bfloat16)
    return (q, qpe, ckv, kpe, bt, lens), 2 * B * ctx * H * (2 * C + R)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one shape (B = 64 x 16K)")
    p.add_argument("--bodies", default=",".join(BODIES), help="comma-separated subset of " + ", ".join(BODIES))
    p.add_argument("--sharing", action="store_true",
                   help="add B = 128 x 16K at 64 heads: the same CTAs and FLOPs as 64 x 16K at 128 heads with no "
                        "second head group to share each tile through L2 (twice the bytes from HBM): equal times "
                        "say the body is not bandwidth-bound, a slower one that the two head groups share reads")
    p.add_argument("--launch", metavar="BODY", help="no checks, no timing: three launches of BODY at B = 64 x 16K, "
                   "128 heads, for a profiler (ncu --launch-skip 2 --launch-count 1 -k regex:mla_decode)")
    args = p.parse_args()
    if args.launch:
        a, _ = timing_inputs(64, 16384)
        for _ in range(3):
            mla_decode_triton(*a, 0.04, **BODIES[args.launch])
        torch.cuda.synchronize()
        return
    from dsv3.kernels.mla_decode_gluon import HAS_GLUON
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK.items() if k in name), 989e12)
    print(f"{name}, capability {torch.cuda.get_device_capability()}, gluon {HAS_GLUON}", flush=True)
    shapes = [(64, 16384, 128)] if args.quick else [(64, 8192, 128), (64, 16384, 128), (64, 32768, 128),
                                                     (128, 8192, 128)]
    if args.sharing:
        shapes = [(64, 16384, 128), (128, 16384, 64)]
    inputs = {shape: timing_inputs(*shape) for shape in shapes}
    # one body at a time, checked then timed: a body that hangs (a new kernel's barrier) costs only its own rows
    for body in args.bodies.split(","):
        kw = BODIES[body]
        try:
            if not check(body, kw) <= 2e-2:
                print(f"  {body}: wrong, not timed", flush=True)
                continue
        except Exception as e:  # noqa: BLE001 - a config that does not compile or launch: say why, go on
            print(f"check {body:14s}: failed ({type(e).__name__}: {str(e)[:400]})", flush=True)
            continue
        for (B, ctx, H), (a, flops) in inputs.items():
            ms = tt.do_bench(lambda kw=kw, a=a: mla_decode_triton(*a, 0.04, **kw))
            tf = flops / ms / 1e9
            gbs = B * ctx * (512 + 64) * 2 / ms / 1e6    # each token's latents once
            print(f"B={B:4d} ctx={ctx:6d} H={H:3d} {body:14s}: {ms * 1e3:9.1f} us {tf:7.1f} TFLOP/s "
                  f"{100 * tf * 1e12 / peak:5.1f}% of bf16 peak, {gbs:6.0f} GB/s of unique latents", flush=True)


if __name__ == "__main__":
    main()
