"""FP8 x FP8 GEMMs (1x128 / 128x128 scaling): the references against float64, the recipe's accuracy against the
unquantised GEMM, the Triton kernels against the references under TRITON_INTERPRET=1 (fp32 output, small shapes,
in a subprocess: the interpreter must be on before the @triton.jit decorators run), the torch._scaled_mm operand
layouts against torch's own meta checks, and on CUDA everything in bf16 at V3-like shapes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import interpreter_cases

from dsv3.kernels.fp8_gemm import (_V2, HAS_TRITON, _scaled_mm_operands, fp8_gemm, fp8_gemm_reference,
                                   fp8_gemm_scaled_mm, fp8_gemm_triton, fp8_grouped_gemm, fp8_grouped_gemm_reference,
                                   fp8_grouped_gemm_triton)

FP8 = torch.float8_e4m3fn


def cdiv(a, b):
    return -(-a // b)


def quantize(x, rows):
    """Own torch quantiser (independent of dsv3.kernels.fp8_quant): one scale per `rows` x 128 group of x (R, K)
    (rows=1: 1x128 tiles, 128: 128x128 blocks), scale = amax / 448; returns e4m3 q and fp32 scales."""
    R, K = x.shape
    kb, rb = cdiv(K, 128), cdiv(R, rows)
    xp = F.pad(x.float(), (0, kb * 128 - K, 0, rb * rows - R)).view(rb, rows, kb, 128)
    s = xp.abs().amax((1, 3)).clamp_min(1e-30) / 448
    q = (xp / s[:, None, :, None]).clamp(-448, 448).to(FP8).view(rb * rows, kb * 128)[:R, :K]
    return q.contiguous(), s


def make_operand(R, K, rows, g):
    """Random (R, K) operand whose scale groups differ in magnitude by up to 2^8, so that a scale applied to the
    wrong group (or not at all) shows."""
    mag = 2.0 ** (torch.rand(cdiv(R, rows), cdiv(K, 128), generator=g) * 8 - 4)
    x = torch.randn(R, K, generator=g) * mag.repeat_interleave(rows, 0)[:R].repeat_interleave(128, 1)[:, :K]
    return quantize(x, rows)


def make_dense(M, N, K, b_rows=128, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    a, sa = make_operand(M, K, 1, g)
    b, sb = make_operand(N, K, b_rows, g)
    return tuple(t.to(device) for t in (a, sa, b, sb))


def make_grouped(counts, M, N, K, seed=0, device="cpu"):
    """Rows sorted by group, counts[e] rows for group e, M >= sum(counts) (the rest belong to no group)."""
    g = torch.Generator().manual_seed(seed)
    a, sa = make_operand(M, K, 1, g)
    pairs = [make_operand(N, K, 128, g) for _ in counts]
    b = torch.stack([p[0] for p in pairs]) if counts else torch.empty(0, N, K, dtype=FP8)
    sb = torch.stack([p[1] for p in pairs]) if counts else torch.empty(0, cdiv(N, 128), cdiv(K, 128))
    offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
    return tuple(t.to(device) for t in (a, sa, b, sb, offs))


def dequant64(q, s, rows):
    """float64 dequantisation through index maps (not the module's repeat_interleave)."""
    R, K = q.shape
    return q.double() * s.double()[torch.arange(R) // rows][:, torch.arange(K) // 128]


def oracle(a, sa, b, sb):
    rows = 128 if sb.shape[0] != b.shape[0] or b.shape[0] == 1 else 1
    return dequant64(a.cpu(), sa.cpu(), 1) @ dequant64(b.cpu(), sb.cpu(), rows).T


def oracle_grouped(a, sa, b, sb, offs):
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = oracle(a[start:end], sa[start:end], b[e], sb[e])
        start = end
    return out


def assert_close_scaled(out, ref, tol):
    """|out - ref| <= tol * (|ref| + max |ref|): relative to the output's scale (sums cancel)."""
    assert out.shape == ref.shape
    if ref.numel():
        scale = ref.double().abs().max().item()
        torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), atol=tol * scale, rtol=tol)


def assert_within_fp8_accumulation(out, a, sa, b, sb, tol=2.0 ** -12):
    """Against the float64 oracle, with the error bound of FP8 tensor cores: Hopper's FP8 MMA keeps ~14 bits of its
    running sum (TR 3.3.2), so each 128-long partial sum may be off by ~2^-14 of the sum of its |products|, however
    exact the fp32 promotion after it. Hence |out - exact| <= tol * sum_k |a_k b_k| (dequantised, float64), with an
    8x margin at tol = 2^-12 (measured on the H200: ~2^-16); a wrong or dropped scale is off by O(1) of that sum."""
    rows = 128 if sb.shape[0] != b.shape[0] or b.shape[0] == 1 else 1
    da, db = dequant64(a.cpu(), sa.cpu(), 1), dequant64(b.cpu(), sb.cpu(), rows)
    exact, bound = da @ db.T, tol * (da.abs() @ db.abs().T)
    err = (out.double().cpu() - exact).abs()
    assert (err <= bound).all(), (err / bound.clamp_min(1e-300)).max().item()


TOLS = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("out_dtype", list(TOLS))
@pytest.mark.parametrize("b_rows", [128, 1], ids=["block", "tile"])
@pytest.mark.parametrize("N,K", [(200, 257), (136, 300), (128, 128)])
@pytest.mark.parametrize("M", [0, 1, 37, 128, 200])
def test_reference_matches_float64(M, N, K, b_rows, out_dtype):
    a, sa, b, sb = make_dense(M, N, K, b_rows, seed=M + N + K)
    out = fp8_gemm_reference(a, sa, b, sb, out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    assert_close_scaled(out, oracle(a, sa, b, sb), TOLS[out_dtype])


def test_scales_are_not_trivial():
    """The data must be able to catch a dropped, misplaced or misread scale."""
    a, sa, b, sb = make_dense(40, 300, 260, seed=1)
    ref = oracle(a, sa, b, sb)
    wrong = [a.double() @ b.double().T, oracle(a, sa, b, sb.flip(0)), oracle(a, sa.flip(1), b, sb),
             dequant64(a, sa, 1) @ dequant64(b, sb.repeat_interleave(128, 0)[:300].flip(0), 1).T]
    for w in wrong:
        assert (w - ref).abs().max() > 0.1 * ref.abs().max()


@pytest.mark.parametrize("b_rows", [128, 1], ids=["block", "tile"])
def test_recipe_accuracy_random_normal(b_rows):
    """Documents the recipe: for N(0, 1) operands the FP8 GEMM is within 4% (relative Frobenius) of the fp64 GEMM of
    the unquantised operands (e4m3's 3-bit mantissa: ~3.7% measured); above 2% shows quantisation really happened."""
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(256, 1000, generator=g), torch.randn(384, 1000, generator=g)
    exact = x.double() @ w.double().T
    for out_dtype in (torch.float32, torch.bfloat16):
        out = fp8_gemm_reference(*quantize(x, 1), *quantize(w, b_rows), out_dtype).double()
        err = ((out - exact).norm() / exact.norm()).item()
        assert 0.02 < err < 0.04, (out_dtype, err)


def test_recipe_accuracy_with_outliers():
    """Rows spread over 1e-3..1e3 plus outlier channels: per-tile scales keep every row's relative error < 6%
    (~4.5% measured), while one scale for the whole activation flushes the small rows (error ~100%)."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(256, 1000, generator=g) * 10 ** (torch.rand(256, 1, generator=g) * 6 - 3)
    x[:, :4] *= 50
    w = torch.randn(384, 1000, generator=g)
    exact = x.double() @ w.double().T
    b, sb = quantize(w, 128)
    fine = fp8_gemm_reference(*quantize(x, 1), b, sb, torch.float32).double()
    s = x.abs().max() / 448
    coarse = ((x / s).to(FP8).double() * s) @ dequant64(b, sb, 128).T

    def row_err(out):
        return ((out - exact).norm(dim=1) / exact.norm(dim=1)).max().item()

    assert row_err(fine) < 0.06 and row_err(coarse) > 0.5, (row_err(fine), row_err(coarse))


@pytest.mark.parametrize("out_dtype", list(TOLS))
def test_grouped_reference_matches_float64(out_dtype):
    counts = [3, 0, 1, 17, 0, 2]  # empty groups, a one-row group; 4 rows past offs[-1]
    a, sa, b, sb, offs = make_grouped(counts, 27, 136, 200, seed=2)
    out = fp8_grouped_gemm_reference(a, sa, b, sb, offs, out_dtype)
    assert out.dtype == out_dtype and out.shape == (27, 136)
    assert (out[23:] == 0).all()
    assert_close_scaled(out, oracle_grouped(a, sa, b, sb, offs), TOLS[out_dtype])


@pytest.mark.parametrize("bad", [[3, 2, 5], [-1, 2, 4], [1, 2, 30]])
def test_grouped_reference_rejects_bad_offs(bad):
    a, sa, b, sb, _ = make_grouped([1, 1, 1], 10, 64, 64, seed=3)
    with pytest.raises(ValueError):
        fp8_grouped_gemm_reference(a, sa, b, sb, torch.tensor(bad, dtype=torch.int32))


def _bad_dense_inputs():
    a, sa, b, sb = make_dense(4, 200, 300, seed=4)
    return {
        "a_bf16": (a.to(torch.bfloat16), sa, b, sb),
        "a_e5m2": (a.to(torch.float8_e5m2), sa, b, sb),
        "a_1d": (a[0], sa, b, sb),
        "b_bf16": (a, sa, b.to(torch.bfloat16), sb),
        "b_3d": (a, sa, b[None], sb),
        "k_mismatch": (a[:, :299].contiguous(), sa, b, sb),
        "a_scale_shape": (a, sa[:, :2], b, sb),
        "a_scale_bf16": (a, sa.to(torch.bfloat16), b, sb),
        "a_scale_transposed": (a, sa.T.contiguous(), b, sb),
        "b_scale_shape": (a, sa, b, sb[:, :2]),
        "b_scale_transposed": (a, sa, b, sb.T.contiguous()),
        "b_scale_fp64": (a, sa, b, sb.double()),
        "b_scale_int": (a, sa, b, sb.int()),
        "device": (a, sa.to("meta"), b, sb),
        "out_dtype": (a, sa, b, sb, torch.float8_e4m3fn),
        "out_dtype_int": (a, sa, b, sb, torch.int32),
    }


def _bad_grouped_inputs():
    a, sa, b, sb, offs = make_grouped([2, 3], 6, 200, 150, seed=5)
    return {
        "b_2d": (a, sa, b[0], sb[0], offs),
        "b_scale_e": (a, sa, b, sb[:1], offs),
        "b_scale_tiles": (a, sa, b, torch.ones(2, 200, 2), offs),  # grouped takes 128x128 blocks only
        "offs_len": (a, sa, b, sb, offs[:1]),
        "offs_float": (a, sa, b, sb, offs.float()),
        "offs_2d": (a, sa, b, sb, offs[None]),
        "k_mismatch": (a[:, :100].contiguous(), sa[:, :1], b, sb, offs),
        "a_scale_rows": (a, sa[:5], b, sb, offs),
    }


DENSE_FNS = [fp8_gemm_reference, fp8_gemm, fp8_gemm_scaled_mm] + ([fp8_gemm_triton] if HAS_TRITON else [])
GROUPED_FNS = [fp8_grouped_gemm_reference, fp8_grouped_gemm] + ([fp8_grouped_gemm_triton] if HAS_TRITON else [])


@pytest.mark.parametrize("name", list(_bad_dense_inputs()))
@pytest.mark.parametrize("fn", DENSE_FNS, ids=lambda f: f.__name__)
def test_dense_input_checks(fn, name):
    with pytest.raises(ValueError):
        fn(*_bad_dense_inputs()[name])


@pytest.mark.parametrize("name", list(_bad_grouped_inputs()))
@pytest.mark.parametrize("fn", GROUPED_FNS, ids=lambda f: f.__name__)
def test_grouped_input_checks(fn, name):
    with pytest.raises(ValueError):
        fn(*_bad_grouped_inputs()[name])


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: nothing to check")
@pytest.mark.parametrize("kw", [dict(block_n=512), dict(block_m=24), dict(block_m=8)])
def test_triton_rejects_bad_blocks(kw):
    with pytest.raises(ValueError):
        fp8_gemm_triton(*make_dense(3, 64, 64, seed=10), torch.float32, **kw)


def test_dispatchers_on_cpu_are_reference(monkeypatch):
    a, sa, b, sb = make_dense(7, 140, 300, seed=6)
    assert torch.equal(fp8_gemm(a, sa, b, sb), fp8_gemm_reference(a, sa, b, sb))
    a, sa, b, sb, offs = make_grouped([2, 0, 5], 9, 64, 130, seed=7)
    assert torch.equal(fp8_grouped_gemm(a, sa, b, sb, offs, torch.float32),
                       fp8_grouped_gemm_reference(a, sa, b, sb, offs, torch.float32))
    monkeypatch.setenv("DSV3_FP8_GEMM", "scaled_mm")  # forced: must not fall back silently
    with pytest.raises(RuntimeError, match="CUDA"):
        fp8_gemm(*make_dense(16, 128, 128, seed=8))
    monkeypatch.setenv("DSV3_FP8_GEMM", "cublas")
    with pytest.raises(ValueError, match="DSV3_FP8_GEMM"):
        fp8_gemm(*make_dense(16, 128, 128, seed=8))


# ---------------------------------------------------------------------------------------------------------------
# torch._scaled_mm: layouts checked on the CPU against torch's meta registrations (they mirror ScaledBlas.cpp)
# ---------------------------------------------------------------------------------------------------------------

def test_scaled_mm_raises_off_gpu():
    with pytest.raises(RuntimeError, match="CUDA"):
        fp8_gemm_scaled_mm(*make_dense(16, 256, 256, seed=9))


def _meta(t):
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


@pytest.mark.skipif(not _V2, reason="this torch has no F.scaled_mm / ScalingType")
@pytest.mark.parametrize("b_rows", [128, 1], ids=["block", "tile"])
@pytest.mark.parametrize("M,K", [(1, 384), (37, 512), (128, 128), (20, 1152)])  # K/128 = 3, 4, 1, 9
def test_scaled_mm_operands_layout(M, K, b_rows):
    N = 256
    a, sa, b, sb = make_dense(M, N, K, b_rows, seed=M + K)
    mat_a, mat_b, scale_a, scale_b = _scaled_mm_operands(a, sa, b, sb, b_rows, v2=True)
    Mp, kb = cdiv(M, 16) * 16, K // 128
    # contents: the same numbers, zero padding
    assert mat_a.shape == (Mp, K) and torch.equal(mat_a[:M].view(torch.uint8), a.view(torch.uint8))
    assert (mat_a[M:].view(torch.uint8) == 0).all()
    assert torch.equal(scale_a[:M], sa) and scale_a.stride() == (1, Mp)
    assert torch.equal(mat_b.T.view(torch.uint8), b.view(torch.uint8)) and mat_b.stride() == (1, K)
    if b_rows == 128:
        L4 = cdiv(kb, 4) * 4
        assert scale_b.shape == (L4, N // 128) and scale_b.stride() == (1, L4) and torch.equal(scale_b[:kb].T, sb)
    else:
        assert scale_b.shape == (N, kb) and scale_b.stride() == (1, N) and torch.equal(scale_b, sb)
    # torch's own checks (meta tensors default to the CUDA rules) accept them ...
    st = F.ScalingType
    recipe_b = st.BlockWise128x128 if b_rows == 128 else st.BlockWise1x128
    out = F.scaled_mm(_meta(mat_a), _meta(mat_b), _meta(scale_a), st.BlockWise1x128, _meta(scale_b), recipe_b,
                      output_dtype=torch.bfloat16)
    assert out.shape == (Mp, N)
    # ... and reject a K-major ("natural") 1x128 scale_a when it has more than one K block: the check is live
    if kb > 1:
        with pytest.raises(RuntimeError):
            F.scaled_mm(_meta(mat_a), _meta(mat_b), _meta(scale_a.contiguous()), st.BlockWise1x128,
                        _meta(scale_b), recipe_b, output_dtype=torch.bfloat16)


@pytest.mark.skipif(not _V2, reason="this torch has no F.scaled_mm / ScalingType")
def test_scaled_mm_operands_need_no_copy_when_aligned():
    """M a multiple of 16, K of 512 (K/128 a multiple of 4), N of 128: the operands go to cuBLASLt as they are (the
    same storage), a K-block-major scale_a too; a row-major one costs one transposing copy, no zero-fill."""
    a, sa, b, sb = make_dense(32, 256, 512, seed=21)
    sa_k = sa.T.contiguous().T                     # what a quantiser writing K-block-major scales would hand over
    mat_a, mat_b, scale_a, scale_b = _scaled_mm_operands(a, sa_k, b, sb, 128, v2=True)
    assert mat_a.data_ptr() == a.data_ptr() and mat_b.data_ptr() == b.data_ptr()
    assert scale_a.data_ptr() == sa_k.data_ptr() and scale_b.data_ptr() == sb.data_ptr()
    assert scale_a.stride() == (1, 32) and scale_b.stride() == (1, 4) and torch.equal(scale_b.T, sb)
    scale_a = _scaled_mm_operands(a, sa, b, sb, 128, v2=True)[2]
    assert torch.equal(scale_a, sa) and scale_a.stride() == (1, 32)
    a, sa, b, sb = make_dense(32, 256, 512, b_rows=1, seed=21)
    scale_b = _scaled_mm_operands(a, sa, b, sb, 1, v2=True)[3]
    assert torch.equal(scale_b, sb) and scale_b.stride() == (1, 256)


def test_scaled_mm_v1_operands():
    """Without F.scaled_mm: torch._scaled_mm infers the recipe from shapes/strides; 128x128 scales are unpadded
    there, so (K/128) % 4 != 0 is refused rather than computed wrong."""
    a, sa, b, sb = make_dense(5, 256, 512, seed=13)
    _, _, scale_a, scale_b = _scaled_mm_operands(a, sa, b, sb, 128, v2=False)
    assert scale_a.shape == (16, 4) and scale_a.stride() == (1, 16)
    assert scale_b.shape == (4, 2) and scale_b.stride() == (1, 4) and torch.equal(scale_b.T, sb)
    a, sa, b, sb = make_dense(5, 256, 512, b_rows=1, seed=13)
    _, _, _, scale_b = _scaled_mm_operands(a, sa, b, sb, 1, v2=False)
    assert scale_b.shape == (4, 256) and scale_b.stride() == (256, 1) and torch.equal(scale_b.T, sb)
    with pytest.raises(ValueError, match="% 4"):
        _scaled_mm_operands(*make_dense(5, 256, 384, seed=13), 128, v2=False)


# ---------------------------------------------------------------------------------------------------------------
# Triton under the interpreter (subprocess)
# ---------------------------------------------------------------------------------------------------------------

def _rel(out, ref) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    if ref.numel() == 0:
        return 0.0
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _interpreter_cases() -> dict:
    """Run in a TRITON_INTERPRET=1 subprocess: max |triton - reference| / max |reference| per case (fp32 output:
    the interpreter's casts to bf16 are not faithful; its fp8 tl.dot is)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
    patch_interpreter_for_numpy2()
    f32 = torch.float32
    errs = {}
    for name, (M, N, K, rows, kw) in {
            "m1_n200_k300_tile": (1, 200, 300, 1, {}),
            "m37_n136_k257_block": (37, 136, 257, 128, {}),  # partial last K slice, N edge inside a scale block
            "m37_n136_k257_tile": (37, 136, 257, 1, dict(block_m=16, block_n=32)),
            "m128_n128_k128_block": (128, 128, 128, 128, {}),  # the default 128x128 tile, no edges
            "m20_n300_k130_bn256_block": (20, 300, 130, 128, dict(block_m=16, block_n=256)),  # 2 blocks per tile
            "m150_n48_swizzle_block": (150, 48, 128, 128, dict(block_m=16, block_n=16)),  # 10 row tiles > GROUP_M
            "m0": (0, 64, 200, 128, {}),
            "k0": (5, 64, 0, 128, {})}.items():
        a, sa, b, sb = make_dense(M, N, K, rows, seed=M + N + K)
        errs[name] = _rel(fp8_gemm_triton(a, sa, b, sb, f32, **kw), fp8_gemm_reference(a, sa, b, sb, f32))
    a, sa, b, sb = make_dense(5, 72, 300, seed=8)
    wide = torch.zeros(5, 320, dtype=torch.uint8)
    wide[:, 10:310] = a.view(torch.uint8)  # a as a strided view (row stride 320)
    errs["strided_a"] = _rel(fp8_gemm_triton(wide.view(FP8)[:, 10:310], sa, b, sb, f32),
                             fp8_gemm_reference(a, sa, b, sb, f32))
    for name, (counts, M, kw) in {"mixed": ([3, 0, 1, 17, 0, 2], 27, {}),
                                  "mixed_bm32_bn128": ([3, 0, 1, 17, 0, 2], 27, dict(block_m=32, block_n=128)),
                                  "one_group": ([20], 20, {}), "all_empty": ([0, 0, 0], 5, {}),
                                  "m0": ([0, 0], 0, {})}.items():
        a, sa, b, sb, offs = make_grouped(counts, M, 136, 200, seed=9)
        out = fp8_grouped_gemm_triton(a, sa, b, sb, offs, f32, **kw)
        errs["grouped_" + name] = _rel(out, fp8_grouped_gemm_reference(a, sa, b, sb, offs, f32))
        errs["grouped_" + name + "_tail"] = out[sum(counts):].abs().max().item() if M > sum(counts) else 0.0
    return errs


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: the interpreter test needs it "
                                           "(requirements-ci.txt pins triton, so CI runs it)")
def test_triton_interpreter_matches_reference():
    errs = interpreter_cases("test_kernels_fp8_gemm")
    assert len(errs) == 19, errs
    for name, err in errs.items():
        assert err < 1e-5, (name, errs)


# ---------------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------------

def _cap():
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


needs_triton_gpu = pytest.mark.skipif(not (HAS_TRITON and _cap() >= (8, 9)),
                                      reason="Triton's fp8 dot needs a CUDA GPU of sm_89+ (run through the device "
                                             "tool)")
needs_sm90 = pytest.mark.skipif(_cap()[0] != 9, reason="torch's 1x128/128x128 scaled_mm runs only on sm_90 (H100/"
                                                       "H200; run through the device tool)")
V3_SHAPES = [(1, 7168, 2048), (16, 2048, 7168), (37, 1536, 7168), (300, 7168, 2048), (512, 4096, 7168)]


@pytest.mark.gpu
@needs_triton_gpu
@pytest.mark.parametrize("b_rows", [128, 1], ids=["block", "tile"])
@pytest.mark.parametrize("M,N,K", V3_SHAPES + [(64, 576, 7168), (33, 200, 300)])
def test_triton_cuda_bf16(M, N, K, b_rows):
    args = make_dense(M, N, K, b_rows, seed=21, device="cuda")
    ref = fp8_gemm_reference(*args)
    out = fp8_gemm_triton(*args)
    assert out.dtype == torch.bfloat16
    assert_close_scaled(out, ref, 1.6e-2)
    assert_close_scaled(fp8_gemm(*args), ref, 1.6e-2)
    assert_within_fp8_accumulation(fp8_gemm_triton(*args, torch.float32), *args)


@pytest.mark.gpu
@needs_triton_gpu
@pytest.mark.parametrize("counts,M", [([1, 0, 70, 3, 0, 1, 200, 9], 300), ([2] * 32, 64), ([0] * 7 + [5], 5)])
def test_triton_cuda_grouped_bf16(counts, M):
    a, sa, b, sb, offs = make_grouped(counts, M, 512, 1024, seed=23, device="cuda")
    out = fp8_grouped_gemm_triton(a, sa, b, sb, offs)
    assert_close_scaled(out, fp8_grouped_gemm_reference(a, sa, b, sb, offs), 1.6e-2)
    assert (out[sum(counts):] == 0).all()


@pytest.mark.gpu
@needs_triton_gpu
def test_triton_cuda_grouped_graph_capture():
    """No host sync: the call captures in a CUDA graph and replays correctly with new group sizes."""
    a, sa, b, sb, offs = make_grouped([3, 0, 9, 1], 16, 256, 512, seed=24, device="cuda")
    fp8_grouped_gemm_triton(a, sa, b, sb, offs)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_grouped_gemm_triton(a, sa, b, sb, offs)
    offs.copy_(torch.tensor([0, 7, 7, 12], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_scaled(out, fp8_grouped_gemm_reference(a, sa, b, sb, offs), 1.6e-2)


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("b_rows", [128, 1], ids=["block", "tile"])
@pytest.mark.parametrize("M,N,K", V3_SHAPES + [(5, 256, 384), (20, 384, 1152),    # K/128 = 3, 9: L4 padding
                                   (64, 576, 2048), (33, 200, 300), (16, 1000, 10944), (8, 10944, 2048)])  # padded
def test_scaled_mm_cuda_bf16(M, N, K, b_rows):
    args = make_dense(M, N, K, b_rows, seed=25, device="cuda")
    out = fp8_gemm_scaled_mm(*args)
    assert out.shape == (M, N) and out.dtype == torch.bfloat16
    assert_close_scaled(out, fp8_gemm_reference(*args), 1.6e-2)
    assert_within_fp8_accumulation(fp8_gemm_scaled_mm(*args, torch.float32), *args)


@pytest.mark.gpu
@needs_sm90
@needs_triton_gpu
def test_dispatcher_prefers_cublas_where_it_fits(monkeypatch):
    """On sm_90, fp8_gemm takes cuBLASLt's block-scaled GEMM above 16 rows for every N and K (padding them where
    needed), Triton at M <= 16 (where cuBLASLt's padded kernel loses) and when forced."""
    import importlib
    m = importlib.import_module("dsv3.kernels.fp8_gemm")  # the package's fp8_gemm attribute is the function
    calls = []
    real_s, real_t = m.fp8_gemm_scaled_mm, m.fp8_gemm_triton
    monkeypatch.setattr(m, "fp8_gemm_scaled_mm", lambda *a, **k: calls.append("scaled_mm") or real_s(*a, **k))
    monkeypatch.setattr(m, "fp8_gemm_triton", lambda *a, **k: calls.append("triton") or real_t(*a, **k))
    cases = [((64, 256, 512, 128), "scaled_mm"), ((64, 576, 512, 128), "scaled_mm"),   # N = 576: padded
             ((64, 208, 512, 1), "scaled_mm"), ((64, 256, 200, 128), "scaled_mm"),     # K = 200: padded
             ((16, 256, 512, 128), "triton"), ((1, 576, 512, 128), "triton"), ((17, 256, 512, 128), "scaled_mm")]
    for (M, N, K, rows), _ in cases:
        args = make_dense(M, N, K, rows, seed=30 + N, device="cuda")
        assert_close_scaled(m.fp8_gemm(*args), fp8_gemm_reference(*args), 1.6e-2)
    monkeypatch.setenv("DSV3_FP8_GEMM", "triton")
    args = make_dense(64, 256, 512, 128, seed=40, device="cuda")
    assert_close_scaled(m.fp8_gemm(*args), fp8_gemm_reference(*args), 1.6e-2)
    assert calls == [want for _, want in cases] + ["triton"]
