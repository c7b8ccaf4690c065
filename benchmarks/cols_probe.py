"""The group-column FP8 quantiser (issue 15, the expert wgrad's operands), lite gate/up X (49,152 x 2,048 bf16, 64
groups of 768): do_bench's median beside each kernel's own time from the profiler, so that host time and launches
around the kernel show. Thirtieth session, H100: 237.5 us by do_bench, 232.3 us the kernel (before the kernel
derived its group bounds itself, ten small torch ops a call made do_bench read ~400 us); the split form, since
removed, 308 us (85 + 214 us).
    PYTHONPATH=src python benchmarks/cols_probe.py
"""
import torch, triton.testing
from torch.profiler import profile, ProfilerActivity
from dsv3.kernels.fp8_grouped_wgrad import quantize_cols_grouped_triton
x = torch.randn(49152, 2048, device="cuda", dtype=torch.bfloat16)
offs = torch.arange(1, 65, device="cuda", dtype=torch.int32) * 768
for name, kw in (("default", {}), ("64 x 64, 4 warps", dict(block_m=64, block_k=64, num_warps=4)),
                 ("default, loops pipelined 3 deep", dict(stages=3))):
    f = lambda: quantize_cols_grouped_triton(x, offs, **kw)
    t = triton.testing.do_bench(f, warmup=10, rep=60, return_mode="median")
    f(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            f()
        torch.cuda.synchronize()
    ks = sorted(((e.key, e.device_time_total / e.count, e.count) for e in p.key_averages() if e.device_time_total > 0),
                key=lambda r: -r[1] * r[2])
    print(f"{name}: do_bench {t*1e3:.1f} us; kernels (us each, count): " +
          "; ".join(f"{k[:40]} {u:.1f} x{c}" for k, u, c in ks[:6]), flush=True)
