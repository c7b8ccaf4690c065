"""Row-wise scaled FP8 (dsv3.kernels.fp8_rowwise): the quantiser against float64 and E4M3's bound, its Triton kernel
against the reference under TRITON_INTERPRET=1 and bit for bit on CUDA, the grouped GEMM reference against a float64
einsum over a group mask, and torch._scaled_grouped_mm against the reference on an H100/H200."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import interpreter_cases
from test_kernels_fp8_quant import _compare, _compare_nonfinite, make_x

from dsv3.kernels.fp8_rowwise import (HAS_TRITON, fp8_grouped_gemm_rowwise, fp8_grouped_gemm_rowwise_reference,
                                      quantize_rows, quantize_rows_both, quantize_rows_both_reference,
                                      quantize_rows_reference, quantize_rows_transposed_triton, quantize_rows_triton)

E4M3 = torch.float8_e4m3fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_scales_and_round_trip(dtype):
    """Scales exactly amax / 448, each element within E4M3's rounding, 3-D and transposed inputs row by row."""
    x = make_x(37, 300, dtype, seed=3)
    q, s = quantize_rows_reference(x)
    assert q.dtype == E4M3 and s.shape == (37,) and s.dtype == torch.float32
    amax = x.double().abs().amax(1).clamp_min(1e-4)
    torch.testing.assert_close(s.double(), amax / 448, rtol=2 ** -23, atol=0)   # one fp32 division
    back = q.double() * s.double()[:, None]
    # each element within half an e4m3 step of its binade (2^-4 relative) or, below 2^-6 * scale, the subnormal step
    err = (back - x.double()).abs()
    bound = torch.maximum(x.double().abs() * 2 ** -4, s.double()[:, None] * 2 ** -10)
    assert bool((err <= bound).all())
    assert q.double().abs().amax(1)[amax > 1e-4].eq(448).all()             # the largest element maps to E4M3's max
    w = make_x(3 * 40, 50, dtype, seed=4).view(3, 40, 50).transpose(1, 2)   # (3, 50, 40), rows across memory
    q3, s3 = quantize_rows_reference(w)
    assert q3.shape == (3, 50, 40) and q3.is_contiguous() and s3.shape == (3, 50)
    for e in range(3):
        qe, se = quantize_rows_reference(w[e].contiguous())
        assert torch.equal(q3[e].view(torch.uint8), qe.view(torch.uint8)) and torch.equal(s3[e], se)


def _interpreter_cases() -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
    patch_interpreter_for_numpy2()
    wide = torch.zeros(9, 2500)
    wide[:, 100:2300] = make_x(9, 2200, seed=5)
    w3 = make_x(3 * 70, 130, seed=4).view(3, 70, 130)
    cases = {"37x200": make_x(37, 200, seed=1), "6x2100_bf16": make_x(6, 2100, torch.bfloat16, seed=2),
             "strided": wide[:, 100:2300], "empty": torch.zeros(0, 16), "3d": w3,
             "3d_transposed": w3.transpose(1, 2), "2d_transposed": make_x(90, 70, seed=6).t(),
             "5x4096_wide": make_x(5, 4096, seed=3)}     # K % 2048 == 0: one row x 2048 columns per step
    out = {name: _compare(quantize_rows_triton(x), quantize_rows_reference(x)) for name, x in cases.items()}
    # the transposing quantiser (rows of w^T), with both orientations: several (BN, BK) tiles per column strip
    # (the reverse-order cast pass), partial tiles on both edges, bf16 / fp16 / fp32
    w2 = make_x(90, 200, torch.bfloat16, seed=7)
    w16 = make_x(2 * 150, 70, torch.float16, seed=9).view(2, 150, 70)
    for name, w, bn, bk in (("t_3d", w3, 32, 16), ("t_2d_bf16", w2, None, None), ("t_3d_fp16", w16, 64, 32)):
        want = quantize_rows_reference(w.transpose(-1, -2))
        out[f"{name}_cols"] = _compare(quantize_rows_transposed_triton(w, block_n=bn, block_k=bk), want)
    # the looping grid (programs): 3 programs over w3's 27 strips (9 each), 4 over w16's 6 (uneven), and more
    # programs than strips
    for name, w, progs in (("t_3d_persist", w3, 3), ("t_3d_fp16_persist", w16, 4), ("t_3d_persist_wide", w3, 64)):
        want = quantize_rows_reference(w.transpose(-1, -2))
        out[f"{name}_cols"] = _compare(quantize_rows_transposed_triton(w, block_n=32, block_k=16, programs=progs),
                                       want)
    # the one-pass form: w3's strips (70 rows) held in registers (ONE_M 128); w16's (150 rows) past ONE_M 128: two
    want = quantize_rows_reference(w3.transpose(-1, -2))
    out["t_3d_one_pass_cols"] = _compare(quantize_rows_transposed_triton(w3, block_n=32, block_k=16, one_pass_m=128),
                                         want)
    want = quantize_rows_reference(w16.transpose(-1, -2))
    out["t_3d_fp16_two_pass_cols"] = _compare(
        quantize_rows_transposed_triton(w16, block_n=32, block_k=16, one_pass_m=128), want)
    got, want = quantize_rows_transposed_triton(w2, rows=True), quantize_rows_both_reference(w2)   # + the row kernel
    out["t_both_rows"], out["t_both_cols"] = _compare(got[:2], want[:2]), _compare(got[2:], want[2:])
    bad = make_x(40, 130, seed=8)
    bad[3, 5], bad[20, 7], bad[39, 0] = float("nan"), float("inf"), -float("inf")
    got, want = quantize_rows_transposed_triton(bad, rows=True), quantize_rows_both_reference(bad)
    out["t_nonfinite"] = _compare_nonfinite(got, want)
    got = quantize_rows_transposed_triton(bad, rows=True, block_k=32, one_pass_m=64)
    out["t_nonfinite_one_pass"] = _compare_nonfinite(got, want)
    out["t_empty"] = _compare(quantize_rows_transposed_triton(torch.zeros(0, 16)),
                              quantize_rows_reference(torch.zeros(16, 0)))
    return out


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (requirements-ci.txt pins it, so CI runs this)")
def test_triton_interpreter_matches_reference():
    res = interpreter_cases("test_kernels_fp8_rowwise")
    assert len(res) == 21
    for name, r in res.items():   # the interpreter's e4m3 conversion quirks are allowed (see _compare), nothing else
        if name.startswith("t_nonfinite"):  # NaN scales where the reference has them (q's NaNs: GPU test)
            assert r["nan_s_agree"] and r["scales_equal"] and r["bad"] == 0, r
            continue
        assert r["bad"] == 0 and r["nan"] == 0 and r["scale_err"] == 0, (name, r)


def test_both_orientations_reference_and_dispatch():
    """quantize_rows_both = rows of w and rows of w^T, exactly the row quantiser's; on the CPU the dispatchers
    (including a transposed view) are the reference."""
    w = make_x(3 * 40, 50, torch.bfloat16, seed=9).view(3, 40, 50)
    q, s, q_t, s_t = quantize_rows_both(w)
    for (a, sa), (b, sb) in (((q, s), quantize_rows_reference(w)),
                             ((q_t, s_t), quantize_rows_reference(w.transpose(1, 2))),
                             (quantize_rows(w.transpose(1, 2)), (q_t, s_t))):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) and torch.equal(sa, sb)
    assert q_t.shape == (3, 50, 40) and q_t.is_contiguous() and s_t.shape == (3, 50)


def _grouped_case(counts, N=48, K=64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts)
    a, a_s = quantize_rows_reference(torch.randn(int(counts.sum()), K, generator=g))
    w = torch.randn(len(counts), N, K, generator=g) * 0.05
    b, b_s = quantize_rows_reference(w.reshape(-1, K))
    offs = counts.cumsum(0).to(torch.int32)
    to = dict(device=device)
    return (a.to(**to), a_s.to(**to), b.view(len(counts), N, K).to(**to), b_s.view(len(counts), N).to(**to),
            offs.to(**to))


def test_grouped_reference_equals_float64_masked_einsum():
    a, a_s, b, b_s, offs = _grouped_case([5, 0, 40, 19])
    out = fp8_grouped_gemm_rowwise_reference(a, a_s, b, b_s, offs, out_dtype=torch.float32)
    A = a.double() * a_s.double()[:, None]
    B = b.double() * b_s.double()[..., None]
    group = torch.bucketize(torch.arange(a.shape[0]), offs.long(), right=True)    # each row's group
    want = torch.einsum("mk,mnk->mn", A, B[group])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert fp8_grouped_gemm_rowwise(a, a_s, b, b_s, offs, torch.float32).equal(out)   # the CPU dispatch
    with pytest.raises(ValueError, match="shapes disagree"):
        fp8_grouped_gemm_rowwise(a, a_s[:3], b, b_s, offs)


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")
def test_quantize_rows_bit_exact_on_cuda():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 conversion in Triton needs sm_89+")
    w3 = make_x(4 * 200, 300, seed=10).view(4, 200, 300)
    for x in (make_x(300, 2048, torch.bfloat16, seed=7), make_x(33, 1408, seed=8), make_x(5, 5000, seed=9),
              w3, w3.transpose(1, 2), make_x(130, 300, torch.bfloat16, seed=11).t()):
        q, s = quantize_rows(x.cuda())
        qr, sr = quantize_rows_reference(x.cuda())
        assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
    for w in (w3, make_x(8 * 1408, 2048, torch.bfloat16, seed=12).view(8, 1408, 2048), make_x(576, 2048, seed=13),
              make_x(4 * 2048, 1408, seed=15).view(4, 2048, 1408), make_x(3 * 1408, 2048, torch.float16, seed=16)):
        w = w.cuda()
        # last field: the two passes' pipelining depth (cp.async through shared memory for 2 and up)
        # the last: the looping grid's program count (None: one program a strip)
        for bn, bk, nw, one, st, pr in ((None, None, None, None, None, None), (64, 64, 4, 0, 1, None),
                                        (128, 64, 8, 0, 1, None), (256, 32, 8, 0, 1, None), (128, 16, 4, 0, 1, None),
                                        (64, 16, 8, 2048, 1, None), (64, 16, 16, 2048, 1, None),
                                        (64, 32, 16, 1024, 1, None), (None, None, None, 0, 2, None),
                                        (None, None, None, 0, 3, None), (64, 64, 4, 0, 4, None),
                                        (256, 32, 8, 0, 3, None), (None, None, None, None, None, 7),
                                        (64, 64, 4, 0, 3, 264)):
            got = quantize_rows_transposed_triton(w, rows=True, block_n=bn, block_k=bk, num_warps=nw,
                                                  one_pass_m=one, stages=st, programs=pr)
            want = quantize_rows_both_reference(w)
            for a, b in zip(got, want):
                assert torch.equal(a.view(torch.uint8) if a.dtype == E4M3 else a,
                                   b.view(torch.uint8) if b.dtype == E4M3 else b), (w.dtype, bn, bk, nw, one, st, pr)
    bad = make_x(300, 520, seed=14)
    bad[3, 5], bad[200, 7], bad[299, 0] = float("nan"), float("inf"), -float("inf")
    got, want = quantize_rows_both(bad.cuda()), quantize_rows_both_reference(bad.cuda())
    for a, b in zip(got, want):
        assert torch.equal(a.float().isnan(), b.float().isnan())
        assert torch.equal(a.float().nan_to_num(0), b.float().nan_to_num(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scaled_grouped_mm_matches_reference_on_cuda():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("torch._scaled_grouped_mm row-wise runs on sm_90")
    for counts in ([130, 0, 300, 7], [16, 32, 48, 64], [1, 1, 1, 509]):   # unaligned, aligned, tiny groups
        case = _grouped_case(counts, N=384, K=512, seed=len(counts), device="cuda")
        got = fp8_grouped_gemm_rowwise(*case, out_dtype=torch.float32)
        want = fp8_grouped_gemm_rowwise_reference(*case, out_dtype=torch.float32)
        # bf16 output (2^-9 relative rounding) after FP8 MMA accumulation without promotion
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 5e-3, (counts, rel)
