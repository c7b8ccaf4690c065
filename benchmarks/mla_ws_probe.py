"""Warp specialisation (Triton's `tl.range(..., warp_specialize=True)`) on the TMA MLA decode kernel at V3's 128
heads, B = 64 x 16K (bf16, C = 512, R = 64, pages of 64): times with and without, 2 and 3 stages, each checked
against the PyTorch reference on four rows first. A config that does not compile says why. GPU only:
    PYTHONPATH=src python benchmarks/mla_ws_probe.py
"""

from __future__ import annotations

import torch
import triton.testing as tt

from dsv3.kernels import mla_decode_reference, mla_decode_triton


def main() -> None:
    B, ctx, C, R, bs, H = 64, 16384, 512, 64, 64, 128
    nb = B * ctx // bs
    ckv = torch.randn(nb, bs, C, device="cuda", dtype=torch.bfloat16)
    kpe = torch.randn(nb, bs, R, device="cuda", dtype=torch.bfloat16)
    bt = torch.randperm(nb, device="cuda", dtype=torch.int32).view(B, -1)
    lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(B, H, C, device="cuda", dtype=torch.bfloat16)
    qpe = torch.randn(B, H, R, device="cuda", dtype=torch.bfloat16)
    small = (q[:4], qpe[:4], ckv, kpe, bt[:4], lens[:4], 0.04)
    ref = mla_decode_reference(*small).float()
    flops = 2 * B * ctx * H * (2 * C + R)
    for ws in (False, True):
        for stages in (2, 3):
            kw = dict(tma=True, gluon=False, seesaw=False, warp_specialize=ws, num_stages=stages)
            try:
                err = (mla_decode_triton(*small, **kw).float() - ref).abs().max().item()
                ms = tt.do_bench(lambda kw=kw: mla_decode_triton(q, qpe, ckv, kpe, bt, lens, 0.04, **kw))
                print(f"warp_specialize={ws} stages={stages}: {ms * 1e3:8.1f} us  {flops / ms / 1e9:6.1f} TFLOP/s  "
                      f"max |err| {err:.2e}", flush=True)
            except Exception as e:  # noqa: BLE001 - a config that does not compile: say why, go on
                print(f"warp_specialize={ws} stages={stages}: failed ({type(e).__name__}: {str(e)[:300]})",
                      flush=True)


if __name__ == "__main__":
    main()
