"""Registers, spills and shared memory of the compiled MLA decode kernels (gather and TMA) at V3's 128 heads and
lite's 16: where a compute-bound decode kernel loses its tensor cores' time first. On a GPU:
    PYTHONPATH=src python benchmarks/mla_kernel_resources.py
Without one, `--offline` compiles the many-head bodies (TMA, Gluon, seesaw) for sm_90 on the CPU machine (Triton's own
ptxas; no driver needed) and reports shared memory, registers and spills; `--dump DIR` writes each body's TTGIR and
PTX, where the layouts and wgmma waits can be read (how the TMA body's duplicated Q K^T was found, RESULTS.md
twenty-fourth session). Registers from Triton's bundled ptxas may differ a little from the device's (the TMA body: 255
registers and 112 B of stack here, 243 and none on the H100):
    PYTHONPATH=src python benchmarks/mla_kernel_resources.py --offline [--dump out/mla_ir]
"""

from __future__ import annotations

import importlib

import torch

from dsv3.kernels import mla_decode_triton
from dsv3.kernels import mla_decode_tma as tma_mod


def offline(dump: str | None) -> None:
    """Compile the TMA and Gluon bodies at 128 heads for sm_90 without a GPU and print their resources."""
    from sm90_offline import compile_report
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    from dsv3.kernels import mla_decode_gluon as gluon_mod
    cache = torch.zeros(64 * 64, 576, dtype=torch.bfloat16)
    ptrs = dict(Q=cache, QPE=cache, CKV=cache, KPE=cache, BT=torch.zeros(1, dtype=torch.int32),
                SL=torch.zeros(1, dtype=torch.int32), OP=torch.zeros(1), LSE=torch.zeros(1), NEWC=cache, NEWK=cache,
                SLOT=torch.zeros(1, dtype=torch.int64), sm_scale_log2=0.5)
    bodies = []
    split_mod = importlib.import_module("dsv3.kernels.mla_decode")   # (the package exports a function of that name)
    # the gather ("split") kernel at lite's 16 heads, bf16, with the launches _default_config picks: batch 1, 2-8, 9+
    # the launch specialises pointers and strides divisible by 16 (the cache's are): without these hints ptxas reports
    # a 7 KB stack at (128, 4 warps, 3 stages) that the real launch does not have (none with them)
    fn = split_mod._mla_decode_split_kernel
    split_div16 = tuple(a for a in fn.arg_names if a.startswith("stride_") or a in ptrs and a != "sm_scale_log2")
    for B in (1, 4, 64):
        cfg = split_mod._default_config(16, 512, torch.bfloat16, B=B)
        for append in (False, True):
            const = dict(C=512, R=64, PAGE=64, BLOCK_C=512, BLOCK_R=64, BLOCK_H=cfg["block_h"],
                         BLOCK_N=cfg["block_n"], DOT_PREC="tf32", WRITE_LSE=True, APPEND=append, PDL=False)
            bodies.append((f"split 16 heads B={B} append={int(append)} ({cfg['block_n']}, {cfg['num_warps']} w, "
                           f"{cfg['num_stages']} st)", split_mod._mla_decode_split_kernel, ASTSource, {}, const,
                           dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]), split_div16))
    for bn, stages in ((64, 2),):
        from triton.tools.tensor_descriptor import TensorDescriptor
        descs = dict(ckv_desc=TensorDescriptor(cache, [4096, 512], [576, 1], [bn, 256]),
                     kpe_desc=TensorDescriptor(cache[:, :64].contiguous(), [4096, 64], [64, 1], [bn, 64]))
        const = dict(HALF=256, R=64, PAGE=64, BLOCK_H=64, BLOCK_N=bn, DOT_PREC="tf32", WRITE_LSE=True, APPEND=False,
                     WS=False, PDL=False)
        bodies.append((f"tma bn={bn} stages={stages}", tma_mod._mla_decode_tma_kernel, ASTSource, descs, const,
                       dict(num_warps=8, num_stages=stages), ()))
    if gluon_mod.HAS_GLUON:
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon._runtime import GluonASTSource
        for bn, stages in ((64, 2), (32, 4), (32, 3)):
            lay_c = gl.NVMMASharedLayout.get_default_for([bn, 256], gl.bfloat16)
            lay_k = gl.NVMMASharedLayout.get_default_for([bn, 64], gl.bfloat16)
            descs = dict(ckv_desc=gluon_mod.GluonDescriptor(cache, [4096, 512], [576, 1], [bn, 256], lay_c),
                         kpe_desc=gluon_mod.GluonDescriptor(cache[:, :64].contiguous(), [4096, 64], [64, 1],
                                                            [bn, 64], lay_k))
            const = dict(HALF=256, R=64, PAGE=64, BLOCK_H=64, BLOCK_N=bn, STAGES=stages, WRITE_LSE=True,
                         APPEND=False)
            bodies.append((f"gluon bn={bn} stages={stages}", gluon_mod._mla_decode_gluon_kernel, GluonASTSource,
                           descs, const, dict(num_warps=8), ()))
        from dsv3.kernels import mla_decode_seesaw as seesaw_mod
        lay_c = gl.NVMMASharedLayout.get_default_for([64, 256], gl.bfloat16)
        lay_k = gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16)
        descs = dict(ckv_desc=gluon_mod.GluonDescriptor(cache, [4096, 512], [576, 1], [64, 256], lay_c),
                     kpe_desc=gluon_mod.GluonDescriptor(cache[:, :64].contiguous(), [4096, 64], [64, 1], [64, 64],
                                                        lay_k))
        bodies.append(("seesaw (2 warpgroups)", seesaw_mod._mla_decode_seesaw_kernel,
                       GluonASTSource, descs, dict(PAGE=64), dict(num_warps=4), ()))
    for name, fn, source, descs, const, options, div16 in bodies:
        values = {**ptrs, **descs}
        sig = {a: "constexpr" if a in const else mangle_type(values[a]) if a in values else "i32"
               for a in fn.arg_names}
        compile_report(name, fn, sig, const, options, source=source, dump=dump, div16=div16)


def main() -> None:
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--offline", action="store_true", help="compile for sm_90 on this machine, no GPU needed")
    p.add_argument("--dump", default=None, help="with --offline: write each body's TTGIR and PTX here")
    args = p.parse_args()
    if args.offline:
        return offline(args.dump)
    gather_mod = importlib.import_module("dsv3.kernels.mla_decode")
    B, ctx, C, R, bs = 8, 2048, 512, 64, 64
    nb = B * ctx // bs
    ckv = torch.randn(nb, bs, C, device="cuda", dtype=torch.bfloat16)
    kpe = torch.randn(nb, bs, R, device="cuda", dtype=torch.bfloat16)
    bt = torch.randperm(nb, device="cuda", dtype=torch.int32).view(B, -1)
    lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
    for H, kw in ((128, dict(block_h=64, block_n=64, num_warps=8, num_stages=2)),
                  (16, dict(block_h=16, block_n=64, num_warps=4, num_stages=2))):
        q = torch.randn(B, H, C, device="cuda", dtype=torch.bfloat16)
        qpe = torch.randn(B, H, R, device="cuda", dtype=torch.bfloat16)
        for tma in (False, True):
            mla_decode_triton(q, qpe, ckv, kpe, bt, lens, 0.04, tma=tma, **kw)
    torch.cuda.synchronize()
    for name, fn in (("gather", gather_mod._mla_decode_split_kernel), ("tma", tma_mod._mla_decode_tma_kernel)):
        for caches in fn.device_caches.values():
            for k in caches[0].values():
                try:
                    k._init_handles()
                except Exception:  # noqa: BLE001 - older / newer triton: the attributes may already be set
                    pass
                md = k.metadata
                print(f"{name:6s} warps={md.num_warps} stages={md.num_stages} shared={md.shared} B "
                      f"regs={getattr(k, 'n_regs', '?')} spills={getattr(k, 'n_spills', '?')}")


if __name__ == "__main__":
    main()
