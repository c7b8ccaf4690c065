"""FP8 weight gradients of the routed experts (dsv3.kernels.fp8_grouped_wgrad): the per-group column quantiser's
scales and padded layout, its Triton kernel against the reference under TRITON_INTERPRET=1 and bit for bit on CUDA,
the weight-gradient reference against float64 per-expert GEMMs, and torch._scaled_grouped_mm's 2-D x 2-D form
against the reference on an H100/H200."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import interpreter_cases
from test_kernels_fp8_quant import _compare, _compare_nonfinite, make_x

from dsv3.kernels.fp8_grouped_wgrad import (ALIGN, HAS_TRITON, fp8_grouped_wgrad_rowwise,
                                            fp8_grouped_wgrad_rowwise_reference, padded_groups, padded_tokens,
                                            quantize_cols_grouped, quantize_cols_grouped_reference,
                                            quantize_cols_grouped_triton)

E4M3 = torch.float8_e4m3fn


def _offs(counts: list[int], device: str = "cpu") -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(device=device, dtype=torch.int32)


def test_padded_groups_align_every_group_and_end_at_m_pad():
    counts = [5, 0, 40, 16, 1]
    starts, p_starts, p_ends = padded_groups(_offs(counts), padded_tokens(62, 5))
    assert starts.tolist() == [0, 5, 5, 45, 61]
    # every group >= 16 wide (an empty one too: 16 zeros, so the GEMM writes its exact 0)
    assert p_starts.tolist() == [0, 16, 32, 80, 96] and p_ends.tolist() == [16, 32, 80, 96, 144]
    assert padded_tokens(62, 5) == 144 and padded_tokens(0, 3) == 48 and padded_tokens(64, 1) == 80
    assert all(p % ALIGN == 0 for p in p_starts.tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_scales_per_group_and_column_layout_and_padding(dtype):
    """scale[e, k] = amax of column k over group e's tokens / 448; q_t's columns hold each group's tokens from its
    aligned start, within E4M3's rounding of x / scale; zeros elsewhere; an empty group gets EPS / 448."""
    counts = [7, 0, 33, 17]
    x = make_x(sum(counts), 70, dtype, seed=1)
    offs = _offs(counts)
    q_t, s = quantize_cols_grouped_reference(x, offs)
    assert q_t.shape == (70, padded_tokens(57, 4)) and q_t.dtype == E4M3 and s.shape == (4, 70)
    _, p_starts, p_ends = padded_groups(offs, q_t.shape[1])
    used = torch.zeros(q_t.shape[1], dtype=torch.bool)
    for e, (a, b) in enumerate(zip([0] + offs.tolist(), offs.tolist())):
        amax = x[a:b].double().abs().amax(0).clamp_min(1e-4) if b > a else torch.full((70,), 1e-4, dtype=torch.float64)
        torch.testing.assert_close(s[e].double(), amax / 448, rtol=2 ** -23, atol=0)
        p = int(p_starts[e])
        back = q_t[:, p:p + b - a].double().t() * s[e].double()
        err = (back - x[a:b].double()).abs()
        assert bool((err <= torch.maximum(x[a:b].double().abs() * 2 ** -4, s[e].double() * 2 ** -10)).all())
        used[p:p + b - a] = True
    assert q_t[:, ~used].float().abs().max() == 0


def test_reference_from_row_wise_codes_equals_quantising_their_fp32_values():
    """row_scale: x given as quantize_rows' E4M3 codes and scales (a saved FP8 activation) gives exactly what the
    dequantised fp32 values give; bad shapes are refused."""
    from dsv3.kernels.fp8_rowwise import quantize_rows_reference
    counts = [7, 0, 33, 17]
    q, s = quantize_rows_reference(make_x(57, 70, seed=2))
    got = quantize_cols_grouped(q, _offs(counts), s)
    want = quantize_cols_grouped_reference(q.float() * s[:, None], _offs(counts))
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="row_scale"):
        quantize_cols_grouped(q, _offs(counts), s[:5])


def _grouped_wgrad_case(counts, N=48, K=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = sum(counts)
    dy = torch.randn(M, N, generator=g, dtype=torch.float64)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    bounds = [0] + torch.tensor(counts).cumsum(0).tolist()
    want = torch.stack([dy[a:b].t() @ x[a:b] for a, b in zip(bounds, bounds[1:])])
    return dy, x, _offs(counts), want


def test_wgrad_reference_equals_float64_on_the_codes_and_is_near_the_unquantised_gemm():
    """dW[e] = dequant(dY_e)^T dequant(X_e): equal to the float64 GEMM of the dequantised codes (the scales factor
    out of the token sum, per group and column), within E4M3's error of the unquantised GEMM (< 5%, > 0.1%: the
    FP8 path is taken), zero for an expert without tokens; the CPU dispatch is the reference."""
    counts = [50, 0, 140, 19, 3]
    dy, x, offs, want = _grouped_wgrad_case(counts)
    a, b = quantize_cols_grouped(dy.float(), offs), quantize_cols_grouped(x.float(), offs)
    got = fp8_grouped_wgrad_rowwise(*a, *b, offs, torch.float32)
    assert got.shape == (5, 48, 64) and got.dtype == torch.float32
    _, p_starts, p_ends = padded_groups(offs, a[0].shape[1])
    for e, (p, q) in enumerate(zip(p_starts.tolist(), p_ends.tolist())):
        A = a[0][:, p:q].double() * a[1][e].double()[:, None]
        B = b[0][:, p:q].double() * b[1][e].double()[:, None]
        torch.testing.assert_close(got[e].double(), A @ B.t(), rtol=1e-5, atol=1e-4)
    for e in (0, 2, 3):
        rel = ((got[e].double() - want[e]).norm() / want[e].norm()).item()
        assert 1e-3 < rel < 0.05, (e, rel)
    assert got[1].abs().max() == 0
    assert got.equal(fp8_grouped_wgrad_rowwise_reference(*a, *b, offs, torch.float32))
    with pytest.raises(ValueError, match="shapes disagree"):
        fp8_grouped_wgrad_rowwise(a[0], a[1][:3], *b, offs)


def _interpreter_cases() -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
    patch_interpreter_for_numpy2()
    wide = torch.zeros(80, 300)
    wide[:, 50:250] = make_x(80, 200, seed=5)
    cases = {"unaligned": (make_x(62, 70, seed=1), [5, 0, 40, 16, 1], None),
             "bf16_several_tiles": (make_x(300, 130, torch.bfloat16, seed=2), [150, 3, 0, 147], None),
             "strided": (wide[:, 50:250], [17, 63], None),
             "empty_last": (make_x(33, 40, torch.float16, seed=3), [33, 0], (16, 32, 4)),
             "one_group": (make_x(20, 16, seed=4), [20], (16, 16, 2))}
    out = {}
    for name, (x, counts, launch) in cases.items():
        bm, bk, nw = launch or (None, None, None)
        got = quantize_cols_grouped_triton(x, _offs(counts), block_m=bm, block_k=bk, num_warps=nw)
        out[name] = _compare(got, quantize_cols_grouped_reference(x, _offs(counts)))
    # the looping grid: 3 programs over unaligned's 5 x 3 strips (uneven), 5 over bf16_several_tiles' 4 x 9, and
    # more programs than strips
    for name, progs in (("unaligned", 3), ("bf16_several_tiles", 5), ("empty_last", 64)):
        x, counts = cases[name][:2]
        got = quantize_cols_grouped_triton(x, _offs(counts), block_m=16, block_k=16, num_warps=2, programs=progs)
        out[f"{name}_persist"] = _compare(got, quantize_cols_grouped_reference(x, _offs(counts)))
    # the one-pass form: groups of <= 64 tokens in registers, the longer ones (150, 147) in two passes, the last
    # group's slack past the register tile as zeros
    x, counts = cases["bf16_several_tiles"][:2]
    got = quantize_cols_grouped_triton(x, _offs(counts), block_m=16, block_k=16, num_warps=2, one_pass_m=64)
    out["one_pass_mixed"] = _compare(got, quantize_cols_grouped_reference(x, _offs(counts)))
    x, counts = cases["unaligned"][:2]
    got = quantize_cols_grouped_triton(x, _offs(counts), block_m=16, block_k=32, num_warps=2, one_pass_m=16)
    out["one_pass_slack"] = _compare(got, quantize_cols_grouped_reference(x, _offs(counts)))
    # padded_groups in one launch against its torch form: empty groups first, last and between, one group, int64
    from dsv3.kernels.fp8_grouped_wgrad import padded_groups_reference, padded_groups_triton
    for counts in ([5, 0, 40, 16, 1], [0, 0, 3], [20], [0, 17, 0, 0, 33, 16, 0], [7] * 9):
        for offs in (_offs(counts), _offs(counts).long()):
            m_pad = padded_tokens(sum(counts), len(counts))
            got, want = padded_groups_triton(offs, m_pad), padded_groups_reference(offs, m_pad)
            out[f"padded_groups_{counts}_{offs.dtype}"] = dict(
                bad=sum(int(not torch.equal(g, w)) for g, w in zip(got, want)), nan=0, scale_err=0)
    # int64 group ends (the kernel reads them itself and derives the padded bounds: _group_bounds)
    x, counts = cases["unaligned"][:2]
    out["int64_offs"] = _compare(quantize_cols_grouped_triton(x, _offs(counts).long()),
                                 quantize_cols_grouped_reference(x, _offs(counts)))
    from dsv3.kernels.fp8_rowwise import quantize_rows_reference
    q, rs = quantize_rows_reference(make_x(150, 96, torch.bfloat16, seed=6))
    out["row_scaled_codes"] = _compare(quantize_cols_grouped_triton(q, _offs([60, 0, 90]), row_scale=rs),
                                       quantize_cols_grouped_reference(q, _offs([60, 0, 90]), rs))
    bad = make_x(40, 130, seed=8)
    bad[3, 5], bad[20, 7], bad[39, 0] = float("nan"), float("inf"), -float("inf")
    out["nonfinite"] = _compare_nonfinite(quantize_cols_grouped_triton(bad, _offs([10, 30])),
                                          quantize_cols_grouped_reference(bad, _offs([10, 30])))
    out["nonfinite_one_pass"] = _compare_nonfinite(
        quantize_cols_grouped_triton(bad, _offs([10, 30]), block_k=64, one_pass_m=32),
        quantize_cols_grouped_reference(bad, _offs([10, 30])))
    return out


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (requirements-ci.txt pins it, so CI runs this)")
def test_triton_interpreter_matches_reference():
    res = interpreter_cases("test_kernels_fp8_grouped_wgrad")
    assert len(res) == 24
    for name, r in res.items():   # the interpreter's e4m3 conversion quirks are allowed (see _compare), nothing else
        if name.startswith("nonfinite"):
            assert r["nan_s_agree"] and r["scales_equal"] and r["bad"] == 0, r
            continue
        assert r["bad"] == 0 and r["nan"] == 0 and r["scale_err"] == 0, (name, r)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")
def test_quantize_cols_grouped_bit_exact_on_cuda():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 conversion in Triton needs sm_89+")
    g = torch.Generator().manual_seed(0)
    zipf = (1.0 / torch.arange(1, 65)) / (1.0 / torch.arange(1, 65)).sum()
    skewed = (zipf * 4096).round().long().tolist()
    for x, counts in ((make_x(62, 70, seed=1), [5, 0, 40, 16, 1]),
                      (make_x(sum(skewed), 2048, torch.bfloat16, seed=2), skewed),
                      (make_x(64 * 48, 1408, torch.bfloat16, seed=3), [48] * 64),
                      (torch.randn(3000, 576, generator=g), [1000, 0, 2000])):
        offs = _offs(counts, "cuda")
        m_pad = padded_tokens(sum(counts), len(counts))
        from dsv3.kernels.fp8_grouped_wgrad import padded_groups_reference
        assert all(torch.equal(g.cpu(), w) for g, w in zip(padded_groups(offs, m_pad),
                                                           padded_groups_reference(offs.cpu(), m_pad)))
        # the last field: the two-pass loops' pipelining depth (cp.async through shared memory for 2 and up)
        for launch in ((None, None, None), (32, 64, 4), (128, 32, 8), (64, 16, 8, None, 1024), (64, 32, 16, None, 512),
                       (None, None, None, None, None, 2), (None, None, None, None, None, 3), (64, 64, 4, None, 0, 4),
                       (64, 32, 4, None, 512, 3), (None, None, None, None, None, None, 7),
                       (128, 32, 4, None, None, 3, 264)):   # the looping grid (programs): uneven, and 2 a SM
            q, s = quantize_cols_grouped_triton(x.cuda(), offs, *launch)
            qr, sr = quantize_cols_grouped_reference(x.cuda(), offs)
            assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr), (counts[:4], launch)
        from dsv3.kernels.fp8_rowwise import quantize_rows
        xq, xs = quantize_rows(x.cuda())                     # the saved FP8 activation, requantised per column
        qr, sr = quantize_cols_grouped_reference(xq, offs, xs)
        for stages in (None, 3):
            q, s = quantize_cols_grouped_triton(xq, offs, row_scale=xs, stages=stages)
            assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr), (counts[:4], stages)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scaled_grouped_mm_wgrad_matches_reference_on_cuda():
    """The 2-D x 2-D _scaled_grouped_mm over the padded token groups against the fp32 reference on the same codes:
    bf16 output (2^-9) after FP8 accumulation without promotion; unaligned, aligned, tiny and empty groups."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("torch._scaled_grouped_mm row-wise runs on sm_90")
    for counts in ([130, 0, 300, 7], [16, 32, 48, 64], [1, 1, 1, 509], [0, 0, 200, 0]):
        dy, x, offs, _ = _grouped_wgrad_case(counts, N=384, K=512, seed=len(counts))
        offs = offs.cuda()
        a = quantize_cols_grouped(dy.to("cuda", torch.bfloat16), offs)
        b = quantize_cols_grouped(x.to("cuda", torch.bfloat16), offs)
        got = fp8_grouped_wgrad_rowwise(*a, *b, offs, torch.float32)
        want = fp8_grouped_wgrad_rowwise_reference(*a, *b, offs, torch.float32)
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 5e-3, (counts, rel)
        assert all(got[e].abs().max() == 0 for e, c in enumerate(counts) if c == 0)
