"""Registers, spills and shared memory of the compiled MLA decode kernels (gather and TMA) at V3's 128 heads and
lite's 16: where a compute-bound decode kernel loses its tensor cores' time first. GPU only:
    PYTHONPATH=src python benchmarks/mla_kernel_resources.py
"""

from __future__ import annotations

import importlib

import torch

from dsv3.kernels import mla_decode_triton
from dsv3.kernels import mla_decode_tma as tma_mod


def main() -> None:
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
