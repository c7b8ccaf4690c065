"""The group-column FP8 quantiser (issue 15, the expert wgrad's operands), looped vs split form, lite gate/up X
(49,152 x 2,048 bf16, 64 groups of 768): do_bench's median beside each kernel's own time from the profiler. Why: on
an H100 (twenty-ninth session) ncu timed the split form's two kernels at 84.9 + 219.4 us, while the sweep's do_bench
read ~690 us for the whole call (the looped form: ~400 us); this says which side holds the difference.
    PYTHONPATH=src python benchmarks/cols_split_probe.py
"""
import torch, triton.testing
from torch.profiler import profile, ProfilerActivity
from dsv3.kernels.fp8_grouped_wgrad import quantize_cols_grouped_triton
x = torch.randn(49152, 2048, device="cuda", dtype=torch.bfloat16)
offs = torch.arange(1, 65, device="cuda", dtype=torch.int32) * 768
for name, kw in (("looped", {}), ("split", dict(split=True)), ("split-c64", dict(split=(256, 64, 8, 64, 64, 4)))):
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
