"""Compile Triton / Gluon kernels for sm_90 on a machine without a GPU (Triton's own ptxas and cuobjdump) and report
what decides a kernel's speed before it ever runs: registers, spills, shared memory, and how its global loads and
stores were vectorised. `compile_report` is shared with `mla_kernel_resources.py --offline`; run as a script it
reports the FP8 quantisers with the specialisation a launch on lite's shapes gets (stride 1 as a constant, pointers,
sizes and strides divisible by 16), which is how the group-column quantiser's one-byte transposed stores were found
(RESULTS.md, twenty-fifth session):
    PYTHONPATH=src python benchmarks/sm90_offline.py [--dump DIR]
Registers from the bundled ptxas may differ a little from the device's (RESULTS.md, twenty-fourth session).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess


def compile_report(name: str, fn, signature: dict, constexprs: dict, options: dict, *, div16: tuple = (),
                   source=None, dump: str | None = None):
    """Compile fn for sm_90 and print one line: shared memory, registers, stack (spills), and the PTX's global
    loads / stores by width. div16: argument names the launch specialises as divisible by 16. Returns the
    compiled kernel (its .asm holds ttgir / ptx / cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16}
    src = (source or ASTSource)(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    tag = re.sub(r"\W+", "_", name)
    out = dump or "/tmp"
    os.makedirs(out, exist_ok=True)
    for ext in ("ttgir", "ptx") if dump else ():
        with open(os.path.join(out, f"{tag}.{ext}"), "w") as f:
            f.write(k.asm[ext])
    cubin = os.path.join(out, f"{tag}.cubin")
    with open(cubin, "wb") as f:
        f.write(k.asm["cubin"])
    cuobjdump = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))[0]
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    ptx = k.asm["ptx"]
    ld = {w: len(re.findall(rf"ld\.global(?:\.\w+)*\.v{w}\b", ptx)) for w in (2, 4)}
    st = {w: len(re.findall(rf"st\.global(?:\.\w+)*\.v{w}\b", ptx)) for w in (2, 4)}
    print(f"{name:36s} shared={k.metadata.shared:6d} B regs={regs.group(1) if regs else '?':>3} "
          f"stack (spills)={stack.group(1) if stack else '?'} B  global ld {ptx.count('ld.global')} "
          f"(v4 {ld[4]}, v2 {ld[2]}), st {ptx.count('st.global')} (v4 {st[4]}, v2 {st[2]})", flush=True)
    return k


def quantisers(dump: str | None) -> None:
    """The FP8 quantisers at their default launch shapes (and the group-column sweep's best), as launched on
    lite's expert weights (64, 1408, 2048) and token-sorted activations: stride 1 constant, the rest 16-divisible."""
    from dsv3.kernels import fp8_grouped_wgrad as gw
    from dsv3.kernels import fp8_quant as fq
    from dsv3.kernels import fp8_rowwise as fr

    types = dict(X="*bf16", W="*bf16", RS="*fp32", Q="*fp8e4nv", QT="*fp8e4nv", S="*fp32", ST="*fp32",
                 STARTS="*i32", PSTARTS="*i32", PENDS="*i32", OFFS="*i32")

    def run(name, fn, const, warps, div16):
        sig = {a: "constexpr" if a in const else types.get(a, "i32") for a in fn.arg_names}
        compile_report(name, fn, sig, const, dict(num_warps=warps), div16=div16, dump=dump)

    for bm, bk, w, st in ((gw._BLOCK_M, gw._BLOCK_K, gw._WARPS, gw._STAGES), (64, 64, 4, 1), (128, 32, 4, 3)):
        run(f"group columns {bm} x {bk}, {w} w, {st} st", gw._cols_grouped_kernel,
            dict(HAS_RS=False, BM=bm, BK=bk, ONE_M=0, E_P2=64, STAGES=st, PERSIST=False, stride_xk=1), w,
            ("X", "QT", "S", "K", "M_PAD", "stride_xm"))
    run("padded groups (64 experts)", gw._padded_groups_kernel, dict(E_P2=64), 4, ())
    for st, persist in ((fr._T_STAGES, False), (3, False), (fr._T_STAGES, True)):
        run(f"W^T rows {fr._T_BLOCK_N} x {fr._T_BLOCK_K}, {st} st{', looping grid' if persist else ''}",
            fr._rows_t_kernel, dict(BN=fr._T_BLOCK_N, BK=fr._T_BLOCK_K, ONE_M=0, STAGES=st, PERSIST=persist,
                                    stride_xk=1), fr._T_WARPS, ("X", "QT", "ST", "N", "K", "stride_xe", "stride_xn"))
    run("rows 1 x 2048", fr._rows_kernel, dict(ROWS=1, CHUNK=2048, stride_xk=1), 4,
        ("X", "Q", "S", "M", "K", "stride_xb", "stride_xm"))
    run("rows 4 x 256 (K = 1408)", fr._rows_kernel, dict(ROWS=4, CHUNK=256, stride_xk=1), 4,
        ("X", "Q", "S", "M", "K", "stride_xb", "stride_xm"))
    run("tiles 1 x 128", fq._tiles_kernel, dict(BLOCK_M=fq._BLOCK_M, TILE_K=128, POW2=False, stride_xk=1), 4,
        ("X", "Q", "S", "M", "K", "stride_xm", "stride_qm"))
    run("tiles of x^T", fq._tiles_t_kernel, dict(BLOCK_K=fq._BLOCK_K, TILE_M=128, POW2=False, stride_xk=1),
        fq._TILES_T_WARPS, ("X", "QT", "ST", "M", "K", "stride_xm", "stride_qk"))
    run("blocks 128 x 128", fq._blocks_kernel, dict(TILE_B=128, CHUNK=fq._BLOCKS_CHUNK, POW2=False, stride_wk=1), 4,
        ("W", "Q", "S", "N", "K", "stride_wn", "stride_qn"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dump", default=None, help="write each kernel's TTGIR and PTX here")
    quantisers(p.parse_args().dump)


if __name__ == "__main__":
    main()
